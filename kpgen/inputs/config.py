"""The node's settings as the host gives them: a KubeProxyConfiguration file (``--config``) and
the host's name, turned into values by kpgen.core.node."""

from __future__ import annotations

import socket

from kpgen.core.node import ConfigError, NodeConfig, NodeFlags, config_flags, node_config
from kpgen.inputs.manifests import InputError, decode_yaml


def read_config_file(path: str) -> NodeFlags:
    """The node settings of a KubeProxyConfiguration file, as if given as flags."""
    try:
        with open(path, encoding="utf-8") as stream:
            documents = decode_yaml(stream.read(), path)
    except OSError as error:
        raise ConfigError(f"--config: cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config: cannot read {path}: not UTF-8 text") from None
    except InputError as error:
        raise ConfigError(f"--config: {error}") from None
    doc = documents[0] if len(documents) == 1 else documents or None
    return config_flags(doc, f"--config: {path}")


def node_settings(flags: NodeFlags, config_file: str | None = None) -> NodeConfig:
    """The node's validated settings: ``flags`` over the config file's, the node's name
    defaulting to the host's."""
    base = read_config_file(config_file) if config_file else None
    return node_config(
        flags, base=base, base_source=f"--config: {config_file}", host_name=socket.gethostname()
    )
