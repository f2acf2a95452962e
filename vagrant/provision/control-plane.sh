#!/usr/bin/env bash
# k8s-master: `kubeadm init` without kube-proxy, then kpgen from deploy/ (before anything needs
# a Service), Calico, and the seed's workload. Idempotent: `vagrant provision k8s-master` runs
# it again (and makes the workers' bootstrap token again after it expired).
# Environment: see vagrant/lib/kpgen_lab.rb (env_for).
set -euo pipefail
# shellcheck source=vagrant/provision/lib.sh
. "${LAB_DIR:?}/vagrant/provision/lib.sh"
: "${NODE_NAME:?}" "${NODE_IP:?}" "${API_ADDRESS:?}" "${API_PORT:?}" "${POD_CIDR:?}" \
    "${CALICO_VERSION:?}" "${KPGEN_MODE:?}" "${BOOTSTRAP_TOKEN:?}"

state=/etc/kubernetes/kpgen-lab
install -d -m 0700 "$state"
render "$LAB_DIR/vagrant/kubeadm/init.yaml" >"$state/kubeadm-init.yaml"

if [ ! -f /etc/kubernetes/admin.conf ]; then
    log "kubeadm init, Kubernetes v$KUBERNETES_VERSION, kube-proxy skipped"
    kubeadm init --config "$state/kubeadm-init.yaml"
fi
export KUBECONFIG=/etc/kubernetes/admin.conf
for home in /root /home/vagrant; do
    install -d -m 0700 "$home/.kube"
    install -m 0600 /etc/kubernetes/admin.conf "$home/.kube/config"
done
chown -R vagrant:vagrant /home/vagrant/.kube
wait_for "the API server" 300 kubectl get --raw /readyz

if ! kubeadm token list | awk 'NR > 1 { print $1 }' | grep -qx "$BOOTSTRAP_TOKEN"; then
    log "the workers' bootstrap token had expired: made again"
    kubeadm token create "$BOOTSTRAP_TOKEN" --ttl 24h0m0s >/dev/null
fi

if kubectl -n kube-system get daemonset kube-proxy >/dev/null 2>&1; then
    die "kube-proxy is installed: the lab runs kpgen in its place (see docs/vagrant.md)"
fi

# kpgen first: it reaches the API server at its real address, runs in the node's network
# namespace and tolerates the not-ready taint, so it starts before the CNI; from then on the
# node's ClusterIPs (the kubernetes Service, and CoreDNS's once Calico is up) work.
log "kpgen from deploy/kpgen.yaml: API server $API_ADDRESS:$API_PORT, cluster CIDR $POD_CIDR, mode $KPGEN_MODE"
sh "$LAB_DIR/vagrant/provision/kpgen-manifest.sh" "$API_ADDRESS" "$API_PORT" "$POD_CIDR" "$KPGEN_MODE" \
    <"$LAB_DIR/deploy/kpgen.yaml" >"$state/kpgen.yaml"
existing=$(kubectl -n kube-system get daemonset kpgen --ignore-not-found -o name)
kubectl apply -f "$state/kpgen.yaml"
if [ -n "$existing" ]; then
    # A re-provisioning may have rebuilt the image (kpgen-image.sh): run the new one.
    kubectl -n kube-system rollout restart daemonset/kpgen
fi
kubectl -n kube-system rollout status daemonset/kpgen --timeout=300s

log "Calico $CALICO_VERSION (operator, iptables dataplane)"
render "$LAB_DIR/vagrant/manifests/calico-api-server.yaml" | kubectl apply -f -
kubectl apply --server-side --force-conflicts \
    -f "https://raw.githubusercontent.com/projectcalico/calico/$CALICO_VERSION/manifests/tigera-operator.yaml" >/dev/null
kubectl wait --for=condition=Established --timeout=120s crd/installations.operator.tigera.io
render "$LAB_DIR/vagrant/manifests/calico.yaml" | kubectl apply -f -
kubectl wait --for=condition=Ready --timeout=600s "node/$NODE_NAME"

log "the seed's workload: nginx-dep, services cluster-ip, external-ip, node-port; test-pod"
kubectl apply -f "$LAB_DIR/vagrant/manifests/seed-workload.yaml" -f "$LAB_DIR/vagrant/manifests/test-pod.yaml"
log "done; the workload starts when the workers have joined (then: ./check.sh)"
