# shellcheck shell=bash
# Sourced by the Kubernetes nodes' provisioning scripts (node.sh, kpgen-image.sh,
# control-plane.sh, worker.sh), from the repository's copy at $LAB_DIR.

# The name deploy/kpgen.yaml's `image: kpgen:latest` stands for (Kubernetes reads a name
# without a registry as docker.io/library/...): the image is imported into containerd under it.
# shellcheck disable=SC2034 # used by kpgen-image.sh, which sources this file
KPGEN_IMAGE=docker.io/library/kpgen:latest

# The only variables the templates (vagrant/kubeadm/*.yaml, vagrant/manifests/calico*.yaml) may
# use; envsubst leaves any other $ alone, and render() refuses output with a placeholder left.
# shellcheck disable=SC2016 # envsubst's list of names: not to be expanded here
TEMPLATE_VARS='${NODE_NAME} ${NODE_IP} ${API_ADDRESS} ${API_PORT} ${KUBERNETES_VERSION} ${POD_CIDR} ${SERVICE_CIDR} ${BOOTSTRAP_TOKEN} ${CALICO_ENCAPSULATION}'

export DEBIAN_FRONTEND=noninteractive

log() {
    printf 'kpgen-lab: %s: %s\n' "${NODE_NAME:-?}" "$*"
}

die() {
    log "error: $*" >&2
    exit 1
}

apt_install() {
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# render TEMPLATE: the template with the settings' values in place of its placeholders.
render() {
    local out
    out=$(envsubst "$TEMPLATE_VARS" <"$1") || die "render $1"
    if grep -n '[$]{' <<<"$out" >&2; then
        die "$1: a placeholder is left (not one of: $TEMPLATE_VARS)"
    fi
    printf '%s\n' "$out"
}

# wait_for WHAT SECONDS COMMAND...: run COMMAND every 5 seconds until it succeeds.
wait_for() {
    local what=$1 seconds=$2 start=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS - start >= seconds)); then
            die "gave up after ${seconds}s waiting for $what"
        fi
        sleep 5
    done
}
