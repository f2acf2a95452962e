"""kpgen.dataplane.conntrack: which UDP conntrack entries a sync made stale (a pure function of
the plans before and after), the conntrack commands that delete them, and, inside throwaway network
namespaces, that :func:`kpgen.dataplane.conntrack.delete` removes exactly those entries. The
controller's use of it: after a successful sync only, and a failure to delete never fails the
sync."""

from __future__ import annotations

import ipaddress
import json
import logging
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

import kernel
import pytest
from builders import endpoint, endpoint_slice, service

from kpgen.controller.health import Health, Timing
from kpgen.controller.metrics import Metrics
from kpgen.controller.sync import Controller
from kpgen.core.model import IPFamily
from kpgen.core.node import NodeConfig, ProxyMode
from kpgen.core.parse import parse_documents
from kpgen.core.plan import FamilyPlan, build_plans
from kpgen.dataplane.apply import ApplyError
from kpgen.dataplane.conntrack import (
    ConntrackError,
    Entry,
    Flow,
    Target,
    parse_entries,
    resolve,
    stale_udp_flows,
)
from kpgen.inputs.api import NODE, SERVICE, SLICE, Store
from kpgen.render.text import render_plan

ip = ipaddress.ip_address
V4 = IPFamily.V4
CLUSTER_IP, EXTERNAL_IP, NODE_PORT = "10.96.0.10", "203.0.113.5", 30053
A, B, C = "10.244.1.5", "10.244.2.6", "10.244.3.7"
DNS_PORTS = [{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": NODE_PORT}]
DNS_SLICE_PORTS = [{"name": "dns", "port": 5353, "protocol": "UDP"}]


def dns(*addresses: str, target_port: int = 5353, protocol: str = "UDP") -> list[dict[str, Any]]:
    """Service dns (a NodePort with an externalIP) with one port 53 and its slice of
    ``addresses``, in ``protocol``."""
    ports = [dict(DNS_PORTS[0], protocol=protocol)]
    slice_ports = [{"name": "dns", "port": target_port, "protocol": protocol}]
    return [
        service(
            "dns",
            cluster_ip=CLUSTER_IP,
            ports=ports,
            type="NodePort",
            externalIPs=[EXTERNAL_IP],
        ),
        endpoint_slice(
            "dns-1",
            service_name="dns",
            ports=slice_ports,
            endpoints=[endpoint(a) for a in addresses],
        ),
    ]


def plans(*documents: dict[str, Any]) -> tuple[FamilyPlan, ...]:
    result = parse_documents(documents)
    assert not result.problems, result.problems
    return build_plans(result.state, NodeConfig(hostname="node-a"))


def target(address: str, port: int = 5353) -> Target:
    return Target(ip(address), port)


def to_every_destination(**kwargs: Any) -> list[Flow]:
    """A flow to each of dns's destinations (NodePort, ClusterIP, externalIP), sorted."""
    return [
        Flow(V4, None, NODE_PORT, **kwargs),
        Flow(V4, ip(CLUSTER_IP), 53, **kwargs),
        Flow(V4, ip(EXTERNAL_IP), 53, **kwargs),
    ]


def same(flows: list[Flow]) -> set[Flow]:
    assert len(set(flows)) == len(flows), f"duplicates in {flows}"
    return set(flows)


# --- which entries are stale -----------------------------------------------------------------


def test_a_removed_endpoint_loses_its_entries_to_every_destination_of_the_port() -> None:
    flows = stale_udp_flows(plans(*dns(A, B)), plans(*dns(A)))
    assert same(flows) == set(to_every_destination(reply=target(B)))


def test_a_replaced_endpoint_loses_its_entries_and_the_new_one_keeps_its_own() -> None:
    flows = stale_udp_flows(plans(*dns(A)), plans(*dns(B)))
    assert same(flows) == set(to_every_destination(reply=target(A)))


def test_an_endpoint_that_changes_its_port_loses_the_entries_to_its_old_port() -> None:
    flows = stale_udp_flows(plans(*dns(A)), plans(*dns(A, target_port=5454)))
    assert same(flows) == set(to_every_destination(reply=target(A, 5353)))


def test_a_port_gaining_endpoints_loses_every_entry_not_sent_to_one_of_them() -> None:
    # entries made while it rejected (or before it existed) were never DNATed: they would stick
    keep = frozenset({target(A), target(B)})
    flows = stale_udp_flows(plans(*dns()), plans(*dns(A, B)))
    assert same(flows) == set(to_every_destination(keep=keep))


def test_a_new_service_with_endpoints_loses_the_entries_made_before_it_had_rules() -> None:
    flows = stale_udp_flows(plans(), plans(*dns(A)))
    assert same(flows) == set(to_every_destination(keep=frozenset({target(A)})))


def test_a_port_losing_its_last_endpoint_or_its_service_loses_every_entry() -> None:
    for after in (plans(*dns()), plans()):
        assert same(stale_udp_flows(plans(*dns(A)), after)) == set(to_every_destination())


def test_a_port_without_endpoints_before_and_after_gives_nothing() -> None:
    assert stale_udp_flows(plans(*dns()), plans(*dns())) == []
    assert stale_udp_flows(plans(*dns()), plans()) == []


def test_the_first_sync_keeps_only_entries_to_serving_endpoints() -> None:
    """Nothing is known of what came before (a node that booted, a kpgen that restarted):
    as kube-proxy's reconciliation, every entry not sent to a serving endpoint goes."""
    flows = stale_udp_flows(None, plans(*dns(A, B)))
    assert same(flows) == set(to_every_destination(keep=frozenset({target(A), target(B)})))
    assert stale_udp_flows(None, plans(*dns())) == []


def test_tcp_ports_are_left_alone() -> None:
    assert stale_udp_flows(plans(*dns(A, B, protocol="TCP")), plans(*dns(A, protocol="TCP"))) == []
    assert stale_udp_flows(plans(*dns(protocol="TCP")), plans(*dns(A, protocol="TCP"))) == []
    assert stale_udp_flows(None, plans(*dns(A, protocol="TCP"))) == []


def test_only_the_udp_port_of_a_service_with_tcp_and_udp_ports_is_looked_at() -> None:
    def both(*addresses: str) -> list[dict[str, Any]]:
        return [
            service(
                "dns",
                cluster_ip=CLUSTER_IP,
                ports=[
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                ],
            ),
            endpoint_slice(
                "dns-1",
                service_name="dns",
                ports=[
                    {"name": "dns", "port": 5353, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 5353, "protocol": "TCP"},
                ],
                endpoints=[endpoint(a) for a in addresses],
            ),
        ]

    flows = stale_udp_flows(plans(*both(A, B)), plans(*both(A)))
    assert flows == [Flow(V4, ip(CLUSTER_IP), 53, reply=target(B))]


def test_unchanged_plans_give_nothing() -> None:
    before = plans(*dns(A, B))
    assert stale_udp_flows(before, before) == []
    assert stale_udp_flows(before, plans(*dns(B, A))) == []


def test_an_added_endpoint_gives_nothing() -> None:
    assert stale_udp_flows(plans(*dns(A)), plans(*dns(A, B, C))) == []


def test_flows_come_sorted() -> None:
    flows = stale_udp_flows(plans(*dns(A, B, C)), plans(*dns()))
    assert flows == sorted(flows, key=lambda f: f.sort_key)
    flows = stale_udp_flows(plans(*dns(A, B, C)), plans(*dns(B)))
    assert flows == sorted(flows, key=lambda f: f.sort_key)


# --- the conntrack commands -------------------------------------------------------------------


def test_argv_of_each_kind_of_flow() -> None:
    assert Flow(V4, ip(CLUSTER_IP), 53, reply=target(A)).argv() == [
        "-D", "-f", "ipv4", "-p", "udp", "--orig-dst", "10.96.0.10", "--orig-port-dst", "53",
        "--reply-src", "10.244.1.5", "--reply-port-src", "5353",
    ]  # fmt: skip
    assert Flow(V4, None, NODE_PORT, reply=target(A)).argv() == [
        "-D", "-f", "ipv4", "-p", "udp", "--orig-port-dst", "30053",
        "--reply-src", "10.244.1.5", "--reply-port-src", "5353",
    ]  # fmt: skip
    assert Flow(V4, ip(CLUSTER_IP), 53).argv() == [
        "-D", "-f", "ipv4", "-p", "udp", "--orig-dst", "10.96.0.10", "--orig-port-dst", "53",
    ]  # fmt: skip
    v6 = Flow(IPFamily.V6, ip("fd00::10"), 53, reply=Target(ip("fd00:1::5"), 53))
    assert v6.argv()[:3] == ["-D", "-f", "ipv6"]
    assert str(v6) == "[fd00::10]:53 answered by [fd00:1::5]:53"
    with pytest.raises(ValueError, match="entry by entry"):
        Flow(V4, ip(CLUSTER_IP), 53, keep=frozenset({target(A)})).argv()


@pytest.mark.parametrize(
    "make",
    [
        lambda: Flow(V4, "10.96.0.10", 53),  # type: ignore[arg-type]
        lambda: Flow(V4, ip(CLUSTER_IP), 0),
        lambda: Flow(V4, ip(CLUSTER_IP), 65536),
        lambda: Flow(V4, ip(CLUSTER_IP), True),
        lambda: Flow(V4, ip(CLUSTER_IP), "53"),  # type: ignore[arg-type]
        lambda: Flow(V4, ip("fd00::10"), 53),
        lambda: Flow(V4, ip(CLUSTER_IP), 53, reply=Target(ip("fd00::5"), 53)),
        lambda: Flow(V4, ip(CLUSTER_IP), 53, reply=target(A), keep=frozenset({target(B)})),
        lambda: Target("10.244.1.5; reboot", 53),  # type: ignore[arg-type]
        lambda: Target(ip(A), -1),
        lambda: Flow("ipv4", ip(CLUSTER_IP), 53),  # type: ignore[arg-type]
    ],
)
def test_flows_are_made_of_validated_values_only(make: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        make()


LISTING = """\
udp      17 29 src=192.168.69.200 dst=10.96.0.10 sport=40053 dport=53 src=10.244.1.5 dst=192.168.69.200 sport=5353 dport=40053 mark=0 use=1
udp      17 12 src=10.20.30.1 dst=10.20.30.11 sport=5000 dport=30053 [UNREPLIED] src=10.244.2.6 dst=10.20.30.11 sport=5353 dport=60001 mark=0 use=1
udp      17 117 src=192.168.69.200 dst=10.96.0.10 sport=40054 dport=53 src=10.96.0.10 dst=192.168.69.200 sport=53 dport=40054 [ASSURED] mark=0 use=1
"""  # noqa: E501


def test_the_listing_is_read_into_entries() -> None:
    assert parse_entries(LISTING, V4) == [
        Entry(V4, ip(CLUSTER_IP), 53, target(A)),
        Entry(V4, ip("10.20.30.11"), NODE_PORT, target(B)),
        Entry(V4, ip(CLUSTER_IP), 53, Target(ip(CLUSTER_IP), 53)),
    ]
    assert parse_entries("", V4) == []


@pytest.mark.parametrize(
    "line",
    [
        "udp 17 29 src=1.2.3.4 dst=5.6.7.8 sport=1 dport=2",
        "udp 17 29 src=1.2.3.4 dst=5.6.7.8 sport=1 dport=2 src=x dst=1.2.3.4 sport=2 dport=1",
        "udp 17 29 src=1.2.3.4 dst=5.6.7.8 sport=1 dport=0 src=5.6.7.8 dst=1.2.3.4 sport=2 dport=1",
        "something else entirely",
    ],
)
def test_an_unreadable_listing_is_an_error_not_a_guess(line: str) -> None:
    with pytest.raises(ConntrackError, match="cannot read"):
        parse_entries(line + "\n", V4)


def test_a_flow_that_keeps_entries_becomes_one_flow_per_stale_reply_source() -> None:
    entries = parse_entries(LISTING, V4)
    keep_a = Flow(V4, ip(CLUSTER_IP), 53, keep=frozenset({target(A)}))
    node_port = Flow(V4, None, NODE_PORT, keep=frozenset({target(A)}))
    direct = Flow(V4, ip(EXTERNAL_IP), 53, reply=target(C))
    assert resolve([keep_a, node_port, direct], entries) == [
        Flow(V4, ip(CLUSTER_IP), 53, reply=Target(ip(CLUSTER_IP), 53)),  # never DNATed
        Flow(V4, None, NODE_PORT, reply=target(B)),
        direct,
    ]
    assert resolve([Flow(V4, ip(CLUSTER_IP), 53, keep=frozenset({target(A)}))], []) == []


# --- in the kernel: delete() removes exactly the stale entries --------------------------------

# Runs kpgen.dataplane.conntrack.delete in the namespace on the flows given as JSON; prints the
# count.
DELETE_SCRIPT = textwrap.dedent(
    """
    import ipaddress, json, sys
    from kpgen.dataplane.conntrack import Flow, Target, delete
    from kpgen.core.model import IPFamily

    def flow(spec):
        address = spec.get("address")
        reply = spec.get("reply")
        return Flow(
            IPFamily.V4,
            None if address is None else ipaddress.ip_address(address),
            spec["port"],
            reply=None if reply is None else Target(ipaddress.ip_address(reply[0]), reply[1]),
            keep=frozenset(Target(ipaddress.ip_address(a), p) for a, p in spec.get("keep", [])),
        )

    print(delete([flow(spec) for spec in json.load(sys.stdin)]))
    """
)


def in_namespace(namespace: str, argv: list[str], stdin: str | None = None) -> str:
    return kernel.output_of(namespace, argv, stdin)


def insert(namespace: str, client_port: int, dst: str, dport: int, reply: str, rport: int) -> None:
    """A UDP entry from 192.168.0.9:client_port to dst:dport, answered by reply:rport."""
    in_namespace(
        namespace,
        [
            kernel.tool("conntrack") or "conntrack",
            "-I", "-p", "udp", "-t", "120",
            "-s", "192.168.0.9", "-d", dst, "--sport", str(client_port), "--dport", str(dport),
            "-r", reply, "-q", "192.168.0.9",
            "--reply-port-src", str(rport), "--reply-port-dst", str(client_port),
        ],
    )  # fmt: skip


def remaining(namespace: str) -> list[int]:
    """The client ports of the UDP entries left."""
    listing = in_namespace(namespace, [kernel.tool("conntrack") or "conntrack", "-L", "-p", "udp"])
    return sorted(int(line.split("sport=")[1].split()[0]) for line in listing.splitlines())


def run_delete(namespace: str, flows: list[dict[str, Any]]) -> int:
    return int(in_namespace(namespace, [sys.executable, "-c", DELETE_SCRIPT], json.dumps(flows)))


needs_conntrack = pytest.mark.skipif(
    kernel.tool("conntrack") is None, reason="needs conntrack (apt-get install conntrack)"
)


@kernel.kernel
@needs_conntrack
def test_delete_removes_exactly_the_entries_of_its_flows() -> None:
    with kernel.netns() as ns:
        insert(ns, 1001, CLUSTER_IP, 53, A, 5353)  # to the removed endpoint: goes
        insert(ns, 1002, CLUSTER_IP, 53, B, 5353)  # to the one that stays
        insert(ns, 1003, CLUSTER_IP, 53, A, 5454)  # to the removed endpoint's other port
        insert(ns, 1004, EXTERNAL_IP, 53, A, 5353)  # another destination, another flow
        insert(ns, 1005, "10.20.30.11", NODE_PORT, A, 5353)  # the NodePort: goes
        insert(ns, 1006, "10.20.30.11", 30054, A, 5353)  # another NodePort
        insert(ns, 1007, "10.96.0.11", 53, "10.96.0.11", 53)  # un-NATed: the service gains A
        insert(ns, 1008, "10.96.0.11", 53, A, 5353)  # already sent to A: stays
        insert(ns, 1009, "10.96.0.12", 53, C, 5353)  # a service that is gone: goes
        assert remaining(ns) == list(range(1001, 1010))
        flows: list[dict[str, Any]] = [
            {"address": CLUSTER_IP, "port": 53, "reply": [A, 5353]},
            {"address": None, "port": NODE_PORT, "reply": [A, 5353]},
            {"address": "10.96.0.11", "port": 53, "keep": [[A, 5353]]},
            {"address": "10.96.0.12", "port": 53},
            {"address": "10.96.0.13", "port": 53, "reply": [A, 5353]},  # matches nothing
        ]
        assert run_delete(ns, flows) == 4
        assert remaining(ns) == [1002, 1003, 1004, 1006, 1008]
        assert run_delete(ns, flows) == 0  # nothing left to delete is no failure
        assert run_delete(ns, []) == 0


@kernel.kernel
@needs_conntrack
def test_delete_removes_the_entry_of_a_real_datagram_through_kpgen_rules() -> None:
    """kpgen's rules for a UDP ClusterIP with one endpoint (a dummy address) loaded in a
    namespace, one datagram through them: the DNATed entry is what the flow deletes."""
    documents = dns(A)
    text = "".join(render_plan(p, ProxyMode.NFTABLES) for p in plans(*documents))
    with kernel.netns() as ns:
        in_namespace(ns, ["ip", "link", "set", "lo", "up"])
        # a veth (no dummy driver everywhere) and a neighbour entry: the packet leaves
        in_namespace(ns, ["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"])
        in_namespace(ns, ["ip", "link", "set", "v0", "up"])
        in_namespace(ns, ["ip", "addr", "add", "10.244.0.1/16", "dev", "v0"])
        in_namespace(ns, ["ip", "neigh", "add", A, "lladdr", "02:00:00:00:00:01", "dev", "v0"])
        in_namespace(ns, ["ip", "route", "add", "default", "dev", "v0"])  # for the ClusterIP
        in_namespace(ns, [kernel.tool("nft") or "nft", "-f", "-"], text)
        send = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        send += f"s.bind(('0.0.0.0', 40053)); s.sendto(b'q', ('{CLUSTER_IP}', 53))"
        in_namespace(ns, [sys.executable, "-c", send])
        listing = in_namespace(ns, [kernel.tool("conntrack") or "conntrack", "-L", "-p", "udp"])
        (entry,) = parse_entries(listing, V4)
        assert entry == Entry(V4, ip(CLUSTER_IP), 53, target(A))
        after = plans(*dns(B))
        flows = stale_udp_flows(plans(*documents), after)
        specs = [
            {
                "address": None if f.address is None else str(f.address),
                "port": f.port,
                "reply": None if f.reply is None else [str(f.reply.address), f.reply.port],
            }
            for f in flows
        ]
        assert run_delete(ns, specs) == 1
        assert remaining(ns) == []


# --- the controller: after a successful sync, never failing it --------------------------------


class Loader:
    """Stands in for RuleLoader: loads nothing, fails when told to."""

    def __init__(self) -> None:
        self.fail = False

    def full(self, plans: Any) -> str:
        if self.fail:
            raise ApplyError("refused")
        return "loaded"

    def partial(self, plans: Any) -> int | None:
        if self.fail:
            raise ApplyError("refused")
        return 1

    def load_nft(self, plans: Any, tables: Any) -> None:
        self.full(plans)

    def change_nft(self, script: str, *, cached: bool = False) -> None:
        self.partial(script)

    def changed_since_written(self) -> None:
        return None


def sync_to(running: Controller, documents: list[dict[str, Any]]) -> None:
    """One sync of ``running`` to the cluster of ``documents``, through its store."""
    for kind in (SERVICE, SLICE, NODE):
        running.store.replace(kind, [d for d in documents if d["kind"] == kind])
    running.sync(running.store.take())


def controller(loader: Loader, delete_flows: Any) -> Controller:
    timing = Timing()
    store = Store((SERVICE, SLICE, NODE))
    return Controller(
        NodeConfig(hostname="node-a"),
        store,
        loader,  # type: ignore[arg-type]
        Metrics("nftables"),
        Health(timing),
        timing,
        delete_flows=delete_flows,
    )


def test_the_controller_deletes_stale_entries_after_each_successful_sync_only() -> None:
    calls: list[list[Flow]] = []

    def record(flows: Sequence[Flow]) -> int:
        calls.append(list(flows))
        return len(flows)

    loader = Loader()
    running = controller(loader, record)
    sync_to(running, dns(A))
    assert calls == [to_every_destination(keep=frozenset({target(A)}))]
    loader.fail = True
    with pytest.raises(ApplyError):
        sync_to(running, dns(B))
    assert len(calls) == 1  # the rules did not change: nothing is stale
    loader.fail = False
    sync_to(running, dns(B))  # compared with what was loaded last: A's entries go
    assert calls[1] == to_every_destination(reply=target(A))
    sync_to(running, dns(B))
    assert len(calls) == 2  # nothing changed: conntrack is not even run


def test_a_failure_to_delete_is_logged_and_the_sync_still_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def failing(flows: Any) -> int:
        raise ConntrackError("conntrack is not installed")

    running = controller(Loader(), failing)
    with caplog.at_level(logging.INFO, logger="kpgen.controller"):
        sync_to(running, dns(A))
        sync_to(running, dns(B))
    assert running.syncs == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["conntrack: stale UDP entries not deleted: conntrack is not installed"] * 2


def test_without_a_deleter_the_controller_touches_no_conntrack_entry() -> None:
    running = controller(Loader(), None)
    sync_to(running, dns(A))
    sync_to(running, dns(B))
    assert running.syncs == 2
