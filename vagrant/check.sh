#!/usr/bin/env bash
# The seed article's curl loops, run where the article ran them, against the Vagrant lab
# (docs/vagrant.md):
#
#   from the gateway   for i in 1 2 3 4 5 ;do curl -s http://k8s-worker01:30001 | grep pod; done
#                      ... the same through k8s-worker02, and to the externalIP 10.20.30.20:8080
#   from test-pod      ... http://node-port.default.svc.cluster.local:8080 (the article's), and
#                      the cluster-ip Service's ClusterIP on 8080
#
# Exits 0 only if every loop was answered by both pods, pod1 and pod2: a loop whose five
# requests all went to one pod makes more requests (KPGEN_CHECK_TRIES in all) until the other
# answers too. Before the loops it waits for the cluster, and checks that kube-proxy is absent
# and kpgen's rules are loaded on both workers (otherwise a pass would prove nothing of kpgen).
#
#   cd vagrant && vagrant up && ./check.sh
#
# Environment:
#   KPGEN_CHECK_SLEEP   seconds between requests, as the article's `sleep 5` (default: none;
#                       every curl opens a new connection, which is balanced anew either way)
#   KPGEN_CHECK_TRIES   requests a loop may make in all (default 40)
#   KPGEN_CHECK_WAIT    how long to wait for nodes, kpgen, CoreDNS and the pods (default 900s)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")" || exit 2

pause=${KPGEN_CHECK_SLEEP:-}
tries=${KPGEN_CHECK_TRIES:-40}
wait=${KPGEN_CHECK_WAIT:-900s}
pods=(pod1 pod2)
workers=(k8s-worker01 k8s-worker02)
failures=()

fail() {
    failures+=("$1")
    echo "FAIL: $1"
}

# on MACHINE COMMAND: COMMAND in a shell on MACHINE (the vagrant user; kubectl works on
# k8s-master). `vagrant ssh -c` runs `bash -l -c '<COMMAND>'` there, pasting COMMAND between
# single quotes as it is: each ' in it is written '\'' for that. -T: no terminal, so no \r.
on() {
    local quoted=${2//\'/\'\\\'\'}
    vagrant ssh "$1" -c "$quoted" -- -T </dev/null
}

# at WHERE SECONDS COMMAND: COMMAND in a shell at the gateway or in the test pod, for at most
# SECONDS (a request that is never answered must not hang the check).
at() {
    if [ "$1" = test-pod ]; then
        on k8s-master "kubectl exec test-pod -- timeout $2 sh -c '$3'"
    else
        on "$1" "timeout $2 sh -c '$3'"
    fi
}

# The pods that never answered in OUTPUT (the grep's lines).
missing() {
    local pod
    for pod in "${pods[@]}"; do
        grep -qw "$pod" <<<"$1" || printf '%s ' "$pod"
    done
}

# counts OUTPUT: "pod1 x3, pod2 x2"
counts() {
    local pod sep=""
    for pod in "${pods[@]}"; do
        printf '%s%s x%s' "$sep" "$pod" "$(grep -cw "$pod" <<<"$1")"
        sep=", "
    done
}

# loop TITLE WHERE URL: the article's loop, printed as at WHERE's prompt, and what it printed.
loop() {
    local title=$1 where=$2 url=$3 command output more lacking
    # The article's loop, with its sleep or (by default) without, as docs/lab.md prints it.
    if [ -n "$pause" ]; then
        command="for i in 1 2 3 4 5 ;do curl -s $url | grep pod; sleep $pause;done"
    else
        command="for i in 1 2 3 4 5 ;do curl -s $url | grep pod; done"
    fi
    echo "# $title"
    echo "[$where ~]\$ $command"
    output=$(at "$where" 120 "$command")
    [ -z "$output" ] || echo "$output"
    lacking=$(missing "$output")
    if [ -n "$lacking" ] && [ -n "$output" ] && [ "$tries" -gt 5 ]; then
        # Answered, but by one pod only: five requests all go to one of two pods once in 16
        # runs. More requests, until both have answered.
        more=$(at "$where" $((tries * 6 + 30)) \
            "i=5; while [ \$i -lt $tries ]; do curl -s --max-time 5 $url | grep pod; i=\$((i + 1)); done")
        output=$(printf '%s\n%s' "$output" "$more")
        echo "# ($((tries - 5)) more requests, as ${lacking% } had not answered: $(counts "$output"))"
        lacking=$(missing "$output")
    fi
    if [ -n "$lacking" ]; then
        fail "$title: no answer from ${lacking% } ($(counts "$output"))"
    fi
}

echo "# waiting for the nodes, kpgen, CoreDNS, nginx-dep and test-pod (at most $wait each)"
if ! on k8s-master "kubectl wait --for=condition=Ready nodes --all --timeout=$wait >/dev/null \
        && kubectl -n kube-system rollout status daemonset/kpgen --timeout=$wait \
        && kubectl -n kube-system rollout status deployment/coredns --timeout=$wait \
        && kubectl rollout status deployment/nginx-dep --timeout=$wait \
        && kubectl wait --for=condition=Ready pod/test-pod --timeout=$wait"; then
    echo "FAIL: the lab is not ready (is it up? vagrant status; vagrant up)"
    exit 1
fi

echo "[k8s-master ~]\$ kubectl get svc -o wide"
on k8s-master "kubectl get svc -o wide"
echo "[k8s-master ~]\$ kubectl get pods -o wide"
on k8s-master "kubectl get pods -o wide"

if [ -n "$(on k8s-master "kubectl -n kube-system get daemonset kube-proxy --ignore-not-found -o name")" ]; then
    fail "kube-proxy is installed: the loops would not show what kpgen does"
fi
for worker in "${workers[@]}"; do
    rules=$(on "$worker" '
        if sudo nft list table ip kpgen >/dev/null 2>&1 \
                || sudo iptables-save -t nat 2>/dev/null | grep -q "^:KPGEN-SERVICES "; then
            echo kpgen
        fi
        if sudo nft list table ip kube-proxy >/dev/null 2>&1 \
                || sudo iptables-save -t nat 2>/dev/null | grep -q "^:KUBE-SERVICES "; then
            echo kube-proxy
        fi')
    if ! grep -qx kpgen <<<"$rules"; then
        fail "$worker: kpgen's rules are not loaded"
    elif grep -qx kube-proxy <<<"$rules"; then
        fail "$worker: kube-proxy's rules are loaded"
    else
        echo "# $worker: kpgen's rules are loaded, kube-proxy's are not"
    fi
done

cluster_ip=$(on k8s-master "kubectl get service cluster-ip -o jsonpath='{.spec.clusterIP}'")
external_ip=$(on k8s-master "kubectl get service external-ip -o jsonpath='{.spec.externalIPs[0]}'")
[ -n "$cluster_ip" ] || fail "the cluster-ip Service has no ClusterIP"
[ -n "$external_ip" ] || fail "the external-ip Service has no externalIP"

loop "NodePort from outside, through k8s-worker01" gateway "http://k8s-worker01:30001"
loop "NodePort from outside, through k8s-worker02" gateway "http://k8s-worker02:30001"
loop "the node-port Service by name from a pod (the article's test-pod)" test-pod \
    "http://node-port.default.svc.cluster.local:8080"
loop "the cluster-ip Service's ClusterIP from a pod" test-pod "http://${cluster_ip:-cluster-ip}:8080"
loop "the externalIP from outside (routed to k8s-worker01)" gateway "http://${external_ip:-external-ip}:8080"

if [ ${#failures[@]} -ne 0 ]; then
    echo "check.sh: ${#failures[@]} failed:"
    printf '  %s\n' "${failures[@]}"
    exit 1
fi
echo "check.sh: every loop was answered by pod1 and pod2; no kube-proxy, kpgen's rules on both workers"
