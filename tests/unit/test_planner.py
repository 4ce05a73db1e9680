from __future__ import annotations

import dataclasses
import json
import random
import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from ovs.flow.ofp import OFPFlow

from statelesslb.nb.model import (
    EXT_ACTIVE,
    EXT_BUCKETS,
    EXT_DRAIN,
    EXT_VIP_IDS,
    PERSISTENCE_OPTION,
    NbView,
    SbPortBinding,
    SbView,
    Snapshot,
)
from statelesslb.plan.planner import plan
from statelesslb.plan.specs import COOKIE_MASK, GROUP_FIELDS, FlowSpec, GroupSpec, Plan, PlanConfig

from .factories import TABLES, Topo, basic_topo

# The brief's allowed alphabet for a bundle line, minus whitespace other than
# the separating spaces (a newline would start a second command).
STRICT_LINE = re.compile(r"^[a-z_ ]+ [A-Za-z0-9_=,.:()\[\]/>+\-]*\Z")
GROUP_BASE = PlanConfig().group_id_base
# Per TCP backend without second chance: DNAT, reply, and 6 flows of the ownership record.
BACKEND_FLOWS = 8
DEFAULT_FIELDS_V4_TCP = "fields(ip_src=0.0.0.255,ip_dst,nw_proto,tcp_src=62,tcp_dst)"


def lines_of(result: Plan) -> list[str]:
    lines = [flow.add_line() for flow in result.flows.values()]
    lines += [flow.delete_line() for flow in result.flows.values()]
    for group in result.groups.values():
        lines += group.add_lines()
        lines.append(group.delete_line())
        for bucket_id in group.buckets:
            lines.append(group.insert_bucket_line(bucket_id))
            lines.append(group.remove_bucket_line(bucket_id))
    return lines


def lb_flows(result: Plan) -> list[FlowSpec]:
    return [f for c, f in result.flows.items() if c != result.sentinel_cookie]


def as_dump(flow: FlowSpec) -> OFPFlow:
    """Parse a flow the way `ovs-ofctl dump-flows` prints it (checks our syntax)."""
    match = f",{flow.match}" if flow.match else ""
    return OFPFlow(f" cookie={flow.cookie:#x}, table={flow.table}, "
                   f"priority={flow.priority}{match} actions={flow.actions}")


def planned(topo, chassis: str) -> Plan:
    return plan(topo.snapshot(chassis), PlanConfig())


@pytest.fixture
def topo():
    topology = basic_topo()
    topology.assign_ids()
    return topology


# -- roles ------------------------------------------------------------------------


def test_gateway_chassis_gets_the_vip_flow_and_group(topo):
    result = planned(topo, "gw1")
    [flow] = lb_flows(result)
    assert re.fullmatch(
        r"flow add table=13,priority=1000,cookie=0x51b0[0-9a-f]{12},tcp,reg14=0x1,metadata=0x3,"
        r"nw_dst=172\.16\.0\.100,tp_dst=80,actions=group:1879048193", flow.add_line())
    assert flow.delete_line() == f"flow delete cookie={flow.cookie:#x}/-1"
    [group] = result.groups.values()
    # The default hash classes: 8 low bits of the client's address, 5 of its port.
    assert group.group_id == 0x70000001
    assert group.fields == DEFAULT_FIELDS_V4_TCP
    assert dict(group.buckets) == {
        1: "set_field:00:00:00:00:ff:02->eth_src,set_field:50:54:00:00:00:01->eth_dst,"
           "dec_ttl,set_field:0x2->reg15,resubmit(,37)",
        2: "set_field:00:00:00:00:ff:02->eth_src,set_field:50:54:00:00:00:02->eth_dst,"
           "dec_ttl,set_field:0x2->reg15,resubmit(,37)",
    }
    assert group.add_lines() == [
        "group add group_id=1879048193,type=select,selection_method=hash,"
        "fields(ip_src=0.0.0.255,ip_dst,nw_proto,tcp_src=62,tcp_dst),"
        "bucket=bucket_id:1,weight:100,actions=set_field:00:00:00:00:ff:02->eth_src,"
        "set_field:50:54:00:00:00:01->eth_dst,dec_ttl,set_field:0x2->reg15,resubmit(,37),"
        "bucket=bucket_id:2,weight:100,actions=set_field:00:00:00:00:ff:02->eth_src,"
        "set_field:50:54:00:00:00:02->eth_dst,dec_ttl,set_field:0x2->reg15,resubmit(,37)"
    ]
    status = result.lb_status["uuid-lb-lb0"]
    assert (status.name, status.state, status.message) == ("lb0", "ok", "")
    assert (status.roles, status.vip_keys) == (("gateway",), ("172.16.0.100:80",))


def test_backend_chassis_gets_dnat_and_reply_flows(topo):
    result = planned(topo, "hv1")
    assert result.groups == {}
    lines = sorted(f.add_line() for f in lb_flows(result))
    to_vm1 = "tcp,reg15=0x2,metadata=0x1,nw_dst=10.0.0.11,tp_dst=8080"
    from_vm1 = "tcp,reg14=0x2,metadata=0x1,nw_src=10.0.0.11,tp_src=8080"
    assert [re.sub(r"cookie=0x[0-9a-f]+", "cookie=C", line) for line in lines] == [
        # The ownership record (backend_zone 64001, tables 204 and 205).
        f"flow add table=204,priority=100,cookie=C,{to_vm1},"
        "actions=ct(zone=64001),resubmit(,43)",
        f"flow add table=204,priority=200,cookie=C,{to_vm1},tcp_flags=+syn-ack,"
        "actions=ct(commit,zone=64001,exec(set_field:0/0x1->ct_mark)),resubmit(,43)",
        f"flow add table=205,priority=100,cookie=C,{from_vm1},"
        "actions=ct(table=10,zone=NXM_NX_REG13[0..15],nat)",
        f"flow add table=205,priority=200,cookie=C,ct_state=+trk,ct_mark=0x1/0x1,"
        f"{from_vm1},actions=resubmit(,10)",
        f"flow add table=42,priority=1000,cookie=C,ct_state=-trk,{to_vm1},"
        "actions=ct(table=42,zone=64001)",
        # The stateless DNAT, on to the record.
        "flow add table=42,priority=1000,cookie=C,tcp,reg15=0x2,metadata=0x1,"
        "nw_dst=172.16.0.100,tp_dst=80,"
        "actions=ct(commit,table=204,zone=NXM_NX_REG13[0..15],nat(dst=10.0.0.11:8080))",
        f"flow add table=42,priority=1001,cookie=C,ct_state=-trk,{to_vm1},tcp_flags=+syn-ack,"
        "actions=ct(commit,table=42,zone=64001,exec(set_field:0x1/0x1->ct_mark))",
        # Replies: the record first.
        f"flow add table=9,priority=1000,cookie=C,{from_vm1},actions=ct(table=205,zone=64001)",
    ]
    status = result.lb_status["uuid-lb-lb0"]
    assert (status.state, status.roles, status.vip_keys) == (
        "ok", ("backend",), ("172.16.0.100:80",))


def test_chassis_with_both_roles(topo):
    binding = topo.port_bindings["vm1"]
    topo.port_bindings["vm1"] = dataclasses.replace(binding, chassis="gw1")
    result = planned(topo, "gw1")
    # The gateway flow, and vm1's DNAT, reply and ownership-record flows.
    assert len(result.groups) == 1 and len(lb_flows(result)) == 1 + BACKEND_FLOWS
    assert result.lb_status["uuid-lb-lb0"].roles == ("backend", "gateway")


def test_uninvolved_chassis_gets_only_the_sentinel(topo):
    result = planned(topo, "hv9")
    assert list(result.flows) == [result.sentinel_cookie]
    sentinel = result.flows[result.sentinel_cookie]
    assert re.fullmatch(r"flow add table=250,priority=0,cookie=0x51b0[0-9a-f]{12},actions=drop",
                        sentinel.add_line())
    assert result.groups == {}
    status = result.lb_status["uuid-lb-lb0"]
    assert (status.state, status.roles, status.vip_keys) == ("ok", (), ())


def test_sentinel_exists_without_any_lb():
    result = plan(basic_topo(with_lb=False).snapshot("gw1"))
    assert list(result.flows) == [result.sentinel_cookie] and result.lb_status == {}


def test_ipv6_udp_matches():
    topo = basic_topo(with_lb=False)
    topo.add_lb("lb6", {"[fd00::100]:53": "[fd00::11]:5353"}, protocol="udp")
    topo.assign_ids()
    [gateway] = lb_flows(planned(topo, "gw1"))
    assert gateway.match == "udp6,reg14=0x1,metadata=0x3,ipv6_dst=fd00::100,tp_dst=53"
    flows = {(f.table, f.priority, f.match): f.actions for f in lb_flows(planned(topo, "hv1"))}
    to_b = "udp6,reg15=0x2,metadata=0x1,ipv6_dst=fd00::11,tp_dst=5353"
    from_b = "udp6,reg14=0x2,metadata=0x1,ipv6_src=fd00::11,tp_src=5353"
    # No SYN to go by: every packet of either path claims the tuple (one flow each).
    assert flows == {
        (42, 1000, "udp6,reg15=0x2,metadata=0x1,ipv6_dst=fd00::100,tp_dst=53"):
            "ct(commit,table=204,zone=NXM_NX_REG13[0..15],nat(dst=[fd00::11]:5353))",
        (204, 100, to_b):
            "ct(commit,zone=64001,exec(set_field:0/0x1->ct_mark)),resubmit(,43)",
        (42, 1000, f"ct_state=-trk,{to_b}"):
            "ct(commit,table=42,zone=64001,exec(set_field:0x1/0x1->ct_mark))",
        (9, 1000, from_b): "ct(table=205,zone=64001)",
        (205, 200, f"ct_state=+trk,ct_mark=0x1/0x1,{from_b}"): "resubmit(,10)",
        (205, 100, from_b): "ct(table=10,zone=NXM_NX_REG13[0..15],nat)",
    }
    for flow in [gateway, *lb_flows(planned(topo, "hv1"))]:
        parsed = as_dump(flow)
        assert parsed.info["table"] == flow.table and parsed.match["udp6"] is True


def test_every_rendered_flow_parses_as_an_ovs_flow(topo):
    for chassis in ("gw1", "hv1", "hv2"):
        for flow in planned(topo, chassis).flows.values():
            parsed = as_dump(flow)
            assert parsed.info["cookie"] == flow.cookie
            assert parsed.actions


# -- drain, dedupe, several DGPs ----------------------------------------------------


def _with_persistence(topo, persistence: str) -> None:
    lb = topo.lb("lb0")
    topo.update_lb("lb0", options={**lb.options, PERSISTENCE_OPTION: persistence})
    topo.assign_ids()


@pytest.mark.parametrize("persistence", ["hash", "second-chance"])
def test_drained_backend_loses_its_bucket_but_keeps_its_dnat_flows(topo, persistence):
    _with_persistence(topo, persistence)
    ext = dict(topo.lb("lb0").external_ids)
    ext[EXT_DRAIN] = '["10.0.0.11:8080"]'
    topo.update_lb("lb0", external_ids=ext)
    [group] = planned(topo, "gw1").groups.values()
    if persistence == "second-chance":
        # The gateways follow the NB writer's active set, not the raw drain list.
        assert list(group.buckets) == [1, 2]
        topo.assign_ids()
        [group] = planned(topo, "gw1").groups.values()
    else:
        # No active set: the drain takes effect without waiting for the NB writer.
        assert EXT_ACTIVE not in topo.lb("lb0").external_ids
    assert list(group.buckets) == [2]
    topo.assign_ids()
    [group] = planned(topo, "gw1").groups.values()
    assert list(group.buckets) == [2]
    hv1 = lb_flows(planned(topo, "hv1"))
    assert any("nat(dst=10.0.0.11:8080)" in f.actions for f in hv1)
    if persistence == "hash":   # (second chance adds the previous set's flows)
        assert len(hv1) == BACKEND_FLOWS


def test_all_backends_drained_leaves_an_empty_group(topo):
    ext = dict(topo.lb("lb0").external_ids)
    ext[EXT_DRAIN] = '["10.0.0.11:8080", "10.0.0.12:8080"]'
    topo.update_lb("lb0", external_ids=ext)
    topo.assign_ids()
    [group] = planned(topo, "gw1").groups.values()
    assert dict(group.buckets) == {}
    assert group.add_lines() == [
        "group add group_id=1879048193,type=select,selection_method=hash,"
        + DEFAULT_FIELDS_V4_TCP]


def test_two_vips_sharing_a_backend_share_one_reply_flow():
    topo = basic_topo(with_lb=False)
    topo.add_lb("lb0", {"172.16.0.100:80": "10.0.0.11:8080",
                        "172.16.0.101:80": "10.0.0.11:8080"})
    topo.add_lb("lb1", {"172.16.0.102:80": "10.0.0.11:8080"})
    topo.assign_ids()
    result = planned(topo, "hv1")
    by_table: dict[int, list[FlowSpec]] = {}
    for flow in lb_flows(result):
        by_table.setdefault(flow.table, []).append(flow)
    # Three DNAT flows; one reply flow and one ownership record for the one backend.
    assert len(by_table[42]) == 3 + 2 and len(by_table[9]) == 1
    assert len(by_table[204]) == 2 and len(by_table[205]) == 2
    assert result.lb_status["uuid-lb-lb1"].state == "ok"


def test_every_resident_dgp_gets_flows_but_the_group_is_planned_once():
    topo = Topo()
    topo.add_router("lr0", 3, {"lr0-public": "gw1", "lr0-public2": "gw1", "lr0-public3": "gw2"})
    topo.add_switch("ls0", 1)
    topo.add_vif("ls0", "vm1", "50:54:00:00:00:01", "10.0.0.11", "hv1")
    topo.add_lb("lb0", {"172.16.0.100:80": "10.0.0.11:8080"})
    topo.assign_ids()
    result = planned(topo, "gw1")
    assert sorted(f.match.split(",")[1] for f in lb_flows(result)) == ["reg14=0x1", "reg14=0x2"]
    assert len(result.groups) == 1
    assert len(lb_flows(planned(topo, "gw2"))) == 1


# -- pending and errors ---------------------------------------------------------------


def test_lb_without_ids_is_pending_and_plans_nothing():
    topo = basic_topo()
    result = planned(topo, "gw1")
    status = result.lb_status["uuid-lb-lb0"]
    assert status.state == "pending"
    assert status.message == ("ids not yet assigned by the NB writer for 172.16.0.100:80, "
                              "10.0.0.11:8080, 10.0.0.12:8080")
    assert lb_flows(result) == [] and result.groups == {}


def test_a_stale_active_set_is_not_in_force_without_second_chance(topo):
    # An older NB writer, or second chance just turned off: the row still holds an
    # active set, with vm2 only. Plain hashing uses the backends the NB lists.
    stale = '{"172.16.0.100:80":{"10.0.0.12:8080":[2,"50:54:00:00:00:02","vm2"]}}'
    topo.update_lb("lb0", external_ids={**topo.lb("lb0").external_ids, EXT_ACTIVE: stale})
    [group] = planned(topo, "gw1").groups.values()
    assert list(group.buckets) == [1, 2]
    lb = topo.lb("lb0")
    topo.update_lb("lb0", options={**lb.options, PERSISTENCE_OPTION: "second-chance"})
    [group] = planned(topo, "gw1").groups.values()
    assert list(group.buckets) == [2]


@pytest.mark.parametrize("persistence", ["hash", "second-chance"])
def test_new_backend_without_bucket_id_is_pending_and_the_others_keep_serving(
        topo, persistence):
    _with_persistence(topo, persistence)
    before_gw, before_hv1 = planned(topo, "gw1"), planned(topo, "hv1")
    topo.add_vif("ls0", "vm3", "50:54:00:00:00:03", "10.0.0.13", "hv1")
    topo.update_lb("lb0", vips={"172.16.0.100:80": "10.0.0.11:8080,10.0.0.13:8080"})
    gw, hv1 = planned(topo, "gw1"), planned(topo, "hv1")
    for result in (gw, hv1):
        status = result.lb_status["uuid-lb-lb0"]
        assert (status.state, status.message) == (
            "pending", "ids not yet assigned by the NB writer for 10.0.0.13:8080 "
            "(the other backends are served)")
    # vm1 (10.0.0.11) keeps its bucket and its flows: taking them away until the NB
    # writer catches up reset its connections (seen in the sandbox).
    buckets = json.loads(topo.lb("lb0").external_ids[EXT_BUCKETS])
    vm1_bucket, vm2_bucket = buckets["10.0.0.11:8080"], buckets["10.0.0.12:8080"]
    if persistence == "second-chance":
        # The gateway's group stays what the NB writer's active set says until it
        # moves it: vm2 too, though the NB no longer lists it.
        assert gw.groups == before_gw.groups
    else:
        # Without an active set the group is the listed backends that have ids: vm2
        # leaves at once, vm3 waits for its id.
        assert all(vm2_bucket not in g.buckets for g in gw.groups.values())
        assert all(list(g.buckets) == [vm1_bucket] for g in gw.groups.values())
    assert all(vm1_bucket in g.buckets for g in gw.groups.values())
    assert any("nat(dst=10.0.0.11:8080)" in f.actions for f in lb_flows(hv1))
    assert {f.key for f in lb_flows(before_hv1)} <= {f.key for f in lb_flows(hv1)}
    # An LB none of whose backends has an id yet plans nothing.
    topo.update_lb("lb0", vips={"172.16.0.100:80": "10.0.0.13:8080"})
    result = planned(topo, "gw1")
    assert result.lb_status["uuid-lb-lb0"].state == "pending"
    assert lb_flows(result) == [] and result.groups == {}


@pytest.mark.parametrize("ext, state, message", [
    ({EXT_BUCKETS: "{bad"}, "pending", "stored ids are malformed"),
    ({EXT_VIP_IDS: '{"172.16.0.100:80": 268435456}'}, "error",
     "VIP id 268435456 of 172.16.0.100:80 is above 0xfffffff"),
    ({EXT_BUCKETS: '{"10.0.0.11:8080": 4294967041, "10.0.0.12:8080": 2}'}, "error",
     "bucket id 4294967041 of 10.0.0.11:8080 is above 0xffffff00"),
    ({EXT_BUCKETS: '{"10.0.0.11:8080": 2, "10.0.0.12:8080": 2}'}, "pending",
     "stored ids repeat"),
])
def test_unusable_ids(topo, ext, state, message):
    topo.update_lb("lb0", external_ids={**topo.lb("lb0").external_ids, **ext})
    result = planned(topo, "gw1")
    status = result.lb_status["uuid-lb-lb0"]
    assert status.state == state and message in status.message
    assert lb_flows(result) == [] and result.groups == {}


def test_invalid_lb_is_an_error_and_plans_nothing(topo):
    topo.update_lb("lb0", protocol="sctp")
    result = planned(topo, "gw1")
    status = result.lb_status["uuid-lb-lb0"]
    assert status.state == "error" and "sctp" in status.message
    assert lb_flows(result) == []


def test_unmarked_lbs_are_ignored(topo):
    topo.update_lb("lb0", options={})
    result = planned(topo, "gw1")
    assert result.lb_status == {} and lb_flows(result) == []


@pytest.mark.parametrize("missing, chassis, reason", [
    ("datapath:uuid-lr-lr0", "gw1", "no SB datapath for router lr0 yet"),
    ("binding:cr-lr0-public", "gw1", "no SB port binding cr-lr0-public yet"),
    ("binding:lr0-public", "gw1", "no usable SB port binding for gateway port lr0-public yet"),
    ("binding:lr0-ls0", "gw1", "no usable SB port binding for router port lr0-ls0 yet"),
    ("binding:vm1", "hv2", "no usable SB port binding for backend port vm1 yet"),
    ("datapath:uuid-ls-ls0", "hv1", "no usable SB datapath for the switch of vm1 yet"),
])
def test_missing_sb_data_is_pending_never_a_key_error(topo, missing, chassis, reason):
    kind, name = missing.split(":")
    (topo.datapath_keys if kind == "datapath" else topo.port_bindings).pop(name)
    status = planned(topo, chassis).lb_status["uuid-lb-lb0"]
    assert status.state == "pending" and reason in status.message


@pytest.mark.parametrize("port, what", [
    ("lr0-public", "gateway port"),
    ("lr0-ls0", "router port"),
])
def test_router_side_binding_on_another_datapath_is_pending(topo, port, what):
    # Its tunnel key means nothing on the router's datapath (a stale or reused name).
    topo.port_bindings[port] = dataclasses.replace(
        topo.port_bindings[port], datapath_key=topo.datapath_keys["uuid-ls-ls0"])
    result = planned(topo, "gw1")
    status = result.lb_status["uuid-lb-lb0"]
    assert status.state == "pending"
    assert f"no usable SB port binding for {what} {port} yet" in status.message
    assert lb_flows(result) == [] and result.groups == {}


def test_missing_backend_binding_skips_only_that_backend(topo):
    topo.port_bindings.pop("vm1")
    result = planned(topo, "hv2")
    assert len(lb_flows(result)) == BACKEND_FLOWS    # vm2's flows are still planned
    assert result.lb_status["uuid-lb-lb0"].roles == ("backend",)


def test_missing_router_port_binding_skips_the_whole_gateway_part(topo):
    topo.port_bindings.pop("lr0-ls0")
    result = planned(topo, "gw1")
    assert lb_flows(result) == [] and result.groups == {}


def test_malformed_sb_values_are_treated_as_missing(topo):
    binding = topo.port_bindings["vm1"]
    topo.port_bindings["vm1"] = dataclasses.replace(binding, tunnel_key="2")
    topo.datapath_keys["uuid-lr-lr0"] = True
    assert planned(topo, "hv1").lb_status["uuid-lb-lb0"].state == "pending"
    assert planned(topo, "gw1").lb_status["uuid-lb-lb0"].state == "pending"


def test_same_vip_on_the_same_router_conflicts_and_the_later_lb_loses():
    topo = basic_topo(with_lb=False)
    topo.add_lb("alpha", {"172.16.0.100:80": "10.0.0.11:8080"})
    topo.add_lb("beta", {"172.16.0.100:80": "10.0.0.12:8080"})
    topo.assign_ids()
    result = planned(topo, "gw1")
    assert result.lb_status["uuid-lb-alpha"].state == "ok"
    beta = result.lb_status["uuid-lb-beta"]
    assert beta.state == "error"
    assert beta.message == (
        "VIP 172.16.0.100:80 conflicts with load balancer alpha (uuid-lb-alpha); nothing of "
        "this load balancer is installed on this chassis")
    [group] = result.groups.values()
    assert set(group.buckets) == {1} and "50:54:00:00:00:01" in group.buckets[1]


def test_conflicting_backend_flows_are_detected_too():
    topo = basic_topo(with_lb=False)
    topo.add_router("lr1", 4, {"lr1-public": "gw2"})
    topo.connect("ls0", "lr1", "00:00:00:00:ee:01")
    topo.add_lb("alpha", {"172.16.0.100:80": "10.0.0.11:8080"})
    topo.add_lb("beta", {"172.16.0.100:80": "10.0.0.11:9090"}, routers=("lr1",))
    topo.assign_ids()
    result = planned(topo, "hv1")
    assert result.lb_status["uuid-lb-alpha"].state == "ok"
    assert "conflicts with load balancer alpha" in result.lb_status["uuid-lb-beta"].message
    # On the gateways the two routers do not clash.
    assert planned(topo, "gw2").lb_status["uuid-lb-beta"].state == "ok"


def test_duplicate_vip_id_on_two_lbs_is_a_group_conflict():
    topo = basic_topo(with_lb=False)
    topo.add_lb("alpha", {"172.16.0.100:80": "10.0.0.11:8080"})
    topo.add_lb("beta", {"172.16.0.101:80": "10.0.0.12:8080"})
    topo.assign_ids()
    ext = dict(topo.lb("beta").external_ids)
    ext[EXT_VIP_IDS] = '{"172.16.0.101:80":1}'
    topo.update_lb("beta", external_ids=ext)
    status = planned(topo, "gw1").lb_status["uuid-lb-beta"]
    assert status.state == "error"
    assert "group 1879048193 is also used by load balancer alpha" in status.message


# -- cookies, determinism, injection ----------------------------------------------------


def test_cookies_are_unique_ours_and_stable_across_processes(topo):
    for chassis in ("gw1", "hv1", "hv2"):
        result = planned(topo, chassis)
        for cookie, flow in result.flows.items():
            assert flow.cookie == cookie
            assert cookie >> 32 != 0
            assert cookie & COOKIE_MASK == 0x51B0 << 48
    # blake2b, not hash(): a fixed flow has a fixed cookie in every process.
    assert FlowSpec(250, 0, "", "drop").cookie == 0x51B0629C52DD6430


def test_config_prefix_lands_in_the_cookie():
    flow = FlowSpec(13, 1000, "tcp", "drop", cookie_prefix=0x1234)
    assert flow.cookie >> 48 == 0x1234


def shuffled_snapshot(snapshot: Snapshot, rng: random.Random) -> Snapshot:
    def shuffle(mapping):
        items = list(mapping.items())
        rng.shuffle(items)
        return dict(items)

    nb = snapshot.nb
    return dataclasses.replace(
        snapshot,
        nb=NbView(shuffle(nb.load_balancers), shuffle(nb.routers), shuffle(nb.router_ports),
                  shuffle(nb.switches), shuffle(nb.switch_ports)),
        sb=SbView(shuffle(snapshot.sb.datapath_keys), shuffle(snapshot.sb.port_bindings)),
    )


def rich_topo():
    topo = basic_topo(with_lb=False)
    topo.add_vif("ls0", "vm3", "50:54:00:00:00:03", "10.0.0.13 fd00::13", "gw1")
    topo.add_lb("web", {"172.16.0.100:80": "10.0.0.11:8080,10.0.0.12:8080,10.0.0.13:8080",
                        "172.16.0.100:443": "10.0.0.13:8443"})
    topo.add_lb("dns", {"[fd00::100]:53": "[fd00::11]:53,[fd00::13]:53"}, protocol="udp")
    topo.add_lb("zz-same-vip", {"172.16.0.100:80": "10.0.0.12:8080"})
    topo.assign_ids()
    return topo


@settings(max_examples=50, deadline=None)
@given(st.randoms(use_true_random=False), st.sampled_from(["gw1", "hv1", "hv2"]))
def test_plan_does_not_depend_on_dict_order(rng, chassis):
    snapshot = rich_topo().snapshot(chassis)
    expected = plan(snapshot)
    again = plan(shuffled_snapshot(snapshot, rng))
    assert again == expected
    assert lines_of(again) == lines_of(expected)
    assert list(again.flows) == list(expected.flows)


def test_rich_topology_plans_as_expected():
    result = plan(rich_topo().snapshot("gw1"))
    assert result.lb_status["uuid-lb-zz-same-vip"].state == "error"
    assert result.lb_status["uuid-lb-web"].roles == ("backend", "gateway")
    assert result.lb_status["uuid-lb-dns"].vip_keys == ("[fd00::100]:53",)
    assert len(result.groups) == 3


def test_group_lines_stay_under_64k_for_3000_backends():
    actions = ("set_field:00:00:00:00:ff:02->eth_src,set_field:50:54:00:00:00:01->eth_dst,"
               "dec_ttl,set_field:0x2->reg15,resubmit(,37)")
    group = GroupSpec(0x7FFFFFFF, GROUP_FIELDS, {b: actions for b in range(3000, 0, -1)})
    lines = group.add_lines()
    assert len(lines) == 6
    assert lines[0].startswith("group add group_id=2147483647,type=select,")
    assert all(line.startswith("group insert_bucket group_id=2147483647,command_bucket_id=last,"
                               "bucket=bucket_id:") for line in lines[1:])
    seen = [int(b) for line in lines for b in re.findall(r"bucket=bucket_id:(\d+),", line)]
    assert seen == list(range(1, 3001))
    # OpenFlow 1.5 bucket: 16-byte header, 8-byte weight property, actions of at
    # most 16 bytes each (5 here): 104 bytes; 500 of them plus the group header
    # and selection properties stay far below 65535.
    for line in lines:
        assert line.count("bucket=") * (16 + 8 + 5 * 16) + 256 < 65535
    assert len(group.add_lines(max_buckets_per_msg=1000)) == 3


def test_bucket_edit_lines():
    group = GroupSpec(0x70000005, buckets={7: "drop"})
    assert group.insert_bucket_line(7) == (
        "group insert_bucket group_id=1879048197,command_bucket_id=last,"
        "bucket=bucket_id:7,weight:100,actions=drop")
    assert group.remove_bucket_line(7) == (
        "group remove_bucket group_id=1879048197,command_bucket_id=7")
    assert group.delete_line() == "group delete group_id=1879048197"


@pytest.mark.parametrize("match, actions", [
    ("tcp,nw_dst=1.2.3.4\nflow delete", "drop"), ("tcp nw_dst=1.2.3.4", "drop"),
    ("tcp", ""), ("tcp", "drop;"), ("tcp", "output:1\n"),
])
def test_flow_spec_refuses_unsafe_text(match, actions):
    with pytest.raises(ValueError):
        FlowSpec(13, 1000, match, actions)


@pytest.mark.parametrize("kwargs", [
    {"cookie_prefix": 0}, {"cookie_prefix": 0x10000}, {"group_id_base": 5},
    {"group_id_base": 0xF0000000}, {"sentinel_table": 255}, {"gateway_priority": -1},
    {"backend_priority": True},
])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        PlanConfig(**kwargs)


def test_sentinel_table_must_not_be_a_pipeline_table(topo):
    with pytest.raises(ValueError, match="sentinel_table"):
        plan(topo.snapshot("gw1"), PlanConfig(sentinel_table=TABLES.output))


MARK = "QZ"   # never produced by the planner itself
marked_text = st.text(max_size=20).map(lambda t: MARK + t)
vip_like = st.one_of(
    st.sampled_from(["172.16.0.100:80", "[fd00::100]:80", "172.16.0.101:80"]),
    marked_text,
    st.text(alphabet="0123456789.:[]abcdef,% \n", max_size=25),
)
backend_like = st.lists(
    st.one_of(st.sampled_from(["10.0.0.11:8080", "10.0.0.12:8080", "[fd00::11]:80"]),
              marked_text, st.text(alphabet="0123456789.:[],\n", max_size=20)),
    min_size=1, max_size=3).map(",".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lb_name=marked_text,
    vips=st.dictionaries(vip_like, backend_like, max_size=3),
    protocol=st.one_of(st.none(), st.sampled_from(["tcp", "udp"]), marked_text),
    ext=st.dictionaries(st.sampled_from([EXT_BUCKETS, EXT_VIP_IDS, EXT_DRAIN, MARK]),
                        st.one_of(marked_text, st.just('{"172.16.0.100:80":1}'),
                                  st.just('{"10.0.0.11:8080":1,"10.0.0.12:8080":2}'))),
    mappings=st.dictionaries(st.one_of(st.just("10.0.0.11"), marked_text), marked_text,
                             max_size=2),
    lsp_name=marked_text,
    chassis=st.sampled_from(["gw1", "hv1", "hv2"]),
)
def test_arbitrary_nb_text_never_reaches_a_rendered_line(
        lb_name, vips, protocol, ext, mappings, lsp_name, chassis):
    topo = basic_topo(with_lb=False)
    # A backend port whose name is hostile: it may only be used for lookups.
    topo.add_vif("ls0", lsp_name, "50:54:00:00:00:66", "10.0.0.66 fd00::66", chassis)
    topo.add_lb(lb_name, vips, protocol=protocol, external_ids=ext, ip_port_mappings=mappings)
    topo.add_lb("other", {"172.16.0.100:80": "10.0.0.66:8080"})
    topo.assign_ids()
    result = plan(topo.snapshot(chassis))
    for line in lines_of(result):
        assert STRICT_LINE.match(line), line
        assert MARK not in line and lb_name not in line and lsp_name not in line
    event("hostile LB: " + result.lb_status[f"uuid-lb-{lb_name}"].state)
    event(f"rendered flows: {len(result.flows) > 1}")


def test_hostile_names_in_a_valid_lb_stay_out_of_lines():
    topo = basic_topo(with_lb=False)
    evil = "vm,actions=output:1\nflow add table=0"
    topo.add_vif("ls0", evil, "50:54:00:00:00:66", "10.0.0.66", "hv1")
    topo.add_lb("lb0\nflow delete", {"172.16.0.100:80": "10.0.0.66:8080"})
    topo.assign_ids()
    for chassis in ("gw1", "hv1"):
        result = plan(topo.snapshot(chassis))
        assert [s.state for s in result.lb_status.values()] == ["ok"]
        for line in lines_of(result):
            assert STRICT_LINE.match(line) and "output" not in line


def test_stale_binding_on_another_datapath_is_pending(topo):
    binding = topo.port_bindings["vm1"]
    topo.port_bindings["vm1"] = SbPortBinding("vm1", binding.tunnel_key, 99, "hv1")
    status = planned(topo, "hv1").lb_status["uuid-lb-lb0"]
    assert status.state == "pending" and "switch of vm1" in status.message


def test_pending_message_stays_short_with_many_missing_bindings():
    topo = basic_topo(with_lb=False)
    backends = []
    for i in range(20):
        topo.add_vif("ls0", f"w{i}", f"50:54:00:00:01:{i:02x}", f"10.0.1.{i + 1}", "hv1")
        topo.port_bindings.pop(f"w{i}")
        backends.append(f"10.0.1.{i + 1}:80")
    topo.add_lb("lb0", {"172.16.0.100:80": ",".join(backends)})
    topo.assign_ids()
    status = plan(topo.snapshot("hv1")).lb_status["uuid-lb-lb0"]
    assert status.state == "pending" and status.message.endswith("; and 15 more")
