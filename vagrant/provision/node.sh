#!/usr/bin/env bash
# Every Kubernetes node (k8s-master, k8s-worker01, k8s-worker02): what kubeadm needs. No
# swap, br_netfilter and forwarding, Debian 12's containerd with the systemd cgroup driver,
# and kubeadm, kubelet and kubectl of the pinned version from pkgs.k8s.io, held there.
# Environment: LAB_DIR, NODE_NAME, KUBERNETES_VERSION, KUBERNETES_MINOR, KUBERNETES_DEB_VERSION.
set -euo pipefail
# shellcheck source=vagrant/provision/lib.sh
. "${LAB_DIR:?}/vagrant/provision/lib.sh"
: "${KUBERNETES_VERSION:?}" "${KUBERNETES_MINOR:?}" "${KUBERNETES_DEB_VERSION:?}"

log "swap off, br_netfilter, forwarding"
swapoff -a
sed -i -E 's/^([^#].*[[:space:]]swap[[:space:]].*)$/# \1/' /etc/fstab
printf 'overlay\nbr_netfilter\n' >/etc/modules-load.d/kpgen-lab.conf
modprobe overlay
modprobe br_netfilter
cat >/etc/sysctl.d/90-kpgen-lab.conf <<'SYSCTL'
net.ipv4.ip_forward = 1
net.bridge.bridge-nf-call-iptables = 1
net.bridge.bridge-nf-call-ip6tables = 1
SYSCTL
sysctl --quiet --system

log "packages: containerd, buildah, netfilter tools"
apt-get update -qq
# gettext-base: envsubst, for render(); buildah: kpgen's image (kpgen-image.sh); nftables and
# conntrack: to look at kpgen's rules and connections on the node.
apt_install containerd buildah gettext-base conntrack iptables nftables socat ethtool ebtables

log "kubeadm, kubelet, kubectl $KUBERNETES_DEB_VERSION from pkgs.k8s.io ($KUBERNETES_MINOR)"
install -d -m 0755 /etc/apt/keyrings
curl -fsSL "https://pkgs.k8s.io/core:/stable:/$KUBERNETES_MINOR/deb/Release.key" \
    -o /etc/apt/keyrings/kubernetes-apt-keyring.asc
echo "deb [signed-by=/etc/apt/keyrings/kubernetes-apt-keyring.asc] https://pkgs.k8s.io/core:/stable:/$KUBERNETES_MINOR/deb/ /" \
    >/etc/apt/sources.list.d/kubernetes.list
apt-get update -qq
apt_install --allow-change-held-packages --allow-downgrades \
    "kubelet=$KUBERNETES_DEB_VERSION" "kubeadm=$KUBERNETES_DEB_VERSION" "kubectl=$KUBERNETES_DEB_VERSION"
apt-mark hold kubelet kubeadm kubectl >/dev/null
kubeadm version -o short | grep -qx "v$KUBERNETES_VERSION" || die "kubeadm is not v$KUBERNETES_VERSION"

log "containerd: systemd cgroups (kubeadm's kubelet default), the pause image kubeadm expects"
pause=$(kubeadm config images list --kubernetes-version "v$KUBERNETES_VERSION" 2>/dev/null | grep '/pause:') \
    || die "kubeadm names no pause image"
install -d -m 0755 /etc/containerd
containerd config default >/etc/containerd/config.toml
sed -i -e 's/SystemdCgroup = false/SystemdCgroup = true/' \
    -e "s|sandbox_image = .*|sandbox_image = \"$pause\"|" /etc/containerd/config.toml
grep -q 'SystemdCgroup = true' /etc/containerd/config.toml || die "containerd: SystemdCgroup not set"
systemctl restart containerd
systemctl enable --now kubelet >/dev/null 2>&1
printf 'runtime-endpoint: unix:///run/containerd/containerd.sock\nimage-endpoint: unix:///run/containerd/containerd.sock\n' \
    >/etc/crictl.yaml

# buildah resolves the Containerfile's `FROM debian:12-slim` on Docker Hub.
install -d -m 0755 /etc/containers/registries.conf.d
cat >/etc/containers/registries.conf.d/90-kpgen-lab.conf <<'CONF'
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"
CONF
