"""statelesslb-ctl without an agent: input checks, drain edits, the agent-side documents
built from unit snapshots, parsing of OVS output, and the human rendering."""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from statelesslb.agent import control
from statelesslb.cli import clients, ctl, drain, errors, render
from statelesslb.nb.hashing import DEFAULT_HASH, HASH_OPTION
from statelesslb.nb.model import EXT_DRAIN, EXT_PREVIOUS, PERSISTENCE_OPTION
from statelesslb.nb.parse import show
from statelesslb.observe import reports, trace
from statelesslb.observe.predict import FlowTuple, bucket_scores
from statelesslb.openflow.diff import state_after
from statelesslb.openflow.ofctl import parse_groups
from statelesslb.plan.planner import plan
from statelesslb.plan.specs import GROUP_FIELDS, PlanConfig

from .factories import Topo, basic_topo

CONFIG = PlanConfig()
GID = CONFIG.group_id_base + 1

# What `dump-group-stats` printed on OVS 3.1 for a group whose buckets are listed
# as 3, 2, 1 (bucket 1 drained and undrained): bucketN is the list POSITION.
STATS_DUMP = (
    "OFPST_GROUP reply (OF1.5) (xid=0x6):\n"
    f" group_id=1,duration=7.211s,ref_count=1,packet_count=5,byte_count=300,"
    "bucket0:packet_count=5,byte_count=300\n"
    f" group_id={GID},duration=7.173s,ref_count=1,packet_count=6,byte_count=360,"
    "bucket0:packet_count=1,byte_count=60,bucket1:packet_count=2,byte_count=120,"
    "bucket2:packet_count=3,byte_count=180\n"
)

# A real `ofproto/trace-packet-out` of the intercept (OVS 3.1, trimmed after the tunnel).
TRACE_TEXT = """\
Flow: tcp,reg14=0x1,metadata=0x3,in_port=CONTROLLER,vlan_tci=0x0000,dl_src=02:00:00:00:00:01,\
dl_dst=00:00:00:00:f0:01,nw_src=172.16.0.50,nw_dst=172.16.0.100,nw_tos=0,nw_ecn=0,nw_ttl=64,\
nw_frag=no,tp_src=40000,tp_dst=80,tcp_flags=0

bridge("br-int")
----------------
    resubmit(,13)
13. tcp,reg14=0x1,metadata=0x3,nw_dst=172.16.0.100,tp_dst=80, priority 1000, cookie \
0x51b06430388e9861
    group:1879048193
     -> bucket 2: score 3457900
     -> bucket 1: score 2932600
     -> using bucket 2
    bucket 2
            dec_ttl
            set_field:00:00:00:00:ff:02->eth_src
            set_field:50:54:00:00:00:02->eth_dst
            set_field:0x1->reg15
            resubmit(,37)
        39. reg15=0x3,metadata=0x1, priority 100, cookie 0xa7f6ad1c
            output:3
             -> output to native tunnel
             -> tunneling to 192.168.0.102 via br-phys

Final flow: unchanged
Datapath actions: set(eth(src=00:00:00:00:ff:02,dst=50:54:00:00:00:02)),tnl_push(...),4
"""


def gateway_state():
    """basic_topo seen from gw1 (the gateway), ids assigned, with its plan."""
    topo = basic_topo()
    topo.assign_ids()
    snapshot = topo.snapshot("gw1")
    return topo, snapshot, plan(snapshot, CONFIG)


def full_tuple_state():
    """gateway_state's snapshot and plan with lb0 hashing the full 5-tuple: the hash
    TRACE_TEXT's scores were printed for (by a real Debian 12 vswitchd)."""
    topo = basic_topo()
    topo.update_lb("lb0", options={**topo.lb("lb0").options, HASH_OPTION: "5-tuple"})
    topo.assign_ids()
    snapshot = topo.snapshot("gw1")
    return snapshot, plan(snapshot, CONFIG)


# -- input checks ---------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("10.0.0.11:8080", "10.0.0.11:8080"),
    ("[FD00::11]:8080", "[fd00::11]:8080"),
    ("[fd00:0::11]:80", "[fd00::11]:80"),
])
def test_endpoints_are_canonical(text: str, want: str) -> None:
    assert ctl.check_endpoint(text, "BACKEND") == want


@pytest.mark.parametrize("text, reason", [
    ("10.0.0.11", "has no port"),
    ("10.0.0.11:0", "invalid port"),
    ("10.0.0.011:80", "is not IP:port"),
    ("10.0.0.11:80,10.0.0.12:80", "is not IP:port"),
    ("10.0.0.11:80 ; reboot", "has an invalid port"),
    ("fd00::11:80", "has no port"),
])
def test_bad_endpoints_are_usage_errors(text: str, reason: str) -> None:
    with pytest.raises(errors.CtlError) as info:
        ctl.check_endpoint(text, "BACKEND")
    assert info.value.code == errors.EXIT_USAGE and reason in str(info.value)


def test_trace_arguments_are_checked() -> None:
    assert ctl.check_trace_args("172.16.0.50", "40000", "TCP") == ("172.16.0.50", "40000", "tcp")
    assert ctl.check_trace_args("fd00::50", "1", None) == ("fd00::50", "1", "")
    for args in (("172.16.0.50,nw_dst=1.2.3.4", "1", None), ("172.16.0.50", "0", None),
                 ("172.16.0.50", "1e3", None), ("172.16.0.50", "80", "sctp"),
                 ("172.16.0.50/32", "80", None)):
        with pytest.raises(errors.CtlError) as info:
            ctl.check_trace_args(*args)
        assert info.value.code == errors.EXIT_USAGE
    for ref in ("", "a\nb", "x" * 256):
        with pytest.raises(errors.CtlError):
            ctl.check_lb_ref(ref)


# -- drain list edits -----------------------------------------------------------------

VIPS = {"172.16.0.100:80": "10.0.0.11:8080,10.0.0.12:8080",
        "172.16.0.101:80": "10.0.0.12:8080"}


def test_drain_adds_and_undrain_removes() -> None:
    edit = drain.edit_drain("lb1", VIPS, None, "10.0.0.11:8080", drain=True)
    assert (edit.drain, edit.changed, edit.dropped) == (["10.0.0.11:8080"], True, [])
    again = drain.edit_drain("lb1", VIPS, '["10.0.0.11:8080"]', "10.0.0.11:8080", drain=True)
    assert again.changed is False
    back = drain.edit_drain("lb1", VIPS, '["10.0.0.11:8080"]', "10.0.0.11:8080", drain=False)
    assert (back.drain, back.changed) == ([], True)
    # A drain entry for a backend that left the LB can still be cleaned up.
    gone = drain.edit_drain("lb1", VIPS, '["10.0.0.99:80"]', "10.0.0.99:80", drain=False)
    assert (gone.drain, gone.changed) == ([], True)


def test_drain_refuses_unknown_backends_and_empty_vips() -> None:
    with pytest.raises(errors.CtlError, match=r"10.0.0.13:8080 is not a backend of lb1 "
                       r"\(its backends: 10.0.0.11:8080, 10.0.0.12:8080\)"):
        drain.edit_drain("lb1", VIPS, None, "10.0.0.13:8080", drain=True)
    # 10.0.0.12 is the only backend of the second VIP.
    with pytest.raises(errors.CtlError, match="would leave VIP 172.16.0.101:80 of lb1 with no"):
        drain.edit_drain("lb1", VIPS, None, "10.0.0.12:8080", drain=True)
    forced = drain.edit_drain("lb1", VIPS, None, "10.0.0.12:8080", drain=True, force=True)
    assert forced.drain == ["10.0.0.12:8080"]
    with pytest.raises(errors.CtlError, match="neither drained nor a backend"):
        drain.edit_drain("lb1", VIPS, None, "10.0.0.99:80", drain=False)


def test_malformed_drain_entries_are_dropped_and_reported() -> None:
    edit = drain.edit_drain("lb1", VIPS, '["10.0.0.11:8080", "junk", 7]', "10.0.0.11:8080",
                          drain=True)
    assert edit.drain == ["10.0.0.11:8080"] and edit.changed is True
    assert edit.dropped == ["junk", "7"]
    edit = drain.edit_drain("lb1", VIPS, "{not json", "10.0.0.11:8080", drain=True)
    assert edit.dropped == ["'{not json'"]
    # Too deep for json.loads (RecursionError): as malformed as any other text.
    deep = "[" * 100_000
    edit = drain.edit_drain("lb1", VIPS, deep, "10.0.0.11:8080", drain=True)
    assert edit.drain == ["10.0.0.11:8080"] and edit.dropped == [show(deep)]


# -- agent-side documents from unit snapshots -------------------------------------------

LB_SHOW_KEYS = {"chassis", "uuid", "name", "protocol", "mode", "nb_status", "agent",
                "router", "persistence", "hash", "weights", "previous", "gateway_ports",
                "drain", "vips"}
VIP_KEYS = {"vip", "vip_id", "group_id", "group_here", "backends"}
BACKEND_KEYS = {"backend", "bucket_id", "mac", "logical_port", "chassis", "drained",
                "health", "in_group"}
GROUP_KEYS = {"group_id", "kind", "lb", "lb_uuid", "vip", "vip_id", "packet_count", "byte_count",
              "in_plan", "in_sync", "drained", "buckets"}
BUCKET_KEYS = {"bucket_id", "position", "backend", "mac", "logical_port", "chassis",
               "packet_count", "byte_count"}
TRACE_KEYS = {"chassis", "lb", "lb_uuid", "vip", "protocol", "source", "group_id", "flow",
              "intercepted", "first_table", "backend", "scores", "hash_impl", "tunnel_to",
              "datapath_actions", "notes", "trace", "hash_fields", "hash_classes"}


def test_lb_show_document() -> None:
    topo, snapshot, the_plan = gateway_state()
    doc = reports.lb_show_doc(snapshot, the_plan, CONFIG, "lb0")
    assert set(doc) == LB_SHOW_KEYS
    assert doc["gateway_ports"] == [{"name": "lr0-public", "chassis": "gw1", "here": True}]
    assert list(doc["agent"]["roles"]) == ["gateway"] and doc["router"] == "lr0"
    assert doc["persistence"] == {"affinity": False, "second_chance": False, "window": 240}
    assert doc["previous"] is None
    (vip,) = doc["vips"]
    assert set(vip) == VIP_KEYS and vip["group_id"] == GID and vip["group_here"]
    assert [set(b) for b in vip["backends"]] == [BACKEND_KEYS] * 2
    assert [(b["backend"], b["bucket_id"], b["mac"], b["logical_port"], b["chassis"],
             b["in_group"]) for b in vip["backends"]] == [
        ("10.0.0.11:8080", 1, "50:54:00:00:00:01", "vm1", "hv1", True),
        ("10.0.0.12:8080", 2, "50:54:00:00:00:02", "vm2", "hv2", True)]
    # The same LB by UUID, from a hypervisor: no group there.
    doc = reports.lb_show_doc(topo.snapshot("hv1"), plan(topo.snapshot("hv1"), CONFIG),
                                CONFIG, "uuid-lb-lb0")
    assert doc["vips"][0]["group_here"] is False
    assert {b["in_group"] for b in doc["vips"][0]["backends"]} == {None}


def test_lb_show_of_an_invalid_lb_still_lists_its_vips() -> None:
    topo, _, _ = gateway_state()
    topo.update_lb("lb0", protocol="sctp")
    snapshot = topo.snapshot("gw1")
    doc = reports.lb_show_doc(snapshot, plan(snapshot, CONFIG), CONFIG, "lb0")
    assert doc["agent"]["state"] == "error" and "sctp" in doc["agent"]["message"]
    assert doc["router"] is None
    assert [b["backend"] for b in doc["vips"][0]["backends"]] == ["10.0.0.11:8080",
                                                                  "10.0.0.12:8080"]
    assert doc["vips"][0]["backends"][0]["mac"] is None


def test_lookup_errors() -> None:
    topo, snapshot, _ = gateway_state()
    with pytest.raises(ValueError, match="no load balancer named nope in the NB"):
        reports.find_lb(snapshot, "nope")
    topo.add_lb("plain", {"172.16.0.9:80": "10.0.0.11:80"}, marked=False)
    topo.add_lb("twin", {"172.16.0.7:80": "10.0.0.11:80"})
    topo.load_balancers["uuid-lb-twin2"] = topo.lb("twin").__class__(
        "uuid-lb-twin2", "twin", None, {"172.16.0.8:80": "10.0.0.12:80"})
    snapshot = topo.snapshot("gw1")
    with pytest.raises(ValueError, match="plain is not stateless"):
        reports.find_lb(snapshot, "plain")
    with pytest.raises(ValueError, match=r"2 load balancers are named twin: give one of "
                       r"their UUIDs \(uuid-lb-twin, uuid-lb-twin2\)"):
        reports.find_lb(snapshot, "twin", marked=False)
    assert reports.find_lb(snapshot, "uuid-lb-twin2", marked=False).name == "twin"


def test_group_stats_are_by_position() -> None:
    stats = reports.parse_group_stats(STATS_DUMP)
    assert stats[GID] == reports.GroupStats(6, 360, ((1, 60), (2, 120), (3, 180)))
    assert stats[1].buckets == ((5, 300),)


# gw1's group for basic_topo's lb0 as `ovs-ofctl -O OpenFlow15 dump-groups` printed it
# (OVS 3.1: the same bucket bodies as docs/architecture.md's sandbox dump), written out
# rather than rendered from the plan, so a rendering OVS prints otherwise shows here.
# The header (selection method and fields) is held to the real switch by the round trip
# in tests/sandbox/test_bucket_order.py.
DUMPED_BUCKET = {
    1: "weight:100,actions=set_field:00:00:00:00:ff:02->eth_src,"
       "set_field:50:54:00:00:00:01->eth_dst,dec_ttl,set_field:0x2->reg15,resubmit(,37)",
    2: "weight:100,actions=set_field:00:00:00:00:ff:02->eth_src,"
       "set_field:50:54:00:00:00:02->eth_dst,dec_ttl,set_field:0x2->reg15,resubmit(,37)",
}


def test_groups_document_maps_positions_to_bucket_ids() -> None:
    _, snapshot, the_plan = gateway_state()
    # The default hash classes' fields, as test_predict.py checks OVS prints them.
    header = f"type=select,selection_method=hash,{DEFAULT_HASH.fields(4, 'tcp')}"
    # Installed with bucket 2 listed before bucket 1 (as an older agent's undrain of 1
    # appended it): the positions map by list order, and the group is not in sync (the
    # agent puts it back in canonical order: ties go to the later bucket).
    dump = (f" group_id={GID},{header},bucket=bucket_id:2,{DUMPED_BUCKET[2]},"
            f"bucket=bucket_id:1,{DUMPED_BUCKET[1]}\n")
    installed = parse_groups(dump, CONFIG.group_id_base, CONFIG.group_id_base + 0xFFFFFFF)
    stats = {GID: reports.GroupStats(10, 600, ((7, 420), (3, 180)))}
    doc = reports.groups_doc(snapshot, the_plan, CONFIG, installed, stats)
    (g,) = doc["groups"]
    assert set(g) == GROUP_KEYS and g["in_plan"] and not g["in_sync"]
    assert (g["lb"], g["vip"], g["vip_id"], g["packet_count"]) == ("lb0", "172.16.0.100:80",
                                                                   1, 10)
    assert [set(b) for b in g["buckets"]] == [BUCKET_KEYS] * 2
    assert [(b["bucket_id"], b["position"], b["backend"], b["mac"], b["packet_count"])
            for b in g["buckets"]] == [
        (2, 0, "10.0.0.12:8080", "50:54:00:00:00:02", 7),
        (1, 1, "10.0.0.11:8080", "50:54:00:00:00:01", 3)]
    # In canonical order, what OVS prints equals the plan.
    ordered = (f" group_id={GID},{header},bucket=bucket_id:1,{DUMPED_BUCKET[1]},"
               f"bucket=bucket_id:2,{DUMPED_BUCKET[2]}\n")
    doc = reports.groups_doc(snapshot, the_plan, CONFIG,
                               parse_groups(ordered, GID, GID), {})
    assert doc["groups"][0]["in_sync"]
    # A group of ours that no LB owns any more is shown, flagged.
    stale = parse_groups(dump.replace(str(GID), str(GID + 5)), GID, GID + 10)
    doc = reports.groups_doc(snapshot, the_plan, CONFIG, stale, {})
    assert doc["groups"][0]["lb"] is None and doc["groups"][0]["in_plan"] is False


def test_groups_document_of_an_lb_elsewhere_says_where() -> None:
    topo, _, _ = gateway_state()
    snapshot = topo.snapshot("hv1")
    doc = reports.groups_doc(snapshot, plan(snapshot, CONFIG), CONFIG, {}, {}, "lb0")
    assert doc == {"chassis": "hv1", "lb": "lb0", "groups": [], "notes": [
        "hv1 is not an active gateway of lb0 (cr-lr0-public is on gw1)"]}


def test_trace_request_builds_the_intercepted_packet() -> None:
    topo, snapshot, the_plan = gateway_state()
    req = trace.trace_request(snapshot, the_plan, CONFIG,
                                  ["lb0", "172.16.0.50", "40000", "tcp"])
    dgp_key = topo.port_bindings["lr0-public"].tunnel_key
    assert req.flow == (
        f"in_port=CONTROLLER,tcp,metadata=0x3,reg14={dgp_key:#x},dl_src=02:00:00:00:00:01,"
        "dl_dst=00:00:00:00:f0:01,nw_src=172.16.0.50,nw_dst=172.16.0.100,nw_ttl=64,"
        "tp_src=40000,tp_dst=80")
    assert req.actions == "resubmit(,13)" and req.group_id == GID
    assert req.source == "172.16.0.50:40000" and req.vip_key == "172.16.0.100:80"
    # No PROTO: the LB's own.
    assert trace.trace_request(snapshot, the_plan, CONFIG,
                                   ["lb0", "172.16.0.50", "40000", ""]) == req


def test_trace_request_takes_inport_and_mac_from_one_local_dgp() -> None:
    topo = Topo()
    topo.add_router("lr0", 3, {"lr0-public": "gw1", "lr0-public2": "gw2"})
    topo.add_switch("ls0", 1)
    topo.add_vif("ls0", "vm1", "50:54:00:00:00:01", "10.0.0.11", "hv1")
    topo.add_lb("lb0", {"172.16.0.100:80": "10.0.0.11:8080"})
    topo.assign_ids()
    for chassis, dgp in (("gw1", "lr0-public"), ("gw2", "lr0-public2")):
        snapshot = topo.snapshot(chassis)
        req = trace.trace_request(snapshot, plan(snapshot, CONFIG), CONFIG,
                                      ["lb0", "172.16.0.50", "40000", "tcp"])
        key = topo.port_bindings[dgp].tunnel_key
        mac = topo.router_ports[dgp].mac
        assert f",reg14={key:#x},dl_src=02:00:00:00:00:01,dl_dst={mac}," in req.flow, chassis


@pytest.mark.parametrize("argv, chassis, message", [
    (["lb0", "172.16.0.50", "1", "udp"], "gw1", "balances tcp, not udp"),
    (["lb0", "fd00::50", "1", "tcp"], "gw1", "is IPv6, VIP 172.16.0.100:80 is IPv4"),
    (["lb0", "172.16.0.50", "1", "tcp", "172.16.0.1:80"], "gw1", "is not a VIP of lb0"),
    (["lb0", "172.16.0.50", "1", "tcp"], "hv1",
     "hv1 is not an active gateway of lb0 (cr-lr0-public is on gw1): run the trace there"),
    (["lb0", "172.16.0.50,in_port=1", "1", "tcp"], "gw1", "is not an IPv4 or IPv6 address"),
    (["lb0", "172.16.0.50", "65536", "tcp"], "gw1", "is not in 1..65535"),
    (["lb0", "172.16.0.50", "1", "sctp"], "gw1", "protocol sctp is not tcp or udp"),
    (["lb0", "172.16.0.50", "1", "tcp", "172.16.0.100"], "gw1", "VIP 172.16.0.100 has no port"),
])
def test_trace_request_refusals(argv: list[str], chassis: str, message: str) -> None:
    topo, _, _ = gateway_state()
    snapshot = topo.snapshot(chassis)
    with pytest.raises(ValueError) as info:
        trace.trace_request(snapshot, plan(snapshot, CONFIG), CONFIG, argv)
    assert message in str(info.value)


def test_trace_needs_a_vip_when_there_are_several() -> None:
    topo, _, _ = gateway_state()
    topo.update_lb("lb0", vips={"172.16.0.100:80": "10.0.0.11:8080",
                                "172.16.0.100:443": "10.0.0.11:8443"})
    topo.assign_ids()
    snapshot = topo.snapshot("gw1")
    the_plan = plan(snapshot, CONFIG)
    with pytest.raises(ValueError, match="has 2 VIPs .* choose one with --vip"):
        trace.trace_request(snapshot, the_plan, CONFIG, ["lb0", "172.16.0.50", "1", "tcp"])
    req = trace.trace_request(snapshot, the_plan, CONFIG,
                                  ["lb0", "172.16.0.50", "1", "tcp", "172.16.0.100:443"])
    assert req.flow.endswith("tp_dst=443")


def test_trace_parsing_and_document() -> None:
    parsed = trace.parse_trace(TRACE_TEXT)
    assert parsed == {
        "first_table": {"table": 13, "priority": 1000, "cookie": "0x51b06430388e9861",
                        "match": "tcp,reg14=0x1,metadata=0x3,nw_dst=172.16.0.100,tp_dst=80"},
        "scores": {1: 2932600, 2: 3457900}, "bucket_id": 2, "eth_dst": "50:54:00:00:00:02",
        "tunnel_to": "192.168.0.102",
        "datapath_actions": "set(eth(src=00:00:00:00:ff:02,dst=50:54:00:00:00:02)),"
                            "tnl_push(...),4"}
    snapshot, the_plan = full_tuple_state()
    req = trace.trace_request(snapshot, the_plan, CONFIG,
                                  ["lb0", "172.16.0.50", "40000", "tcp"])
    doc = trace.trace_doc(snapshot, CONFIG, req, TRACE_TEXT)
    assert set(doc) == TRACE_KEYS and doc["intercepted"] is True
    assert (doc["hash_classes"], doc["hash_fields"]) == ("5-tuple", GROUP_FIELDS)
    assert doc["backend"] == {"bucket_id": 2, "backend": "10.0.0.12:8080",
                              "mac": "50:54:00:00:00:02", "logical_port": "vm2",
                              "chassis": "hv2"}
    assert doc["scores"] == [{"bucket_id": 1, "backend": "10.0.0.11:8080", "score": 2932600},
                             {"bucket_id": 2, "backend": "10.0.0.12:8080", "score": 3457900}]
    # Scores printed by a real Debian 12 vswitchd: the portable (murmur) hash.
    assert doc["hash_impl"] == "murmur"
    # OVN's own flow matched instead of ours (cookie without our prefix).
    other = TRACE_TEXT.replace("cookie 0x51b06430388e9861", "cookie 0x4f9d2aad")
    assert trace.trace_doc(snapshot, CONFIG, req, other)["intercepted"] is False


def test_hash_build_is_recognised_from_the_scores() -> None:
    packet = FlowTuple.make("172.16.0.50", "172.16.0.100", "tcp", 40000, 80)
    for impl in ("murmur", "crc32"):
        for fields in (GROUP_FIELDS, DEFAULT_HASH.fields(4, "tcp")):
            scores = bucket_scores([1, 2, 3], 100, fields, packet, hash_impl=impl)
            assert trace.hash_impl_of(scores, packet, fields) == impl
    # The scores of one set of fields do not pass for another's.
    scores = bucket_scores([1, 2, 3], 100, GROUP_FIELDS, packet)
    assert trace.hash_impl_of(scores, packet, DEFAULT_HASH.fields(4, "tcp")) is None
    assert trace.hash_impl_of({1: 5, 2: 7}, packet, GROUP_FIELDS) is None
    assert trace.hash_impl_of({}, packet, GROUP_FIELDS) is None


def test_health_problems() -> None:
    now = 1000.0
    good = {"connections": {"nb": True, "sb": True, "ovs": True}, "layout": {"output": 37},
            "last_error": None, "last_full_sync": now - 5, "flows_installed": 3,
            "flows_expected": 3, "groups_installed": 1, "groups_expected": 1}
    assert reports.health_problems(good, 60, now) == []
    bad = dict(good, connections={"nb": False, "sb": True, "ovs": True}, layout=None,
               last_error="bundle failed", last_full_sync=now - 500, flows_installed=2,
               nb_writer_error="NB write failed: error")
    assert reports.health_problems(bad, 60, now) == [
        "not connected to the NB database",
        "OpenFlow table layout not derived yet (is ovn-controller running and connected?)",
        "last update failed: bundle failed",
        "NB write failed: NB write failed: error",
        "last full sync 500s ago (resync_interval is 60s): is the agent stuck?",
        "2 flows installed, 3 expected",
    ]
    assert "no full sync" in reports.health_problems(
        dict(good, last_full_sync=None), 60, now)[0]


def test_vswitchd_control_socket() -> None:
    def conf(vswitchd_ctl: str | None = None) -> SimpleNamespace:
        return SimpleNamespace(ovs=SimpleNamespace(ovs_rundir="/run/openvswitch",
                                                   vswitchd_ctl=vswitchd_ctl))

    assert control.vswitchd_ctl(conf(vswitchd_ctl="/x.ctl")) == "/x.ctl"
    assert control.vswitchd_ctl(conf(), exists=lambda p: True) == (
        "/run/openvswitch/ovs-vswitchd.ctl")
    assert control.vswitchd_ctl(conf(), exists=lambda p: False, read=lambda p: "1234\n") == (
        "/run/openvswitch/ovs-vswitchd.1234.ctl")
    with pytest.raises(ValueError, match="check \\[ovs\\] ovs_rundir"):
        control.vswitchd_ctl(conf(), exists=lambda p: False, read=lambda p: "")
    assert control.appctl_binary("/usr/bin/ovs-ofctl") == "/usr/bin/ovs-appctl"
    assert control.appctl_binary("ovs-ofctl") == "ovs-appctl"


def test_traces_run_the_configured_appctl(monkeypatch) -> None:
    from oslo_config import cfg

    from statelesslb import config

    conf = cfg.ConfigOpts()
    config.register_opts(conf)
    conf(args=[], default_config_files=[])
    conf.set_override("ofctl_path", "/opt/ovs/bin/ovs-ofctl", group="ovs")
    conf.set_override("vswitchd_ctl", "/run/ovs-vswitchd.ctl", group="ovs")
    argvs = []

    def fake_run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        argvs.append(argv)
        return subprocess.CompletedProcess(argv, 0, "traced", "")

    monkeypatch.setattr(control.subprocess, "run", fake_run)
    server = control.CtlServer("/nonexistent/ctl", conf, state=None, request_resync=None)
    assert server._appctl("ofproto/trace") == "traced"
    conf.set_override("appctl_path", "/usr/local/bin/ovs-appctl", group="ovs")
    server._appctl("ofproto/trace")
    assert argvs == [
        ["/opt/ovs/bin/ovs-appctl", "-t", "/run/ovs-vswitchd.ctl", "ofproto/trace"],
        ["/usr/local/bin/ovs-appctl", "-t", "/run/ovs-vswitchd.ctl", "ofproto/trace"]]


# -- human rendering ------------------------------------------------------------------


def test_format_table() -> None:
    text = render.format_table(("A", "LONGER"), [("x", None), ("yyyy", [1, 2]), (True, "")])
    assert text.splitlines() == ["A     LONGER", "x     -", "yyyy  1,2", "yes"]


STATUS = {
    "chassis": "gw1", "healthy": True, "problems": [], "version": "0.1.0", "pid": 42,
    "started_at": 900.0, "now": 1000.0, "bridge_target": "unix:/run/openvswitch/br-int.mgmt",
    "connections": {"nb": True, "sb": True, "ovs": True}, "nb_writer": True,
    "last_full_sync": 990.0, "last_apply": None, "flows_installed": 2, "flows_expected": 2,
    "groups_installed": 1, "groups_expected": 1, "bundles_applied": 3, "wipes_seen": 1,
    "last_error": None, "layout": {"lr_in_intercept": 13, "output": 37},
    "last_apply_ms": {"read_nb": 0.2, "plan": 0.5, "bundle": 9.1, "total": 9.8},
}


def test_render_status() -> None:
    text = render.render_status(STATUS)
    lines = dict(line.split(None, 1) if "  " not in line else
                 (line[:19].strip(), line[19:]) for line in text.splitlines())
    assert lines["health"] == "ok"
    assert lines["connections"] == "nb=up ovs=up sb=up"
    assert lines["nb writer"] == "yes (holds the lock)"
    assert lines["flows"] == "2 installed, 2 expected"
    assert lines["last full sync"].endswith("(10s ago)")
    assert lines["table layout"] == "lr_in_intercept=13 output=37"
    assert lines["last change took"] == "9.8 ms (read_nb 0.2, plan 0.5, bundle 9.1)"
    sick = dict(STATUS, healthy=False, problems=["not connected to the SB database"],
                connections={"nb": True, "sb": False, "ovs": True})
    text = render.render_status(sick)
    assert "PROBLEMS" in text and "sb=DOWN" in text
    assert text.endswith("problem: not connected to the SB database")


def test_render_lb_list() -> None:
    doc = {"chassis": "gw1", "load_balancers": [
        {"name": "lb1", "mode": "mac", "protocol": "tcp", "vips": ["172.16.0.100:80"],
         "persistence": "second-chance", "nb_status": "ok", "state": "ok", "message": "",
         "roles": ["gateway"]},
        {"name": "lb2", "mode": "mac", "protocol": "udp", "vips": ["172.16.0.5:53"],
         "persistence": "hash", "nb_status": "error: not attached to any logical router",
         "state": "error", "message": "not attached to any logical router", "roles": []},
        {"name": "lb3", "mode": "mac", "protocol": "tcp", "vips": [], "nb_status": None,
         "persistence": "affinity", "state": "pending", "message": "ids not yet assigned",
         "roles": []},
    ]}
    assert render.render_lb_list(doc).splitlines() == [
        "NAME  MODE  PROTO  PERSISTENCE    VIPS             NB STATUS  ON GW1   ROLES HERE",
        "lb1   mac   tcp    second-chance  172.16.0.100:80  ok         ok       gateway",
        "lb2   mac   udp    hash           172.16.0.5:53    error      error    -",
        "lb3   mac   tcp    affinity       -                -          pending  -",
        "lb2: NB: error: not attached to any logical router",
        "lb2: gw1: error: not attached to any logical router",
        "lb3: no NB status yet (is an NB writer agent running?)",
        "lb3: gw1: pending: ids not yet assigned",
    ]
    assert "options:stateless_mode=mac" in render.render_lb_list({"load_balancers": []})


def test_render_lb_show() -> None:
    _, snapshot, the_plan = gateway_state()
    text = render.render_lb_show(reports.lb_show_doc(snapshot, the_plan, CONFIG, "lb0"))
    assert text.splitlines() == [
        "load balancer lb0 (uuid-lb-lb0)",
        "  mode mac, protocol tcp, router lr0",
        "  NB status:     ok",
        "  on gw1:        ok, roles: gateway",
        "  persistence:   hash only",
        "  hash:          client-bits:8,port-bits:5 (8,192 classes: at most that many gateway "
        "datapath flows per VIP)",
        "  gateway ports: lr0-public active on gw1 (here)",
        "  drained:       -",
        "",
        f"VIP 172.16.0.100:80  (VIP id 1, group {GID}, installed here)",
        "  BACKEND         BUCKET  MAC                PORT  CHASSIS  DRAINED  HEALTH  "
        "IN GROUP HERE",
        "  10.0.0.11:8080  1       50:54:00:00:00:01  vm1   hv1      no       -       yes",
        "  10.0.0.12:8080  2       50:54:00:00:00:02  vm2   hv2      no       -       yes",
    ]


def test_render_groups() -> None:
    doc = {"chassis": "gw1", "lb": None, "notes": [], "groups": [{
        "group_id": GID, "lb": "lb0", "vip": "172.16.0.100:80", "packet_count": 3,
        "byte_count": 180, "in_plan": True, "in_sync": True, "drained": ["10.0.0.13:8080"],
        "buckets": [{"bucket_id": 2, "backend": "10.0.0.12:8080", "mac": "50:54:00:00:00:02",
                     "logical_port": "vm2", "chassis": "hv2", "packet_count": 3,
                     "byte_count": 180}]}]}
    assert render.render_groups(doc).splitlines() == [
        f"gw1: group {GID}  lb0 VIP 172.16.0.100:80  packets 3 bytes 180  [in sync]",
        "  BUCKET  BACKEND         MAC                PORT  CHASSIS  PACKETS  BYTES",
        "  2       10.0.0.12:8080  50:54:00:00:00:02  vm2   hv2      3        180",
        "  drained (no bucket): 10.0.0.13:8080",
    ]
    doc["groups"][0].update(in_sync=False, in_plan=False)
    assert "[NOT IN PLAN (stale)]" in render.render_groups(doc)
    empty = {"chassis": "hv1", "lb": "lb0", "groups": [], "notes": ["hv1 is not ..."]}
    assert render.render_groups(empty) == (
        "no statelesslb groups of lb0 on hv1\nnote: hv1 is not ...")


def test_render_trace() -> None:
    snapshot, the_plan = full_tuple_state()
    req = trace.trace_request(snapshot, the_plan, CONFIG,
                                  ["lb0", "172.16.0.50", "40000", "tcp"])
    doc = trace.trace_doc(snapshot, CONFIG, req, TRACE_TEXT)
    text = render.render_trace(doc)
    assert text.splitlines() == [
        "lb0 VIP 172.16.0.100:80: tcp from 172.16.0.50:40000 on gw1",
        "  backend 10.0.0.12:8080 (bucket 2, MAC 50:54:00:00:00:02, port vm2 on hv2)",
        "  why: the statelesslb VIP flow in table 13 (cookie 0x51b06430388e9861) matched; "
        f"group {GID}",
        "       picks the live bucket with the highest hash score:",
        "    BUCKET  BACKEND         SCORE",
        "    1       10.0.0.11:8080  2932600",
        "    2       10.0.0.12:8080  3457900  <- chosen",
        "  hash: murmur build of OVS",
        "  hashed: the 5-tuple",
        "  sent through a tunnel to 192.168.0.102",
    ]
    assert render.render_trace(doc, verbose=True).endswith(TRACE_TEXT)
    missed = trace.trace_doc(snapshot, CONFIG, req, "13. No match.\n")
    assert "no backend chosen" in render.render_trace(missed)
    assert "in table 13 nothing matched, not the statelesslb VIP flow" in (
        render.render_trace(missed))


def test_render_drain() -> None:
    doc = {"lb": "lb1", "backend": "10.0.0.11:8080", "bucket_id": 1, "action": "drain",
           "changed": True, "drain": ["10.0.0.11:8080"], "dropped": []}
    assert render.render_drain(doc).splitlines() == [
        "lb1: drained 10.0.0.11:8080 (bucket 1): the gateways remove its bucket; "
        "its DNAT flows stay",
        "drain list now: 10.0.0.11:8080"]
    assert "is already drained; nothing changed" in render.render_drain(dict(doc, changed=False))
    undrain = dict(doc, action="undrain", drain=[], dropped=["'junk'"])
    assert render.render_drain(undrain).splitlines()[1:] == [
        "drain list now: -", "dropped malformed drain entries: 'junk'"]


# -- main() -----------------------------------------------------------------------------


def run_main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = ctl.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_main_reports_a_missing_socket_without_traceback(tmp_path) -> None:
    code, out, err = run_main("--socket", str(tmp_path / "x.ctl"), "lb-list")
    assert (code, out) == (3, "")
    assert err == (f"statelesslb-ctl: no agent socket at {tmp_path}/x.ctl; is "
                   "statelesslb-agent running? (systemctl status statelesslb-agent, or pass "
                   "--socket PATH)\n")


def test_main_version(capsys) -> None:
    assert ctl.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("statelesslb-ctl 0.")


def test_main_usage_errors(tmp_path) -> None:
    code, _, err = run_main("frobnicate")
    assert code == 2 and "invalid choice" in err and err.count("\n") == 1
    code, _, err = run_main("trace", "lb1", "1.2.3.4")
    assert code == 2 and "SRC_PORT" in err
    # No limit, a crash or an endless wait: each a usage error before the agent is asked.
    for seconds in ("0", "-1", "nan", "inf", "1e400", "soon"):
        code, _, err = run_main("--socket", "/s", "--timeout", seconds, "status")
        assert code == 2 and "--timeout" in err and err.count("\n") == 1, (seconds, err)
    code, _, err = run_main("--config-file", str(tmp_path / "none.conf"), "status")
    assert code == 2 and "cannot read the configuration" in err


def test_main_json_and_options_on_either_side(monkeypatch, tmp_path) -> None:
    calls = []

    def fake_call(self, command, *args):
        calls.append((self.path, command, args))
        return {"chassis": "gw1"} if command == "status" else [{"name": "lb1"}]

    monkeypatch.setattr(clients.AgentClient, "call", fake_call)
    code, out, _ = run_main("--format", "json", "lb-list", "--socket", str(tmp_path / "s"))
    assert code == 0
    assert json.loads(out) == {"chassis": "gw1", "load_balancers": [{"name": "lb1"}]}
    assert calls == [(str(tmp_path / "s"), "status", ()), (str(tmp_path / "s"), "lb-list", ())]


def test_main_takes_the_socket_from_the_configuration(monkeypatch, tmp_path) -> None:
    conf = tmp_path / "statelesslb.conf"
    conf.write_text(f"[DEFAULT]\nunixctl_path = {tmp_path}/agent.ctl\n")
    code, _, err = run_main("--config-file", str(conf), "status")
    assert code == 3 and f"no agent socket at {tmp_path}/agent.ctl" in err


def test_status_check_exit_code(monkeypatch) -> None:
    monkeypatch.setattr(clients.AgentClient, "call",
                        lambda self, command: dict(STATUS, healthy=False, problems=["x"]))
    assert run_main("--socket", "/s", "status")[0] == 0
    assert run_main("--socket", "/s", "status", "--check")[0] == 1


def test_drain_key_name() -> None:
    assert EXT_DRAIN == "statelesslb:drain"  # the CLI and docs name this key


# -- persistence layers -------------------------------------------------------------


def second_chance_state(chassis: str, after: float = 10.0):
    """basic_topo with second chance, `after` seconds after vm2's backend was drained.

    Returns (snapshot, plan, since): since is when the NB writer published the
    previous set (its clock, see factories.Topo.assign_ids).
    """
    topo = basic_topo()
    lb = topo.lb("lb0")
    topo.update_lb("lb0", options={**lb.options, PERSISTENCE_OPTION: "second-chance"})
    topo.assign_ids()
    lb = topo.lb("lb0")
    topo.update_lb("lb0", external_ids={**lb.external_ids, EXT_DRAIN: '["10.0.0.12:8080"]'})
    topo.assign_ids()
    since = json.loads(topo.lb("lb0").external_ids[EXT_PREVIOUS])["since"]
    snapshot = topo.snapshot(chassis)
    return snapshot, plan(snapshot, CONFIG, now=since + after), since


def test_lb_show_reports_the_previous_bucket_set() -> None:
    snapshot, the_plan, since = second_chance_state("gw1")
    doc = reports.lb_show_doc(snapshot, the_plan, CONFIG, "lb0")
    assert doc["persistence"] == {"affinity": False, "second_chance": True, "window": 240}
    assert doc["previous"] == {"since": since, "until": since + 240.0, "vips": {
        "172.16.0.100:80": ["10.0.0.11:8080", "10.0.0.12:8080"]}}
    assert doc["drain"] == ["10.0.0.12:8080"]
    assert [b["in_group"] for b in doc["vips"][0]["backends"]] == [True, False]
    text = render.render_lb_show(doc, now=since + 100.0)
    assert ("  persistence:   second-chance (window 240s); previous bucket set in force for "
            "140s more") in text
    assert "previous bucket set expired" in render.render_lb_show(doc, now=since + 300.0)


def test_groups_document_names_previous_set_groups() -> None:
    snapshot, the_plan, _since = second_chance_state("hv1")
    installed = state_after(the_plan).groups
    (gid,) = installed
    assert gid == CONFIG.previous_group_base + 1
    doc = reports.groups_doc(snapshot, the_plan, CONFIG, installed, {}, "lb0")
    (g,) = doc["groups"]
    assert (g["kind"], g["vip_id"], g["in_sync"], g["drained"]) == ("previous", 1, True, [])
    assert [(b["bucket_id"], b["backend"], b["packet_count"]) for b in g["buckets"]] == [
        (1, "10.0.0.11:8080", None), (2, "10.0.0.12:8080", None)]
    # Not a gateway here: the note says where the gateway group is.
    assert doc["notes"] == ["hv1 is not an active gateway of lb0 (cr-lr0-public is on gw1)"]
    assert "(previous bucket set)" in render.render_groups(doc).splitlines()[0]


AFFINITY_PHASE1 = """\
bridge("br-int")
----------------
    resubmit(,13)
13. tcp,reg14=0x1,metadata=0x3,nw_dst=172.16.0.100,tp_dst=80, priority 1000, cookie \
0x51b06c256eda35e8
    ct(table=201,zone=64000)
    drop

Datapath actions: ct(zone=64000),recirc(0x2)

===============================================================================
recirc(0x2) - resume conntrack with default ct_state=trk|new (use --ct-next to customize)
===============================================================================
thaw
     >>>> Recirculation conflict (actions)! <<<<
Translation failed (Recirculation conflict), packet is dropped.
"""

AFFINITY_PHASE2 = """\
bridge("br-int")
----------------
    resubmit(,201)
201. tcp,metadata=0x3,nw_dst=172.16.0.100,tp_dst=80, priority 100, cookie 0x51b0737c2b242730
    group:1879048193
     -> bucket 1: score 5
     -> bucket 2: score 9
     -> using bucket 2
    bucket 2
            set_field:50:54:00:00:00:02->eth_dst
            resubmit(,202)
Datapath actions: ct(commit,zone=64000,mark=0x2/0xffffffff),4
"""


def test_trace_through_the_affinity_lookup() -> None:
    _, snapshot, the_plan = gateway_state()
    req = trace.trace_request(snapshot, the_plan, CONFIG,
                                  ["lb0", "172.16.0.50", "40000", "tcp"])
    assert trace.trace_followup(req, TRACE_TEXT) is None
    flow, actions, zone = trace.trace_followup(req, AFFINITY_PHASE1)
    assert flow == req.flow + ",ct_state=0x21,ct_zone=64000"
    assert (actions, zone) == ("resubmit(,201)", 64000)
    doc = trace.trace_doc(snapshot, CONFIG, req, AFFINITY_PHASE1, AFFINITY_PHASE2, zone)
    assert doc["intercepted"] and doc["first_table"]["table"] == 13
    assert doc["backend"]["bucket_id"] == 2 and doc["backend"]["logical_port"] == "vm2"
    assert doc["datapath_actions"] == "ct(commit,zone=64000,mark=0x2/0xffffffff),4"
    assert "Recirculation conflict" not in doc["trace"]
    assert "--- continued as a NEW connection (ct_state=new|trk in zone 64000) ---" in (
        doc["trace"])
    assert doc["notes"][0].startswith("affinity: a connection already tracked in conntrack "
                                      "zone 64000 keeps the bucket")
    text = render.render_trace(doc)
    assert "  note: affinity: a connection already tracked" in text
    assert all(len(line) <= 99 for line in text.splitlines())


# -- the documented schemas ---------------------------------------------------------------

OPERATION_MD = Path(__file__).resolve().parents[2] / "docs/operation.md"


def status_reply() -> dict:
    """The status of an agent that has not started (no connections, nothing read)."""
    from oslo_config import cfg

    from statelesslb import config
    from statelesslb.agent.service import Agent

    conf = cfg.ConfigOpts()
    config.register_opts(conf)
    conf(args=[], default_config_files=[])
    agent = Agent(conf)
    agent.status.chassis = "gw1"
    server = control.CtlServer("/nonexistent/ctl", conf, agent.state, agent.request_resync)
    return server._status([])


def test_status_reply_reports_problems_of_a_starting_agent() -> None:
    doc = status_reply()
    assert doc["healthy"] is False
    assert "not connected to the NB database" in doc["problems"]
    assert "no full sync with the bridge yet" in doc["problems"]


def test_every_json_field_is_documented() -> None:
    text = OPERATION_MD.read_text()
    lb_list = {"uuid", "name", "mode", "protocol", "persistence", "return", "vips",
               "nb_status",
               "state", "message", "roles", "vip_keys"}
    fields = (set(status_reply()) | lb_list | LB_SHOW_KEYS | VIP_KEYS | BACKEND_KEYS
              | GROUP_KEYS | BUCKET_KEYS | TRACE_KEYS
              | {"action", "changed", "drain", "dropped", "notes"})
    # Written as `field`, "field" or inside a {field, ...} list.
    missing = sorted(f for f in fields if not re.search(
        rf"`{f}`|\"{f}\"|[{{,] ?{f}[,}} (]", text))
    assert missing == []
    _, snapshot, the_plan = gateway_state()
    assert set(reports.lb_list_doc(snapshot, the_plan)[0]) == lb_list
