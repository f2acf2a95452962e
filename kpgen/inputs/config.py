"""The node's settings as the host gives them: a KubeProxyConfiguration file (``--config``),
kube-proxy's flags over it, and the host's name, turned into values by kpgen.core.node and
kpgen.core.kubeproxy."""

from __future__ import annotations

import socket
from typing import Any

from kpgen.core.kubeproxy import Flags, KubeProxyConfig, flags_only_config, merged, read_config
from kpgen.core.node import ConfigError, NodeConfig, NodeFlags, config_flags, node_config
from kpgen.inputs.manifests import InputError, decode_yaml


def read_document(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as stream:
            documents = decode_yaml(stream.read(), path)
    except OSError as error:
        raise ConfigError(f"--config: cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config: cannot read {path}: not UTF-8 text") from None
    except InputError as error:
        raise ConfigError(f"--config: {error}") from None
    return documents[0] if len(documents) == 1 else documents or None


def read_config_file(path: str) -> NodeFlags:
    """The node settings of a KubeProxyConfiguration file, as if given as flags."""
    return config_flags(read_document(path), f"--config: {path}")


def read_kube_proxy_config(path: str | None, flags: Flags | None = None) -> KubeProxyConfig:
    """A KubeProxyConfiguration file (none: kube-proxy's defaults) with kube-proxy's
    ``flags`` over it, read whole: node and run settings, conntrack, and the notes."""
    doc = read_document(path) if path else flags_only_config()
    if flags is not None and flags.patch:
        doc = merged(doc, flags.patch)
    return read_config(
        doc,
        f"--config: {path}" if path else "kube-proxy flags",
        origin=flags.origin if flags is not None else None,
    )


def node_settings(
    flags: NodeFlags, config_file: str | None = None, config: KubeProxyConfig | None = None
) -> NodeConfig:
    """The node's validated settings: ``flags`` over the config file's (or over ``config``,
    read already), the node's name defaulting to the host's."""
    if config is None and config_file:
        config = read_kube_proxy_config(config_file)
    return node_config(
        flags,
        base=config.node if config else None,
        base_source=f"--config: {config_file}" if config_file else "kube-proxy flags",
        host_name=socket.gethostname(),
        base_origin=config.origin if config else None,
    )
