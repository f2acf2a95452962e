"""kpgen.core.plan.build_plan: joining services to their slices for one family and one node."""

from __future__ import annotations

import ipaddress
import random

from kpgen.core.model import (
    ClusterState,
    Endpoint,
    EndpointConditions,
    EndpointPort,
    EndpointSlice,
    IPFamily,
    ObjectRef,
    Protocol,
    Service,
    ServicePort,
    ServiceType,
    TrafficPolicy,
)
from kpgen.core.node import NodeConfig
from kpgen.core.plan import Backend, FamilyPlan, PortPlan, build_plan

ip = ipaddress.ip_address
TCP, UDP = Protocol.TCP, Protocol.UDP
HOSTNAME = "worker-1"


def svc(
    name: str,
    *ports: ServicePort,
    cluster_ips: tuple[str, ...] = ("10.96.0.10",),
    namespace: str = "default",
    external_ips: tuple[str, ...] = (),
    load_balancer_ips: tuple[str, ...] = (),
    **fields: object,
) -> Service:
    """A Service model; one unnamed TCP port 80 unless ``ports`` are given."""
    return Service(
        ref=ObjectRef(namespace, name),
        type=fields.pop("type", ServiceType.CLUSTER_IP),
        cluster_ips=tuple(ip(a) for a in cluster_ips),
        ports=ports or (ServicePort("", TCP, 80),),
        external_ips=tuple(ip(a) for a in external_ips),
        load_balancer_ips=tuple(ip(a) for a in load_balancer_ips),
        **fields,
    )


def ep(address: str, ready: bool | None = None, node: str | None = None, **conditions) -> Endpoint:
    return Endpoint(ip(address), EndpointConditions(ready=ready, **conditions), node_name=node)


def slc(
    name: str,
    service: str,
    *endpoints: Endpoint,
    ports: tuple[EndpointPort, ...] = (EndpointPort("", TCP, 8080),),
    family: IPFamily = IPFamily.V4,
    namespace: str = "default",
) -> EndpointSlice:
    return EndpointSlice(
        ref=ObjectRef(namespace, name),
        service=ObjectRef(namespace, service),
        family=family,
        ports=ports,
        endpoints=endpoints,
    )


def plan_of(
    *objects: Service | EndpointSlice,
    node: NodeConfig | None = None,
    family: IPFamily = IPFamily.V4,
) -> FamilyPlan:
    state = ClusterState(
        services=tuple(o for o in objects if isinstance(o, Service)),
        slices=tuple(o for o in objects if isinstance(o, EndpointSlice)),
    )
    return build_plan(state, node or NodeConfig(hostname=HOSTNAME), family)


def only_port(plan: FamilyPlan) -> PortPlan:
    (port,) = plan.ports
    return port


def addresses(port: PortPlan) -> list[str]:
    return [str(b.address) for b in port.endpoints]


# --- endpoints --------------------------------------------------------------------------------


def test_endpoints_of_several_slices_of_one_service_are_merged_without_duplicates():
    plan = plan_of(
        svc("web"),
        slc("web-1", "web", ep("10.244.1.2"), ep("10.244.1.1")),
        slc("web-2", "web", ep("10.244.1.2"), ep("10.244.1.3")),
    )
    assert only_port(plan).endpoints == (
        Backend(ip("10.244.1.1"), 8080),
        Backend(ip("10.244.1.2"), 8080),
        Backend(ip("10.244.1.3"), 8080),
    )


def test_service_port_takes_the_port_number_of_the_slice_port_with_its_name_and_protocol():
    plan = plan_of(
        svc("web", ServicePort("https", TCP, 443), ServicePort("dns", UDP, 53)),
        slc(
            "web-1",
            "web",
            ep("10.244.1.1"),
            ports=(
                EndpointPort("http", TCP, 8080),
                EndpointPort("https", UDP, 9443),
                EndpointPort("https", TCP, 8443),
                EndpointPort("dns", TCP, 5300),
                EndpointPort("dns", UDP, 5353),
            ),
        ),
    )
    targets = {(p.port.name, p.port.port): [b.port for b in p.endpoints] for p in plan.ports}
    assert targets == {("https", 443): [8443], ("dns", 53): [5353]}


def test_slice_port_with_the_same_name_but_another_protocol_gives_no_endpoint():
    plan = plan_of(
        svc("web", ServicePort("https", TCP, 443)),
        slc("web-1", "web", ep("10.244.1.1"), ports=(EndpointPort("https", UDP, 8443),)),
    )
    assert only_port(plan).endpoints == ()


def test_slice_port_without_a_port_number_gives_no_endpoint():
    plan = plan_of(
        svc("web"), slc("web-1", "web", ep("10.244.1.1"), ports=(EndpointPort("", TCP, None),))
    )
    assert only_port(plan).endpoints == ()


def test_slices_may_resolve_one_port_to_different_targets():
    plan = plan_of(
        svc("web"),
        slc("web-1", "web", ep("10.244.1.1"), ports=(EndpointPort("", TCP, 8080),)),
        slc("web-2", "web", ep("10.244.1.2"), ports=(EndpointPort("", TCP, 9090),)),
    )
    assert only_port(plan).endpoints == (
        Backend(ip("10.244.1.1"), 8080),
        Backend(ip("10.244.1.2"), 9090),
    )


def test_endpoints_not_ready_are_unused_and_endpoints_without_ready_are_used():
    plan = plan_of(
        svc("web"),
        slc(
            "web-1",
            "web",
            ep("10.244.1.1", ready=True),
            ep("10.244.1.2", ready=False),
            ep("10.244.1.3", ready=None),
        ),
    )
    assert addresses(only_port(plan)) == ["10.244.1.1", "10.244.1.3"]


def test_ipv6_slices_are_not_used_for_the_ipv4_plan():
    dual = svc("web", cluster_ips=("10.96.0.10", "fd00:96::10"))
    v4_slice = slc("web-v4", "web", ep("10.244.1.1"))
    v6_slice = slc("web-v6", "web", ep("fd00:244::1"), family=IPFamily.V6)
    v4 = plan_of(dual, v4_slice, v6_slice, family=IPFamily.V4)
    v6 = plan_of(dual, v4_slice, v6_slice, family=IPFamily.V6)
    assert (str(only_port(v4).cluster_ip), addresses(only_port(v4))) == (
        "10.96.0.10",
        ["10.244.1.1"],
    )
    assert (str(only_port(v6).cluster_ip), addresses(only_port(v6))) == (
        "fd00:96::10",
        ["fd00:244::1"],
    )


def test_ipv4_service_with_only_ipv6_slices_is_unserved():
    plan = plan_of(svc("web"), slc("web-v6", "web", ep("fd00:244::1"), family=IPFamily.V6))
    assert [p.key for p in plan.unserved] == ["default/web/tcp/80"]


def test_service_without_a_cluster_ip_of_the_family_is_not_in_that_plan():
    plan = plan_of(svc("v6-only", cluster_ips=("fd00:96::10",)), svc("web"))
    assert [p.key for p in plan.ports] == ["default/web/tcp/80"]


def test_slices_of_another_service_or_namespace_are_not_used():
    plan = plan_of(
        svc("web"),
        slc("api-1", "api", ep("10.244.1.1")),
        slc("web-1", "web", ep("10.244.2.2"), namespace="shop"),
    )
    assert only_port(plan).endpoints == ()


def test_endpoint_is_local_exactly_when_its_node_name_is_the_hostname():
    plan = plan_of(
        svc("web"),
        slc(
            "web-1",
            "web",
            ep("10.244.1.1", node=HOSTNAME),
            ep("10.244.1.2", node="worker-2"),
            ep("10.244.1.3", node="worker-10"),
            ep("10.244.1.4"),
        ),
    )
    assert only_port(plan).endpoints == (
        Backend(ip("10.244.1.1"), 8080, HOSTNAME, True),
        Backend(ip("10.244.1.2"), 8080, "worker-2", False),
        Backend(ip("10.244.1.3"), 8080, "worker-10", False),
        Backend(ip("10.244.1.4"), 8080, None, False),
    )


def test_same_endpoints_are_local_on_their_own_node_only():
    objects = (svc("web"), slc("web-1", "web", ep("10.244.1.1", node="worker-2")))
    here = only_port(plan_of(*objects, node=NodeConfig(hostname="worker-2")))
    there = only_port(plan_of(*objects, node=NodeConfig(hostname=HOSTNAME)))
    assert [b.is_local for b in here.endpoints] == [True]
    assert [b.is_local for b in there.endpoints] == [False]


def test_service_ports_without_usable_endpoints_are_unserved():
    plan = plan_of(
        svc("all-not-ready", cluster_ips=("10.96.0.1",)),
        svc("no-slice", cluster_ips=("10.96.0.2",)),
        svc(
            "served",
            ServicePort("http", TCP, 80),
            ServicePort("metrics", TCP, 9100),
            cluster_ips=("10.96.0.3",),
        ),
        slc("all-not-ready-1", "all-not-ready", ep("10.244.1.1", ready=False)),
        slc("served-1", "served", ep("10.244.1.2"), ports=(EndpointPort("http", TCP, 8080),)),
    )
    assert [p.key for p in plan.unserved] == [
        "default/all-not-ready/tcp/80",
        "default/no-slice/tcp/80",
        "default/served/tcp/9100",
    ]
    assert [p.key for p in plan.served] == ["default/served/tcp/80"]


# --- addresses ----------------------------------------------------------------------------------


def test_external_ip_equal_to_the_cluster_ip_is_not_listed_as_external():
    port = only_port(
        plan_of(
            svc(
                "web",
                cluster_ips=("10.96.0.10",),
                external_ips=("10.96.0.10", "203.0.113.1"),
                load_balancer_ips=("203.0.113.1", "203.0.113.2"),
            )
        )
    )
    assert port.external_addresses == (ip("203.0.113.1"), ip("203.0.113.2"))
    assert port.has_external is True


def test_service_whose_only_external_ip_is_its_cluster_ip_has_no_external_address():
    port = only_port(plan_of(svc("web", cluster_ips=("10.96.0.10",), external_ips=("10.96.0.10",))))
    assert port.external_addresses == ()
    assert port.has_external is False


def test_node_port_makes_a_port_external():
    port = only_port(
        plan_of(svc("web", ServicePort("", TCP, 80, 30080), type=ServiceType.NODE_PORT))
    )
    assert port.external_addresses == ()
    assert port.has_external is True


def test_external_addresses_of_the_other_family_are_left_out():
    port = only_port(
        plan_of(svc("web", external_ips=("fd00::1", "203.0.113.1"), load_balancer_ips=("fd00::2",)))
    )
    assert port.external_ips == (ip("203.0.113.1"),)
    assert port.load_balancer_ips == ()


def test_port_plan_key_and_port_name_follow_kube_proxy_spelling():
    plan = plan_of(
        svc("web", ServicePort("https", TCP, 443), ServicePort("dns", UDP, 53), namespace="shop")
    )
    assert [(p.key, p.port_name) for p in plan.ports] == [
        ("shop/web/tcp/443", "shop/web:https"),
        ("shop/web/udp/53", "shop/web:dns"),
    ]
    unnamed = only_port(plan_of(svc("api")))
    assert (unnamed.key, unnamed.port_name) == ("default/api/tcp/80", "default/api")


# --- node settings and determinism --------------------------------------------------------------


def test_plan_carries_the_node_settings_of_its_family():
    node = NodeConfig(
        hostname=HOSTNAME,
        cluster_cidrs=(
            ipaddress.ip_network("192.168.0.0/16"),
            ipaddress.ip_network("fd00:10::/56"),
        ),
        masquerade_all=True,
        nodeport_primary=True,
        node_ips=(ip("10.20.30.11"), ip("fd00:20::11")),
    )
    plan = plan_of(svc("web"), node=node)
    assert plan.family is IPFamily.V4
    assert plan.cluster_cidrs == (ipaddress.ip_network("192.168.0.0/16"),)
    assert plan.masquerade_all is True
    assert plan.masquerade_mark == 0x4000
    assert plan.nodeport_networks == (ipaddress.ip_network("10.20.30.11/32"),)


def test_default_node_answers_node_ports_on_every_local_address():
    assert plan_of(svc("web")).nodeport_networks is None


def test_hairpin_addresses_are_every_endpoint_address_once_sorted():
    plan = plan_of(
        svc("a", cluster_ips=("10.96.0.1",)),
        svc("b", ServicePort("x", TCP, 80), ServicePort("y", TCP, 81), cluster_ips=("10.96.0.2",)),
        slc("a-1", "a", ep("10.244.1.20"), ep("10.244.1.3")),
        slc(
            "b-1",
            "b",
            ep("10.244.1.3"),
            ports=(EndpointPort("x", TCP, 8080), EndpointPort("y", TCP, 8081)),
        ),
    )
    assert plan.hairpin_addresses == (ip("10.244.1.3"), ip("10.244.1.20"))


def test_ports_are_ordered_by_service_then_protocol_then_port_whatever_the_input_order():
    services = [
        svc(
            "b",
            ServicePort("z", UDP, 53),
            ServicePort("y", TCP, 8080),
            ServicePort("x", TCP, 443),
            cluster_ips=("10.96.0.2",),
        ),
        svc("a", cluster_ips=("10.96.0.1",), namespace="zz"),
        svc("a", cluster_ips=("10.96.0.3",)),
    ]
    slices = [
        slc("a-2", "a", ep("10.244.1.9"), ep("10.244.1.10")),
        slc("a-1", "a", ep("10.244.1.2"), ep("10.244.1.10")),
    ]
    expected_keys = [
        "default/a/tcp/80",
        "default/b/tcp/443",
        "default/b/tcp/8080",
        "default/b/udp/53",
        "zz/a/tcp/80",
    ]
    first = plan_of(*services, *slices)
    assert [p.key for p in first.ports] == expected_keys
    assert addresses(first.ports[0]) == ["10.244.1.2", "10.244.1.9", "10.244.1.10"]
    shuffler = random.Random(7)
    for _ in range(10):
        shuffler.shuffle(services)
        shuffler.shuffle(slices)
        assert plan_of(*services, *slices) == first


# --- traffic policies and terminating endpoints (issue 5) ----------------------------------------


def test_serving_terminating_endpoints_are_used_when_no_endpoint_is_ready():
    plan = plan_of(
        svc("web"),
        slc(
            "web-1",
            "web",
            ep("10.244.1.1", ready=False, serving=True, terminating=True),
            ep("10.244.1.2", ready=False, serving=False, terminating=True),
        ),
    )
    assert addresses(only_port(plan)) == ["10.244.1.1"]


def test_internal_traffic_policy_local_uses_only_this_nodes_endpoints():
    plan = plan_of(
        svc("web", internal_traffic_policy=TrafficPolicy.LOCAL),
        slc("web-1", "web", ep("10.244.1.1", node=HOSTNAME), ep("10.244.2.1", node="worker-2")),
    )
    port = only_port(plan)
    assert port.internal_local
    assert [str(b.address) for b in port.local_endpoints] == ["10.244.1.1"]
    assert not port.drops_internal
