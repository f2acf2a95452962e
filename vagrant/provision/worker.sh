#!/usr/bin/env bash
# k8s-worker01, k8s-worker02: `kubeadm join`, once the API server answers (with libvirt the
# machines come up in parallel, so the master may still be on its way). kpgen's DaemonSet then
# starts on the node by itself, with the image kpgen-image.sh imported.
# Environment: see vagrant/lib/kpgen_lab.rb (env_for).
set -euo pipefail
# shellcheck source=vagrant/provision/lib.sh
. "${LAB_DIR:?}/vagrant/provision/lib.sh"
: "${NODE_NAME:?}" "${API_ADDRESS:?}" "${API_PORT:?}" "${BOOTSTRAP_TOKEN:?}"

if [ -f /etc/kubernetes/kubelet.conf ]; then
    log "already joined"
    exit 0
fi
state=/etc/kubernetes/kpgen-lab
install -d -m 0700 "$state"
render "$LAB_DIR/vagrant/kubeadm/join.yaml" >"$state/kubeadm-join.yaml"
log "waiting for the API server at https://$API_ADDRESS:$API_PORT"
wait_for "the API server (is k8s-master up and provisioned?)" 1800 \
    curl -ksf --max-time 5 "https://$API_ADDRESS:$API_PORT/readyz"
log "kubeadm join"
kubeadm join --config "$state/kubeadm-join.yaml" \
    || die "kubeadm join failed; if the token expired: vagrant provision k8s-master, then vagrant provision $NODE_NAME"
