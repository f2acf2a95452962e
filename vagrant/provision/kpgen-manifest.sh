#!/bin/sh
# Prints deploy/kpgen.yaml (read from stdin) with the lab's values, and the kube-proxy
# kubeconfig it reads the API server's address from:
#
#   kpgen-manifest.sh API_HOST API_PORT CLUSTER_CIDR MODE <deploy/kpgen.yaml | kubectl apply -f -
#
# - the ConfigMap's clusterCIDR: the pod CIDR (kubeadm's podSubnet, Calico's pool);
# - the ConfigMap's mode: nftables or iptables;
# - a `kube-proxy` ConfigMap with kubeconfig.conf, as kubeadm writes it when it installs
#   kube-proxy: the lab's kubeadm skips that addon (vagrant/kubeadm/init.yaml), so the lab
#   writes the kubeconfig itself, with the API server's real address (API_HOST:API_PORT,
#   k8s-master's) and the pod's service account credentials.
#
# deploy/kpgen.yaml's own values are already the seed cluster's, so with the default settings
# only the kube-proxy ConfigMap is added; the substitution keeps the lab right when settings.yaml
# changes, and the repository has one copy of the manifest. Each line is replaced where
# deploy/kpgen.yaml has it; if any of them is not found exactly once, nothing is printed and the
# exit status is 1.
set -eu

if [ $# -ne 4 ]; then
    echo "usage: $0 API_HOST API_PORT CLUSTER_CIDR MODE <deploy/kpgen.yaml" >&2
    exit 2
fi

out=$(awk -v cidr="$3" -v mode="$4" '
    /^[[:space:]]*clusterCIDR:/ { sub(/clusterCIDR:.*/, "clusterCIDR: " cidr); done["cidr"]++ }
    /^[[:space:]]*mode:/ { sub(/mode:.*/, "mode: " mode); done["mode"]++ }
    { print }
    END {
        split("cidr mode", keys, " ")
        for (i = 1; i <= 2; i++) {
            if (done[keys[i]] != 1) {
                printf "kpgen-manifest.sh: %s: found %d times in deploy/kpgen.yaml, not once\n", keys[i], done[keys[i]] > "/dev/stderr"
                failed = 1
            }
        }
        exit failed
    }')
printf '%s\n' "$out"
cat <<YAML
---
# kubeadm's kube-proxy kubeconfig (the lab's kubeadm installs no kube-proxy): the API server's
# real address; deploy/kpgen.yaml mounts it at /var/lib/kube-proxy.
apiVersion: v1
kind: ConfigMap
metadata:
  name: kube-proxy
  namespace: kube-system
  labels:
    app: kube-proxy
data:
  kubeconfig.conf: |-
    apiVersion: v1
    kind: Config
    clusters:
    - cluster:
        certificate-authority: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
        server: https://$1:$2
      name: default
    contexts:
    - context:
        cluster: default
        namespace: default
        user: default
      name: default
    current-context: default
    users:
    - name: default
      user:
        tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token
YAML
