"""Names of kpgen's chains, sets and maps: stable, so the same input renders the same text.

nftables names are readable (``service-default/node-port/tcp/8080``): the nft scanner accepts
``/`` in names, and validated Kubernetes names keep them well under nft's 256-character limit.
iptables names are limited to 28 characters, so, like kube-proxy's, they carry a hash of what
they stand for (``KPGEN-SVC-`` + 16 base32 characters of its SHA-256).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import zlib

from kpgen.core.plan import Backend, PortPlan

NFT_TABLE = "kpgen"
# The service ports' chains, sets and dispatch maps are spread over this many tables more,
# ``kpgen-00`` to ``kpgen-15``, by a hash of the service: nf_tables checks every chain a
# table's base chains reach whenever a transaction adds a NAT rule or a jump to it, so a
# change costs in proportion to its table, not to the node's rules (docs/design.md). A shard
# table exists while it holds a service port. Each costs a new connection one more NAT base
# chain (about 0.35 us here, docs/performance.md): 16 keep that near 6 us at any size.
NFT_SHARDS = 16
_NFT_SHARD_TABLE = re.compile(r"^kpgen-[0-9]{2}$")  # any number: a full load deletes those unused
AFFINITY_PREFIX = "affinity-"
IPT_PREFIX = "KPGEN-"
_IPT_CHAIN = re.compile(r"^KPGEN-[A-Z0-9-]{1,22}$")


def nft_shard(service: str) -> int:
    """The shard of a service (``namespace/name``): stable across runs and nodes."""
    return zlib.crc32(service.encode()) % NFT_SHARDS


def nft_shard_table(shard: int) -> str:
    return f"{NFT_TABLE}-{shard:02d}"


def is_nft_table(name: str) -> bool:
    """Whether a table's name (read back from the kernel) is one of kpgen's."""
    return name == NFT_TABLE or _NFT_SHARD_TABLE.match(name) is not None


def nft_chain(kind: str, port: PortPlan) -> str:
    """``service-…`` (balances over the cluster's endpoints), ``local-…`` (over this node's),
    ``external-…`` (external destinations: masquerade, policy) or ``firewall-…`` (LB source
    ranges)."""
    return f"{kind}-{port.key}"


@functools.lru_cache(maxsize=1 << 17)
def _hash(text: str) -> str:
    # 10 bytes are 16 base32 characters: the same as encoding the whole digest and cutting
    digest = hashlib.sha256(text.encode()).digest()[:10]
    return base64.b32encode(digest).decode()


def ipt_chain(kind: str, port: PortPlan, backend: Backend | None = None) -> str:
    """``KPGEN-SVC-``, ``KPGEN-EXT-`` or (with ``backend``) ``KPGEN-SEP-`` + a hash."""
    what = port.key if backend is None else f"{port.key}/{backend.address}/{backend.port}"
    return f"{IPT_PREFIX}{kind}-{_hash(what)}"


def is_ipt_chain(name: str) -> bool:
    """Whether ``name`` (read back from the kernel) is one of kpgen's iptables chains."""
    return bool(_IPT_CHAIN.match(name))


def nft_affinity_set(port: PortPlan, backend: Backend) -> str:
    """The set of clients that stick to ``backend`` of ``port`` (sessionAffinity ClientIP):
    ``affinity-<port>__<address>/<port>``, an IPv6 address's colons as dots."""
    address = str(backend.address).replace(":", ".")
    return f"{AFFINITY_PREFIX}{port.key}__{address}/{backend.port}"
