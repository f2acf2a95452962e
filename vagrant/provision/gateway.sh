#!/usr/bin/env bash
# The gateway: a client outside the cluster, as in the article. It reaches the workers by name
# (/etc/hosts, common.sh) and routes the external-ip Service's externalIP to k8s-worker01, as
# the namespace lab's gateway does (docs/lab.md): no node owns 10.20.30.20, a route leads there.
# Environment: EXTERNAL_IP, EXTERNAL_IP_VIA (the worker's address).
set -euo pipefail

: "${EXTERNAL_IP:?}" "${EXTERNAL_IP_VIA:?}"
echo "kpgen-lab: gateway: route $EXTERNAL_IP/32 via $EXTERNAL_IP_VIA"

# A unit, so that the route comes back after a reboot (`vagrant reload`).
cat >/etc/systemd/system/kpgen-lab-external-ip.service <<UNIT
[Unit]
Description=kpgen lab: route the seed's externalIP $EXTERNAL_IP via $EXTERNAL_IP_VIA
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/sbin/ip route replace $EXTERNAL_IP/32 via $EXTERNAL_IP_VIA
ExecStop=/sbin/ip route del $EXTERNAL_IP/32

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable kpgen-lab-external-ip.service
systemctl restart kpgen-lab-external-ip.service
ip route get "$EXTERNAL_IP" | grep -q "via $EXTERNAL_IP_VIA " \
    || { echo "kpgen-lab: gateway: the route to $EXTERNAL_IP is not via $EXTERNAL_IP_VIA" >&2; exit 1; }
