"""Direct return (options:stateless_return=direct): validation, the local chassis' reach,
and the planned flow that keeps a reply from being redirected to the gateway.

Flows are read back with `ovs.flow` (an independent parser of ovs-ofctl's syntax).
"""

from __future__ import annotations

import dataclasses

import pytest
from ovs.flow.decoders import EthMask
from ovs.flow.ofp import OFPFlow

from statelesslb.nb.model import PERSISTENCE_OPTION, RETURN_OPTION, LocalChassis
from statelesslb.nb.parse import parse_local_chassis
from statelesslb.nb.topology import TopologyCache
from statelesslb.nb.validate import LbError, ValidLb, validate_lb
from statelesslb.plan.planner import IncrementalPlanner, plan
from statelesslb.plan.specs import STATE_ERROR, STATE_OK, PlanConfig

from .factories import TABLES, Topo, basic_topo

VIP = "172.16.0.100:80"
GW_REDIRECT = dataclasses.replace(TABLES, lr_in_gw_redirect=20, lr_in_gw_redirect_next=21)
CHASSIS_MAC = "0a:00:ac:10:ff:01"
MAC_AS_PARSED = str(EthMask(CHASSIS_MAC))       # ovs.flow's spelling
REACH = LocalChassis({"physnet1": "br-ext"}, {"physnet1": CHASSIS_MAC}, {"physnet1": 7})


def direct_topo(network: str | None = "physnet1", persistence: str = "hash") -> Topo:
    topo = basic_topo()
    topo.add_external("public", 4, "lr0-public", network)
    topo.update_lb("lb0", options={**topo.lb("lb0").options, RETURN_OPTION: "direct",
                                   PERSISTENCE_OPTION: persistence})
    topo.assign_ids()
    return topo


def validated(topo: Topo) -> ValidLb | LbError:
    return validate_lb(topo.lb("lb0"), topo.nb())


def redirect_flows(topo: Topo, chassis: str, local: LocalChassis = REACH,
                   tables=GW_REDIRECT) -> tuple[list[OFPFlow], str]:
    result = plan(topo.snapshot(chassis, tables, local), PlanConfig(), now=topo.clock)
    flows = [OFPFlow(f" cookie={f.cookie:#x}, table={f.table}, "
                     f"priority={f.priority},{f.match} actions={f.actions}")
             for f in result.flows.values() if f.table == 20]
    return flows, result.lb_status["uuid-lb-lb0"].message


def sets(flow: OFPFlow) -> dict[str, str]:
    """{field: value} of the flow's set_field actions, as ovs.flow reads them."""
    return {a["set_field"]["dst"]["field"]: str(next(iter(a["set_field"]["value"].values())))
            for a in flow.actions if "set_field" in a}


def others(flow: OFPFlow) -> list[dict]:
    return [a for a in flow.actions if "set_field" not in a]


def test_direct_return_is_validated_with_each_dgps_networks():
    valid = validated(direct_topo())
    assert isinstance(valid, ValidLb)
    assert valid.direct_return and valid.dgp_networks == (("lr0-public", (("physnet1", 0),)),)
    plain = validated(basic_topo())
    assert isinstance(plain, ValidLb) and not plain.direct_return


@pytest.mark.parametrize(("value", "wanted"), [
    ("Direct", "is not gateway or direct"),
    ("direct ", "is not gateway or direct"),
    ("", "is not gateway or direct"),
])
def test_bad_values_are_refused(value, wanted):
    topo = direct_topo()
    topo.update_lb("lb0", options={**topo.lb("lb0").options, RETURN_OPTION: value})
    error = validated(topo)
    assert isinstance(error, LbError) and wanted in error.message


def test_a_bad_value_plans_nothing_of_its_lb_and_harms_no_other():
    topo = direct_topo()
    topo.add_lb("other", {"172.16.0.101:80": "10.0.0.11:8080"})
    topo.update_lb("other", options={**topo.lb("other").options, RETURN_OPTION: "direct"})
    topo.assign_ids()
    topo.update_lb("lb0", options={**topo.lb("lb0").options, RETURN_OPTION: "sideways"})
    result = plan(topo.snapshot("hv1", GW_REDIRECT, REACH), PlanConfig(), now=topo.clock)
    bad, good = result.lb_status["uuid-lb-lb0"], result.lb_status["uuid-lb-other"]
    assert bad.state == STATE_ERROR and "is not gateway or direct" in bad.message
    assert good.state == STATE_OK
    # Only the other LB's VIP has flows: its direct-return pair and its backend flows.
    assert not any("172.16.0.100" in f.match for f in result.flows.values())
    assert sum(1 for f in result.flows.values()
               if f.table == 20 and "nw_src=172.16.0.101" in f.match) == 2


def test_direct_return_needs_a_localnet_port_and_no_affinity():
    error = validated(direct_topo(network=None))
    assert isinstance(error, LbError)
    assert "needs a localnet port" in error.message and "lr0-public" in error.message
    error = validated(direct_topo(persistence="affinity"))
    assert isinstance(error, LbError) and "affinity" in error.message


def test_local_chassis_reads_ovn_controllers_mappings():
    local = parse_local_chassis({
        "ovn-bridge-mappings": "physnet1:br-ext, physnet2:br-two,broken,bad name:br-x",
        "ovn-chassis-mac-mappings": "physnet1:0A:00:AC:10:FF:01,physnet2:01:00:00:00:00:01,x",
    })
    assert local.bridges == {"physnet1": "br-ext", "physnet2": "br-two"}
    # Lowercase; a multicast MAC gives no reach.
    assert local.chassis_macs == {"physnet1": CHASSIS_MAC}
    # The agent adds the uplink ports; without them there is no reach.
    assert local.uplink("physnet1") is None
    assert dataclasses.replace(local, uplinks={"physnet1": 7}).uplink("physnet1") == (
        CHASSIS_MAC, 7)
    assert parse_local_chassis({}) == LocalChassis()


def test_a_backend_chassis_with_reach_sends_the_vips_replies_out_of_its_uplink():
    topo = direct_topo()
    flows, message = redirect_flows(topo, "hv1")
    assert len(flows) == 2, flows
    resolved, unresolved = sorted(flows, key=lambda f: f.match["priority"])
    for flow in flows:
        match = flow.match
        assert match["metadata"] == 3                      # lr0
        assert match["reg15"] == topo.port_bindings["lr0-public"].tunnel_key
        assert (str(match["nw_src"]), str(match["tp_src"])) == ("172.16.0.100/32", "80")
        assert "tcp" in match
    # Routed already: this chassis' MAC as source, out of the uplink.
    assert sets(resolved) == {"eth_src": MAC_AS_PARSED}
    assert others(resolved) == [{"output": {"port": 7}}]
    assert "dl_dst" not in resolved.match
    # A next hop OVN has not resolved yet: OVN's own redirect to the gateway.
    assert str(unresolved.match["dl_dst"]) == str(EthMask("00:00:00:00:00:00"))
    assert sets(unresolved) == {"reg15": str(topo.port_bindings["cr-lr0-public"].tunnel_key)}
    assert others(unresolved) == [{"resubmit": {"port": "", "table": 21}}]
    assert message == ""


def test_a_vlan_localnet_gets_its_tag_pushed():
    topo = direct_topo()
    topo.switch_ports["ln-public"] = dataclasses.replace(topo.switch_ports["ln-public"],
                                                         tag_request=42)
    resolved = min(redirect_flows(topo, "hv1")[0], key=lambda f: f.match["priority"])
    assert others(resolved) == [{"push_vlan": 0x8100}, {"output": {"port": 7}}]
    assert sets(resolved) == {"eth_src": MAC_AS_PARSED, "vlan_vid": str(0x1000 | 42)}
    topo.switch_ports["ln-public"] = dataclasses.replace(topo.switch_ports["ln-public"],
                                                         tag_request=5000)
    error = validated(topo)
    assert isinstance(error, LbError) and "VLAN 5000" in error.message


def test_gateways_and_chassis_without_reach_plan_no_direct_return():
    topo = direct_topo()
    # gw1 hosts no backend: nothing to return.
    assert redirect_flows(topo, "gw1")[0] == []
    # hv1 without a chassis MAC for physnet1: replies through the gateway, and it says so.
    flows, message = redirect_flows(
        topo, "hv1", LocalChassis({"physnet1": "br-ext"}, {}, {"physnet1": 7}))
    assert flows == []
    assert "through the gateway" in message and "physnet1" in message
    result = plan(topo.snapshot("hv1", GW_REDIRECT, LocalChassis()), PlanConfig(),
                  now=topo.clock)
    assert result.lb_status["uuid-lb-lb0"].state == STATE_OK
    # No gateway-redirect stage found in this OVN: the same.
    flows, message = redirect_flows(topo, "hv1", tables=TABLES)
    assert flows == [] and "no gateway-redirect stage" in message


def test_without_the_option_nothing_changes():
    topo = basic_topo()
    topo.add_external("public", 4, "lr0-public")
    topo.assign_ids()
    assert redirect_flows(topo, "hv1")[0] == []


def test_a_new_localnet_port_revalidates_the_routers_lbs():
    topo = direct_topo(network=None)
    cache = TopologyCache()
    cache.get(topo.nb())
    topo._add_switch_port("public", dataclasses.replace(
        topo.switch_ports["public-lr0-public"], uuid="uuid-ln", name="ln-public",
        type="localnet", addresses=("unknown",), options={"network_name": "physnet1"}),
        chassis=None)
    state = cache.get(topo.nb())
    assert state.changes is not None
    assert ("router", topo.router_uuid("lr0")) in state.changes.keys()


def test_the_incremental_planner_plans_again_when_the_reach_changes():
    topo = direct_topo()
    planner = IncrementalPlanner(PlanConfig())

    def direct_flows(local: LocalChassis, changed) -> int:
        update = planner.update(topo.snapshot("hv1", GW_REDIRECT, local), now=topo.clock,
                                changed=changed)
        return sum(1 for f in update.plan.flows.values() if f.table == 20)

    assert direct_flows(REACH, None) == 2
    # No NB change at all, only the chassis' reach: the LB is planned again.
    assert direct_flows(LocalChassis(), frozenset()) == 0
    assert direct_flows(REACH, frozenset()) == 2
