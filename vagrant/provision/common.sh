#!/usr/bin/env bash
# Every machine: the lab's names in /etc/hosts (the article curls http://k8s-worker01:30001),
# and the few tools every machine uses. Self-contained: the gateway has no copy of the repository.
# Environment (from the Vagrantfile): NODE_NAME, LAB_HOSTS ("name=ip name=ip ...").
set -euo pipefail

: "${NODE_NAME:?}" "${LAB_HOSTS:?}"
echo "kpgen-lab: $NODE_NAME: names and base packages"

# The lab's block in /etc/hosts, rewritten on every run. Vagrant's hostname step maps the
# machine's own name to 127.0.x.1; that line goes, so that the name means the lab address.
hosts=$(mktemp)
sed -e '/^# kpgen-lab begin$/,/^# kpgen-lab end$/d' \
    -e "/^127\\.0\\.[0-9]*\\.1[[:space:]]\\(.*[[:space:]]\\)\\{0,1\\}$NODE_NAME\\([[:space:]]\\|\$\\)/d" \
    /etc/hosts >"$hosts"
{
    echo "# kpgen-lab begin"
    for entry in $LAB_HOSTS; do
        printf '%s\t%s\n' "${entry#*=}" "${entry%%=*}"
    done
    echo "# kpgen-lab end"
} >>"$hosts"
cat "$hosts" >/etc/hosts
rm -f "$hosts"

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends ca-certificates curl iproute2 >/dev/null
