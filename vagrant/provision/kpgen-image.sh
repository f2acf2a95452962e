#!/usr/bin/env bash
# Every Kubernetes node: kpgen's image, built here from deploy/Containerfile and the
# repository's copy, and imported into containerd's k8s.io namespace under the name the
# DaemonSet's `image: kpgen:latest` means. The DaemonSet pulls only if the image is missing
# (imagePullPolicy: IfNotPresent), so no registry is involved.
#
# After changing kpgen: `vagrant rsync && vagrant provision --provision-with kpgen-image`, then
# `kubectl -n kube-system rollout restart daemonset/kpgen` on k8s-master (docs/vagrant.md).
# Environment: LAB_DIR, NODE_NAME.
set -euo pipefail
# shellcheck source=vagrant/provision/lib.sh
. "${LAB_DIR:?}/vagrant/provision/lib.sh"

[ -f "$LAB_DIR/deploy/Containerfile" ] || die "no $LAB_DIR/deploy/Containerfile: is the repository synced (vagrant rsync)?"
log "building $KPGEN_IMAGE from deploy/Containerfile (Debian's archive and PyPI, a few minutes)"
# chroot isolation: the build's RUN steps use the VM's own network, nothing to set up.
buildah build --isolation chroot --layers \
    -f "$LAB_DIR/deploy/Containerfile" -t "$KPGEN_IMAGE" "$LAB_DIR"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
buildah push --quiet "$KPGEN_IMAGE" "docker-archive:$work/kpgen.tar:$KPGEN_IMAGE"
ctr --namespace k8s.io images import "$work/kpgen.tar" >/dev/null
ctr --namespace k8s.io images list --quiet | grep -qx "$KPGEN_IMAGE" \
    || die "$KPGEN_IMAGE is not in containerd after the import"
log "$KPGEN_IMAGE is in containerd (image $(buildah images --quiet "$KPGEN_IMAGE" | head -n 1))"
