"""Backends on several switches of one router: every layer's flows reach the right switch."""

from __future__ import annotations

import json

import pytest
from ovs.flow.ofp import OFPFlow

from statelesslb.nb.model import (
    EXT_ACTIVE,
    EXT_BUCKETS,
    EXT_PREVIOUS,
    EXT_VIP_IDS,
    PERSISTENCE_OPTION,
)
from statelesslb.plan.planner import plan
from statelesslb.plan.specs import FlowSpec, Plan, PlanConfig

from .factories import TABLES, Topo

CONFIG = PlanConfig()
VIP = "172.16.0.100:80"
# ls0 (datapath 1, router port MAC ff:02) and ls1 (datapath 2, router port MAC ff:04).
LS0_DP, LS1_DP, ROUTER_DP = 1, 2, 3


def two_switches(persistence: str, backends: str) -> Topo:
    """vm1 (ls0, hv1), vm2 (ls0, hv2), vm5 (ls1, hv1), vm6 (ls1, hv2)."""
    topo = Topo()
    topo.add_router("lr0", ROUTER_DP, {"lr0-public": "gw1"})
    topo.add_switch("ls0", LS0_DP)
    topo.add_switch("ls1", LS1_DP, router_port_mac="00:00:00:00:ff:04")
    topo.add_vif("ls0", "vm1", "50:54:00:00:00:01", "10.0.0.11", "hv1")
    topo.add_vif("ls0", "vm2", "50:54:00:00:00:02", "10.0.0.12", "hv2")
    topo.add_vif("ls1", "vm5", "50:54:00:00:00:05", "10.0.1.15", "hv1")
    topo.add_vif("ls1", "vm6", "50:54:00:00:00:06", "10.0.1.16", "hv2")
    lb = topo.add_lb("lb0", {VIP: backends})
    topo.update_lb("lb0", options={**lb.options, PERSISTENCE_OPTION: persistence})
    topo.assign_ids()
    return topo


def change_backends(topo: Topo, backends: str) -> None:
    """The NB writer's phase 1 only: `previous` published, the gateways not moved yet."""
    topo.update_lb("lb0", vips={VIP: backends})
    topo.clock += 10.0
    topo.writer_pass(topo.clock)
    assert EXT_PREVIOUS in topo.lb("lb0").external_ids


def planned(topo: Topo, chassis: str) -> Plan:
    return plan(topo.snapshot(chassis), CONFIG, now=topo.clock)


def parsed(flow: FlowSpec) -> OFPFlow:
    return OFPFlow(f" cookie={flow.cookie:#x}, table={flow.table}, "
                   f"priority={flow.priority},{flow.match} actions={flow.actions}")


def keys(topo: Topo) -> tuple[int, dict[str, int]]:
    ext = topo.lb("lb0").external_ids
    return json.loads(ext[EXT_VIP_IDS])[VIP], json.loads(ext[EXT_BUCKETS])


def test_previous_group_steers_each_bucket_to_its_owners_switch():
    topo = two_switches("second-chance", "10.0.0.11:8080,10.0.1.15:8080")
    change_backends(topo, "10.0.0.11:8080,10.0.1.15:8080,10.0.0.12:8080")
    vip_id, buckets = keys(topo)
    port = {name: topo.port_bindings[name].tunnel_key for name in ("vm1", "vm5")}
    # hv2 hosts the new backend vm2 (ls0); the previous owners are vm1 (ls0) and vm5 (ls1).
    result = planned(topo, "hv2")
    group = result.groups[CONFIG.previous_group_base + vip_id]
    redirect = f"resubmit(,{CONFIG.redirect_table})"
    assert dict(group.buckets) == {
        buckets["10.0.0.11:8080"]:
            f"set_field:50:54:00:00:00:01->eth_dst,set_field:{LS0_DP:#x}->metadata,"
            f"set_field:0->reg14,set_field:{port['vm1']:#x}->reg15,{redirect}",
        buckets["10.0.1.15:8080"]:
            f"set_field:50:54:00:00:00:05->eth_dst,set_field:{LS1_DP:#x}->metadata,"
            f"set_field:0->reg14,set_field:{port['vm5']:#x}->reg15,{redirect}",
    }
    # The redirect table outputs in both switches, not only in vm2's.
    outputs = {f.match: f.actions for f in result.flows.values()
               if f.table == CONFIG.redirect_table and f.priority == 100}
    assert outputs == {
        f"tcp,metadata={dp:#x},nw_dst=172.16.0.100,tp_dst=80": f"resubmit(,{TABLES.output})"
        for dp in (LS0_DP, LS1_DP)}
    for flow in result.flows.values():
        if flow.table in CONFIG.private_tables:
            parsed(flow)   # valid ovs-ofctl syntax


def test_a_backend_serves_a_redirect_for_itself_on_its_own_switch():
    topo = two_switches("second-chance", "10.0.0.11:8080,10.0.1.15:8080")
    change_backends(topo, "10.0.0.11:8080,10.0.1.15:8080,10.0.0.12:8080")
    result = planned(topo, "hv1")   # vm1 (ls0) and vm5 (ls1) share one previous group
    port5 = topo.port_bindings["vm5"].tunnel_key
    [serve5] = [f for f in result.flows.values() if f.table == CONFIG.redirect_table
                and f.priority == 200 and "dl_src=50:54:00:00:00:05" in f.match]
    # The bucket set metadata to ls1: the serve-here flow matches there.
    assert f"metadata={LS1_DP:#x}," in serve5.match
    assert serve5.actions.startswith(
        f"set_field:{port5:#x}->reg15,set_field:00:00:00:00:ff:04->eth_src,ct(commit,")


@pytest.mark.parametrize("persistence", ["hash", "affinity", "second-chance",
                                         "affinity,second-chance"])
def test_gateway_buckets_output_through_each_backends_router_port(persistence):
    topo = two_switches(persistence, "10.0.0.11:8080,10.0.1.15:8080")
    vip_id, buckets = keys(topo)
    rp = {sw: topo.port_bindings[f"lr0-{sw}"].tunnel_key for sw in ("ls0", "ls1")}
    result = planned(topo, "gw1")
    group = result.groups[CONFIG.group_id_base + vip_id]
    expect = {"10.0.0.11:8080": ("00:00:00:00:ff:02", "50:54:00:00:00:01", rp["ls0"]),
              "10.0.1.15:8080": ("00:00:00:00:ff:04", "50:54:00:00:00:05", rp["ls1"])}
    for key, (src, dst, outport) in expect.items():
        actions = group.buckets[buckets[key]]
        assert (f"set_field:{src}->eth_src,set_field:{dst}->eth_dst" in actions
                and f"set_field:{outport:#x}->reg15" in actions), actions
        if "affinity" in persistence:
            # The sticky path too: a tracked flow goes out through its backend's switch.
            [sticky] = [f for f in result.flows.values()
                        if f.table == CONFIG.gateway_sticky_table
                        and f"ct_mark={buckets[key]:#x}," in f.match]
            assert (f"set_field:{src}->eth_src,set_field:{dst}->eth_dst" in sticky.actions
                    and f"set_field:{outport:#x}->reg15" in sticky.actions)


def test_active_set_is_what_the_gateways_use():
    # Guard for the fixture: phase 2 (after the settle time) moves the gateways.
    topo = two_switches("second-chance", "10.0.0.11:8080,10.0.1.15:8080")
    assert set(json.loads(topo.lb("lb0").external_ids[EXT_ACTIVE])[VIP]) == {
        "10.0.0.11:8080", "10.0.1.15:8080"}
