"""options:stateless_hash: parsing, the fields it renders, and what the planner does with it."""

from __future__ import annotations

import json
import random
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from statelesslb.nb.hashing import (
    DEFAULT_HASH,
    FULL_FIELDS,
    HASH_OPTION,
    MAX_CLASS_BITS,
    HashClasses,
    HashOptionError,
    parse_hash,
    port_mask,
)
from statelesslb.nb.model import EXT_DRAIN, EXT_PREVIOUS, PERSISTENCE_OPTION
from statelesslb.observe.predict import FlowTuple, hashed_fields, predict_bucket
from statelesslb.plan.planner import plan
from statelesslb.plan.specs import STATE_ERROR, STATE_OK, PlanConfig

from .factories import basic_topo

CONFIG = PlanConfig()


@pytest.mark.parametrize(("text", "classes", "canonical"), [
    ("5-tuple", None, "5-tuple"),
    ("client-bits:8,port-bits:5", 8192, "client-bits:8,port-bits:5"),
    ("port-bits:5,client-bits:8", 8192, "client-bits:8,port-bits:5"),
    ("client-bits:16", 65536, "client-bits:16"),
    ("port-bits:12", 4096, "port-bits:12"),
    ("client-bits:0,port-bits:1", 2, "port-bits:1"),
])
def test_valid_values(text, classes, canonical):
    parsed = parse_hash({HASH_OPTION: text})
    assert parsed.classes == classes
    assert parsed.text == canonical
    assert parse_hash({HASH_OPTION: parsed.text}) == parsed


@pytest.mark.parametrize("bad", [
    "", "5tuple", "client-bits:8,", ",port-bits:5", "client-bits:8port-bits:5",
    "client-bits:0", "client-bits:17", "client-bits:9,port-bits:8", "port-bits:17",
    "client-bits:08", "client-bits:-1", "client-bits:1,client-bits:2", "CLIENT-BITS:8",
    " client-bits:8", "client-bits:8\nport-bits:1", "ports-bits:3", 5, ["client-bits:8"],
])
def test_bad_values_name_the_option_and_the_forms(bad):
    with pytest.raises(HashOptionError) as err:
        parse_hash({HASH_OPTION: bad})
    assert f"options:{HASH_OPTION}=" in str(err.value)
    assert "5-tuple or client-bits:N,port-bits:M" in str(err.value)


def test_absent_option_is_the_default_and_the_default_is_bounded():
    assert parse_hash({}) == parse_hash(None) == DEFAULT_HASH
    assert DEFAULT_HASH.bounded and DEFAULT_HASH.classes <= 1 << MAX_CLASS_BITS


def test_fields_are_spelled_as_ovs_prints_them():
    # dump-groups on OVS 3.1 prints masked ports in decimal and addresses as
    # addresses; the diff compares this text with the dump, so it must match.
    h = HashClasses(8, 5)
    assert h.fields(4, "tcp") == "fields(ip_src=0.0.0.255,ip_dst,nw_proto,tcp_src=62,tcp_dst)"
    assert h.fields(6, "udp") == "fields(ipv6_src=::ff,ipv6_dst,nw_proto,udp_src=62,udp_dst)"
    assert HashClasses(0, 12).fields(4, "udp") == "fields(ip_dst,nw_proto,udp_src=8190,udp_dst)"
    assert HashClasses(16, 0).fields(4, "tcp") == (
        "fields(ip_src=0.0.255.255,ip_dst,nw_proto,tcp_dst)")
    assert HashClasses().fields(4, "tcp") == FULL_FIELDS


@given(client=st.integers(0, 16), port=st.integers(0, 16), seed=st.integers(0, 2**32))
def test_a_class_is_what_the_group_hashes(client, port, seed):
    """Packets that differ only in unhashed bits pick the same bucket; the hashed
    values of any set of packets number at most 2**(client + port) per VIP."""
    if not 1 <= client + port <= MAX_CLASS_BITS:
        return
    rng = random.Random(seed)
    fields = HashClasses(client, port).fields(4, "tcp")
    a = FlowTuple(4, f"198.51.{rng.randrange(256)}.{rng.randrange(256)}", "172.16.0.100",
                  6, rng.randrange(1024, 65536), 80)
    keep_ip = (1 << client) - 1
    keep_port = port_mask(port) if port else 0
    b_ip = (int(a.src) & keep_ip) | (rng.getrandbits(32) & ~keep_ip & 0xFFFFFFFF)
    b_port = (a.sport & keep_port) | (rng.getrandbits(16) & ~keep_port & 0xFFFF)
    b = FlowTuple(4, str(IPv4Address(b_ip)), "172.16.0.100", 6,
                  b_port, 80)
    buckets = list(range(1, 17))
    assert hashed_fields(fields, a) == hashed_fields(fields, b)
    assert predict_bucket(buckets, 100, fields, a) == predict_bucket(buckets, 100, fields, b)


def test_class_count_over_many_clients_is_bounded():
    rng = random.Random(7)
    fields = DEFAULT_HASH.fields(4, "tcp")
    seen = {tuple(hashed_fields(fields, FlowTuple(
        4, f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}",
        "172.16.0.100", 6, rng.randrange(1024, 65536), 80))) for _ in range(50_000)}
    assert len(seen) <= DEFAULT_HASH.classes
    # ... and most classes are reached: the bound is not a trivial one.
    assert len(seen) > DEFAULT_HASH.classes * 0.9


def test_even_source_ports_reach_every_class():
    """Linux hands connect() even source ports: the port bits skip bit 0, so clients
    that only ever use even ports still spread over all the classes (hashing bits 0..4
    left half of them empty, and a 16-backend VIP 1.15 of the mean in the bench)."""
    rng = random.Random(11)
    fields = DEFAULT_HASH.fields(4, "tcp")
    seen = {tuple(hashed_fields(fields, FlowTuple(
        4, f"10.0.{rng.randrange(256)}.{rng.randrange(256)}", "172.16.0.100", 6,
        rng.randrange(16384, 65536) & ~1, 80))) for _ in range(50_000)}
    assert len(seen) > DEFAULT_HASH.classes * 0.9
    assert port_mask(5) == 0b111110 and port_mask(16) == 0xFFFF


def _planned(topo, chassis, now=None):
    snapshot = topo.snapshot(chassis)
    return plan(snapshot, CONFIG, now=topo.clock if now is None else now)


def test_each_lb_gets_its_own_fields_and_a_bad_value_harms_no_other_lb():
    topo = basic_topo(with_lb=False)
    topo.add_lb("full", {"172.16.0.100:80": "10.0.0.11:8080,10.0.0.12:8080"})
    topo.add_lb("bounded", {"172.16.0.101:53": "10.0.0.11:5353"}, protocol="udp")
    topo.add_lb("bad", {"172.16.0.102:80": "10.0.0.12:8080"})
    for name, value in (("full", "5-tuple"), ("bounded", "client-bits:4,port-bits:2"),
                        ("bad", "client-bits:20")):
        lb = topo.lb(name)
        topo.update_lb(name, options={**lb.options, HASH_OPTION: value})
    topo.assign_ids()
    result = _planned(topo, "gw1")
    by_vip = {}
    for lb in topo.load_balancers.values():
        vip_ids = json.loads(lb.external_ids.get("statelesslb:vip_ids", "{}"))
        for key, vip_id in vip_ids.items():
            by_vip[key] = result.groups.get(CONFIG.group_id_base + vip_id)
    assert by_vip["172.16.0.100:80"].fields == FULL_FIELDS
    assert by_vip["172.16.0.101:53"].fields == (
        "fields(ip_src=0.0.0.15,ip_dst,nw_proto,udp_src=6,udp_dst)")
    status = result.lb_status
    assert status["uuid-lb-full"].state == STATE_OK
    assert status["uuid-lb-bounded"].state == STATE_OK
    assert status["uuid-lb-bad"].state == STATE_ERROR
    assert "options:stateless_hash='client-bits:20'" in status["uuid-lb-bad"].message
    assert "172.16.0.102:80" not in by_vip or by_vip["172.16.0.102:80"] is None


def test_backends_previous_set_group_hashes_as_the_gateways_did():
    """Second chance finds the previous owner only if the backend's copy of the old
    bucket set hashes the same fields as the gateways' group."""
    topo = basic_topo()
    lb = topo.lb("lb0")
    topo.update_lb("lb0", options={**lb.options, PERSISTENCE_OPTION: "second-chance",
                                   HASH_OPTION: "client-bits:6,port-bits:3"})
    topo.assign_ids()
    gateway_group = next(iter(_planned(topo, "gw1").groups.values()))
    lb = topo.lb("lb0")
    topo.update_lb("lb0", external_ids={**lb.external_ids, EXT_DRAIN: '["10.0.0.12:8080"]'})
    topo.assign_ids()
    since = json.loads(topo.lb("lb0").external_ids[EXT_PREVIOUS])["since"]
    backend_plan = _planned(topo, "hv1", now=since + 1)
    previous = backend_plan.groups[CONFIG.previous_group_base + 1]
    assert previous.fields == gateway_group.fields == (
        "fields(ip_src=0.0.0.63,ip_dst,nw_proto,tcp_src=14,tcp_dst)")
    assert sorted(previous.buckets) == sorted(gateway_group.buckets) == [1, 2]
