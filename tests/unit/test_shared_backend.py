"""A backend shared by a stateless VIP and another path (OVN's native LB, its own address):
the planned ownership record (docs/real-tcp.md, "shared backends").

Flows are read back with `ovs.flow` (an independent parser of ovs-ofctl's syntax), not by
matching our own strings.
"""

from __future__ import annotations

from typing import Any

import pytest
from ovs.flow.ofp import OFPFlow

from statelesslb.nb.model import PERSISTENCE_OPTION
from statelesslb.plan.planner import plan
from statelesslb.plan.specs import OTHER_PATH_MARK, FlowSpec, PlanConfig

from .factories import TABLES, Topo

VIP = "172.16.0.100:80"
LAYERS = ["hash", "affinity", "second-chance", "affinity,second-chance"]
# vm1 on ls0 (datapath 1) and vm5 on ls1 (datapath 2), both on hv1.
BACKENDS = {"vm1": ("10.0.0.11", 1), "vm5": ("10.0.1.15", 2)}


def topology(persistence: str, protocol: str | None = None) -> Topo:
    topo = Topo()
    topo.add_router("lr0", 3, {"lr0-public": "gw1"})
    topo.add_switch("ls0", 1)
    topo.add_switch("ls1", 2, router_port_mac="00:00:00:00:ff:04")
    topo.add_vif("ls0", "vm1", "50:54:00:00:00:01", "10.0.0.11", "hv1")
    topo.add_vif("ls0", "vm2", "50:54:00:00:00:02", "10.0.0.12", "hv2")
    topo.add_vif("ls1", "vm5", "50:54:00:00:00:05", "10.0.1.15", "hv1")
    lb = topo.add_lb("lb0", {VIP: "10.0.0.11:8080,10.0.1.15:8080"}, protocol=protocol)
    topo.update_lb("lb0", options={**lb.options, PERSISTENCE_OPTION: persistence})
    topo.assign_ids()
    if "second-chance" in persistence:
        # Phase 1 of a change: the previous set (group, redirect flows) is planned too.
        topo.update_lb("lb0", vips={VIP: "10.0.0.11:8080,10.0.1.15:8080,10.0.0.12:8080"})
        topo.clock += 10.0
        topo.writer_pass(topo.clock)
    return topo


def parsed_flows(topo: Topo, config: PlanConfig | None = None) -> list[OFPFlow]:
    result = plan(topo.snapshot("hv1"), config or PlanConfig(), now=topo.clock)
    return [_parse(f) for c, f in result.flows.items() if c != result.sentinel_cookie]


def _parse(flow: FlowSpec) -> OFPFlow:
    return OFPFlow(f" cookie={flow.cookie:#x}, table={flow.table}, "
                   f"priority={flow.priority},{flow.match} actions={flow.actions}")


def _ct(flow: OFPFlow) -> dict[str, Any] | None:
    cts = [a["ct"] for a in flow.actions if "ct" in a]
    assert len(cts) <= 1, flow
    return cts[0] if cts else None


def _mark_written(ct: dict[str, Any]) -> tuple[int, int]:
    [exec_] = ct["exec"]
    mask = exec_["set_field"]["value"]["ct_mark"]
    return int(mask.value), int(mask.mask)


def _resubmits(flow: OFPFlow) -> list[int]:
    return [a["resubmit"]["table"] for a in flow.actions if "resubmit" in a]


def _port_zone(ct: dict[str, Any]) -> bool:
    zone = ct.get("zone")
    return isinstance(zone, dict) and zone["field"] == "NXM_NX_REG13"


def _to(flow: OFPFlow, ip: str, direction: str) -> bool:
    return str(flow.match.get(f"nw_{direction}", "")) == f"{ip}/32"


@pytest.mark.parametrize("persistence", LAYERS)
def test_every_stateless_dnat_goes_on_through_the_ownership_record(persistence):
    config = PlanConfig()
    flows = parsed_flows(topology(persistence))
    dnats = [f for f in flows if (_ct(f) or {}).get("nat", {}) not in ({}, True)]
    assert dnats
    for f in dnats:
        ct = _ct(f)
        assert ct["commit"] and _port_zone(ct) and ct["table"] == config.backend_forward_table
    # Nothing but the record's table goes on to the next egress stage: no stateless path
    # (first packet, known connection, redirect served here) skips it.
    onwards = [f for f in flows if TABLES.ls_out_next in _resubmits(f)]
    assert onwards and {f.info["table"] for f in onwards} == {config.backend_forward_table}
    if "second-chance" in persistence:
        known = [f for f in flows if f.info["table"] == config.backend_decide_table
                 and f.match["priority"] in (300, 250)]
        assert known and all(_resubmits(f) == [config.backend_forward_table] for f in known)
    # Per backend: a SYN claims the tuple for the stateless path (mark bit cleared) above a
    # lookup that keeps the record's TCP state in step; both in backend_zone.
    for ip, dp in BACKENDS.values():
        record = sorted((f for f in flows if f.info["table"] == config.backend_forward_table
                         and _to(f, ip, "dst")), key=lambda f: -f.match["priority"])
        assert [f.match.get("tcp_flags") for f in record] == ["+syn-ack", None]
        syn, rest = (_ct(f) for f in record)
        assert syn["commit"] and syn["zone"] == config.backend_zone
        assert _mark_written(syn) == (0, OTHER_PATH_MARK)
        assert "commit" not in rest and rest["zone"] == config.backend_zone
        assert all(int(f.match["metadata"].value) == dp for f in record)


@pytest.mark.parametrize("persistence", LAYERS)
def test_other_paths_are_recorded_and_handed_back_to_ovns_first_egress_table(persistence):
    config = PlanConfig()
    flows = parsed_flows(topology(persistence))
    for ip, _dp in BACKENDS.values():
        other = sorted((f for f in flows if f.info["table"] == TABLES.ls_out_intercept
                        and _to(f, ip, "dst")), key=lambda f: -f.match["priority"])
        assert [f.match.get("tcp_flags") for f in other] == ["+syn-ack", None]
        for f in other:
            ct = _ct(f)
            # Untracked only, and back to the same table, tracked: OVN's own flows of
            # that table take it next, nothing of OVN's pipeline is skipped (and no loop).
            assert f.match["ct_state"] == "-trk"
            assert ct["table"] == TABLES.ls_out_intercept and ct["zone"] == config.backend_zone
            assert "nat" not in ct
        syn, rest = (_ct(f) for f in other)
        assert syn["commit"] and _mark_written(syn) == (OTHER_PATH_MARK, OTHER_PATH_MARK)
        assert "commit" not in rest


@pytest.mark.parametrize("persistence", LAYERS)
def test_replies_are_un_dnated_unless_the_record_says_another_path_opened_them(persistence):
    config = PlanConfig()
    flows = parsed_flows(topology(persistence))
    for ip, _dp in BACKENDS.values():
        [first] = [f for f in flows if f.info["table"] == TABLES.ls_in_intercept
                   and _to(f, ip, "src")]
        # The first lookup is in backend_zone, without nat: it changes nothing.
        assert _ct(first) == {"table": config.backend_reply_table,
                              "zone": config.backend_zone}
        decide = sorted((f for f in flows if f.info["table"] == config.backend_reply_table
                         and _to(f, ip, "src")), key=lambda f: -f.match["priority"])
        assert len(decide) == 2
        marked, otherwise = decide
        assert marked.match["ct_state"] == "+trk"
        assert (int(marked.match["ct_mark"].value), int(marked.match["ct_mark"].mask)) == (
            OTHER_PATH_MARK, OTHER_PATH_MARK)
        assert _ct(marked) is None and _resubmits(marked) == [TABLES.ls_in_next]
        assert "ct_mark" not in otherwise.match and "ct_state" not in otherwise.match
        ct = _ct(otherwise)
        assert ct["nat"] is True and _port_zone(ct) and ct["table"] == TABLES.ls_in_next
    # The only un-DNAT of replies (flows on the backend's inport) is the reply table's
    # fallback.
    undnat = [f for f in flows if "reg14" in f.match and _ct(f) is not None
              and _ct(f).get("nat") is True]
    assert undnat and {f.info["table"] for f in undnat} == {config.backend_reply_table}


def test_udp_claims_the_tuple_with_every_packet():
    config = PlanConfig()
    flows = parsed_flows(topology("hash", protocol="udp"))
    record = [f for f in flows if f.info["table"] == config.backend_forward_table]
    other = [f for f in flows if f.info["table"] == TABLES.ls_out_intercept
             and "ct_state" in f.match]
    assert len(record) == len(other) == len(BACKENDS)
    for f in record + other:
        assert "tcp_flags" not in f.match and _ct(f)["commit"]
    assert {_mark_written(_ct(f)) for f in record} == {(0, OTHER_PATH_MARK)}
    assert {_mark_written(_ct(f)) for f in other} == {(OTHER_PATH_MARK, OTHER_PATH_MARK)}


def test_zone_and_tables_follow_the_config():
    config = PlanConfig(backend_zone=12345, private_table_base=150, backend_priority=2000)
    flows = parsed_flows(topology("second-chance"), config)
    zones = {_ct(f)["zone"] for f in flows if _ct(f) is not None
             and not _port_zone(_ct(f))}
    assert zones == {12345}
    assert (config.backend_forward_table, config.backend_reply_table) == (154, 155)
    tables = {f.info["table"] for f in flows}
    assert {154, 155} <= tables and not tables & {204, 205}
    assert {f.match["priority"] for f in flows if f.info["table"] == TABLES.ls_out_intercept
            and "ct_state" in f.match} == {2000, 2001}


@pytest.mark.parametrize("kwargs", [
    {"backend_zone": 64000},                      # the gateway layer's zone
    {"backend_zone": 0},
    {"backend_zone": 0x10000},
    {"backend_priority": 0xFFFF},                 # the SYN flows sit one above
    {"private_table_base": 250, "sentinel_table": 100},   # 250..255: past table 254
    {"private_table_base": 245},                  # 245..250 holds the sentinel table
])
def test_config_refuses_a_clashing_zone_priority_or_table(kwargs):
    with pytest.raises(ValueError):
        PlanConfig(**kwargs)


def test_config_accepts_the_last_fitting_values():
    config = PlanConfig(private_table_base=249, sentinel_table=100, backend_priority=0xFFFE,
                        backend_zone=1)
    assert config.private_tables == (249, 250, 251, 252, 253, 254)
