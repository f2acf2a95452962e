#!/bin/sh
# Prints deploy/kpgen.yaml (read from stdin) with the lab's values in its four settings:
#
#   kpgen-manifest.sh API_HOST API_PORT CLUSTER_CIDR MODE <deploy/kpgen.yaml | kubectl apply -f -
#
# - the DaemonSet's KUBERNETES_SERVICE_HOST / KUBERNETES_SERVICE_PORT: the API server's real
#   address (deploy/README.md, step 1), here k8s-master's;
# - the ConfigMap's clusterCIDR: the pod CIDR (kubeadm's podSubnet, Calico's pool);
# - the ConfigMap's mode: nftables or iptables.
#
# deploy/kpgen.yaml's own values are already the seed cluster's, so with the default settings
# nothing changes; the substitution keeps the lab right when settings.yaml changes, and the
# repository has one copy of the manifest. Each line is replaced where deploy/kpgen.yaml has it;
# if any of them is not found exactly once, nothing is printed and the exit status is 1.
set -eu

if [ $# -ne 4 ]; then
    echo "usage: $0 API_HOST API_PORT CLUSTER_CIDR MODE <deploy/kpgen.yaml" >&2
    exit 2
fi

out=$(awk -v host="$1" -v port="$2" -v cidr="$3" -v mode="$4" '
    pending != "" {
        if ($0 ~ /^[[:space:]]*value:/) {
            sub(/value:.*/, "value: \"" (pending == "host" ? host : port) "\"")
            done[pending]++
        }
        pending = ""
    }
    /^[[:space:]]*- name: KUBERNETES_SERVICE_HOST[[:space:]]*$/ { pending = "host" }
    /^[[:space:]]*- name: KUBERNETES_SERVICE_PORT[[:space:]]*$/ { pending = "port" }
    /^[[:space:]]*clusterCIDR:/ { sub(/clusterCIDR:.*/, "clusterCIDR: " cidr); done["cidr"]++ }
    /^[[:space:]]*mode:/ { sub(/mode:.*/, "mode: " mode); done["mode"]++ }
    { print }
    END {
        split("host port cidr mode", keys, " ")
        for (i = 1; i <= 4; i++) {
            if (done[keys[i]] != 1) {
                printf "kpgen-manifest.sh: %s: found %d times in deploy/kpgen.yaml, not once\n", keys[i], done[keys[i]] > "/dev/stderr"
                failed = 1
            }
        }
        exit failed
    }')
printf '%s\n' "$out"
