"""The compact structures issue 15 brought in hold what the plain ones held."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from statelesslb.nb.bucket_ids import _Blocked, allocate_ids
from statelesslb.nb.parse import parse_ip
from statelesslb.nb.topology import Dependents
from statelesslb.openflow.diff import _PlannedBuckets, want_buckets
from statelesslb.openflow.ofctl import parse_groups
from statelesslb.plan.specs import GroupSpec

KEYS = st.sampled_from([("ip", 1), ("ip", 2), ("lsp", "a"), ("lsp", "b"), ("router", "r"),
                        ("binding", "x"), ("all",)])
UUIDS = st.sampled_from(["u1", "u2", "u3", "u4"])
STEPS = st.lists(st.tuples(
    st.sampled_from(["set", "discard"]), UUIDS,
    st.one_of(st.none(), st.frozensets(KEYS, max_size=5))), max_size=40)


@settings(max_examples=300)
@given(STEPS)
def test_dependents_answers_as_a_plain_index(steps):
    deps = Dependents()
    model: dict[str, frozenset | None] = {}
    for op, uuid, keys in steps:
        if op == "set":
            deps.set(uuid, keys)
            model[uuid] = keys
        else:
            deps.discard(uuid)
            model.pop(uuid, None)
        for probe in ([("ip", 1)], [("lsp", "b"), ("all",)], [], [("router", "r"), ("ip", 2)]):
            expected = {u for u, ks in model.items() if ks is None or not ks.isdisjoint(probe)}
            assert deps.of(probe) == expected
    for uuid in list(model):
        deps.discard(uuid)
    assert deps._by_key == {} and deps._readers == {} and deps._keys == {}


def test_dependents_shares_one_entry_among_lbs_reading_the_same_keys():
    deps = Dependents()
    for i in range(100):
        deps.set(f"u{i}", [("ip", 1), ("lsp", "a"), ("router", "r")])
    assert len(deps._readers) == 1
    assert deps.of([("lsp", "a")]) == {f"u{i}" for i in range(100)}
    deps.set("u0", [("ip", 1)])
    assert len(deps._readers) == 2
    assert deps.of([("lsp", "a")]) == {f"u{i}" for i in range(1, 100)}


@given(st.sets(st.integers(1, 60)), st.lists(st.sets(st.sampled_from("abcdef"), max_size=4),
                                              max_size=8))
def test_allocation_from_the_floor_is_the_smallest_free_id(persisted, batches):
    # What the NB writer does for a batch of new LBs, with and without the start hint.
    fast, slow = _Blocked(frozenset(persisted)), _Blocked(frozenset(persisted))
    for keys in batches:
        a = allocate_ids({}, keys, reserved=fast, start=fast.floor())
        b = allocate_ids({}, keys, reserved=slow)
        assert a == b
        fast.update(a.values())
        slow.update(b.values())


def test_planned_buckets_read_as_the_rendered_ones():
    group = GroupSpec(0x7000_0001, buckets={3: "output:1", 1: "output:2"})
    lazy = _PlannedBuckets(group)
    assert dict(lazy.items()) == want_buckets(group)
    assert list(lazy) == [1, 3] and len(lazy) == 2 and lazy[3] == want_buckets(group)[3]


def test_a_bridge_wide_dump_is_parsed_to_our_range_only():
    dump = ("OFPST_GROUP_DESC reply (OF1.5):\n"
            " group_id=5,type=select,selection_method=hash,bucket=bucket_id:0,actions=drop\n"
            " group_id=1879048193,type=select,selection_method=hash,fields(ip_src),"
            "bucket=bucket_id:1,weight:100,actions=output:1,"
            "bucket=bucket_id:2,weight:100,actions=output:2\n")
    groups = parse_groups(dump, 0x7000_0000, 0x7FFF_FFFF)
    assert list(groups) == [0x7000_0001]
    assert dict(groups[0x7000_0001].buckets) == {1: "weight:100,actions=output:1",
                                                 2: "weight:100,actions=output:2"}


def test_the_validation_memo_keeps_two_results_per_lb_however_often_it_changes():
    import dataclasses

    from statelesslb.nb.topology import index_topology
    from statelesslb.nb.validate import ValidationMemo

    from .factories import Topo

    topo = Topo()
    topo.add_router("lr0", 3, {"lr0-public": "gw1"})
    topo.add_switch("ls0", 1)
    for i in range(4):
        topo.add_vif("ls0", f"vm{i}", f"50:54:00:00:01:{i:02x}", f"10.0.0.{11 + i}", "hv1")
    topo.add_lb("s0", {"172.20.0.1:80": "10.0.0.11:8080"})
    memo = ValidationMemo()
    lb = topo.lb("s0")
    for k in range(2, 5):
        members = ",".join(f"10.0.0.{11 + j}:8080" for j in range(k))
        lb = dataclasses.replace(lb, vips={"172.20.0.1:80": members})
        nb = dataclasses.replace(topo.nb(), load_balancers={lb.uuid: lb})
        memo.scope(nb)
        first = memo.validate(lb, nb, index_topology(nb))
        assert memo.validate(lb, nb, index_topology(nb)) is first   # a hit
        assert len(first.backend_keys) == k
    assert len(memo._results) == 1 and len(memo._results[lb.uuid]) == 2


class _CannedOfctl:
    """Ofctl.groups' decision on canned ovs-ofctl output (which commands it runs)."""

    def __init__(self, stats: str, groups: dict[str, str]):
        from statelesslb.openflow.ofctl import Ofctl

        self.ofctl = Ofctl("unix:/nonexistent")
        self.ran: list[tuple[str, ...]] = []

        def run(*args: str, stdin: str | None = None) -> str:
            self.ran.append(args)
            if args[0] == "dump-group-stats":
                return stats
            if args[0] == "dump-groups":
                return "".join(groups.values()) if len(args) == 1 else groups[args[1]]
            raise AssertionError(args)

        self.ofctl.run = run


def _stats_line(gid: int, buckets: int) -> str:
    counters = "".join(f",bucket{i}:packet_count=0,byte_count=0" for i in range(buckets))
    return (f" group_id={gid},duration=1.0s,ref_count=1,packet_count=0,byte_count=0"
            f"{counters}\n")


def _group_line(gid: int) -> str:
    return (f" group_id={gid},type=select,selection_method=hash,"
            "bucket=bucket_id:1,weight:100,actions=output:1\n")


def test_groups_are_read_in_one_dump_only_when_every_group_is_small():
    ours, native = 0x7000_0001, 5
    groups = {str(ours): _group_line(ours), str(native): _group_line(native)}
    small = _CannedOfctl(_stats_line(ours, 1) + _stats_line(native, 300), groups)
    assert list(small.ofctl.groups(0x7000_0000, 0x7FFF_FFFF, [ours], bulk_ok=True)) == [ours]
    assert ("dump-groups",) in small.ran and ("dump-groups", str(ours)) not in small.ran
    # One group over the limit (an OVN LB of 301 backends): ours one by one.
    large = _CannedOfctl(_stats_line(ours, 1) + _stats_line(native, 301), groups)
    assert list(large.ofctl.groups(0x7000_0000, 0x7FFF_FFFF, [ours], bulk_ok=True)) == [ours]
    assert ("dump-groups",) not in large.ran and ("dump-groups", str(ours)) in large.ran
    # Stats that leave out a group we know of (not installed yet, or wiped): with every
    # group small, still the one bridge-wide dump; what it lacks is absent.
    missing = _CannedOfctl(_stats_line(native, 1), {str(native): _group_line(native)})
    assert list(missing.ofctl.groups(0x7000_0000, 0x7FFF_FFFF, [ours], bulk_ok=True)) == []
    assert missing.ran == [("dump-group-stats",), ("dump-groups",)]
    # After a failed bundle (thorough): a known id the stats leave out is read on its
    # own (a group over 64 KiB would hide some from the stats).
    partial = _CannedOfctl(_stats_line(native, 1), groups)
    assert list(partial.ofctl.groups(0x7000_0000, 0x7FFF_FFFF, [ours], bulk_ok=True,
                                     thorough=True)) == [ours]
    assert ("dump-groups",) not in partial.ran and ("dump-groups", str(ours)) in partial.ran
    # The caller did not vouch for the NB's LBs: never a bridge-wide dump.
    unsure = _CannedOfctl(_stats_line(ours, 1), groups)
    unsure.ofctl.groups(0x7000_0000, 0x7FFF_FFFF, [ours])
    assert ("dump-groups",) not in unsure.ran


def test_lbs_sharing_a_backend_share_its_resolution_only_where_it_is_the_same():
    """Validation keeps each backend's resolution in the topology index: LBs listing the
    same backend get the very same ValidBackend; an LB whose ip_port_mappings name
    another port for that IP, or another port number, gets its own."""
    from statelesslb.nb.topology import index_topology
    from statelesslb.nb.validate import ValidLb, validate_lb

    from .factories import basic_topo

    topo = basic_topo(with_lb=False)
    topo.add_switch("ls1", 5, router_port_mac="00:00:00:00:ee:01")
    topo.add_vif("ls1", "vm1-twin", "50:54:00:00:01:01", "10.0.0.11", "hv2")
    mapped = {"10.0.0.11": "vm1-twin:10.0.0.1"}
    topo.add_lb("a", {"172.16.0.100:80": "10.0.0.11:8080"}, ip_port_mappings=mapped)
    topo.add_lb("b", {"172.16.0.101:80": "10.0.0.11:8080"}, ip_port_mappings=mapped)
    topo.add_lb("c", {"172.16.0.102:80": "10.0.0.11:8080"},
                ip_port_mappings={"10.0.0.11": "vm1:10.0.0.1"})
    topo.add_lb("d", {"172.16.0.103:80": "10.0.0.11:9090"}, ip_port_mappings=mapped)
    nb = topo.nb()
    index = index_topology(nb)
    backend = {}
    for name in "abcd":
        valid = validate_lb(topo.lb(name), nb, index)
        assert isinstance(valid, ValidLb), valid
        backend[name] = valid.vips[0].backends[0]
    assert backend["a"] is backend["b"]
    assert (backend["c"].lsp_name, backend["c"].mac) == ("vm1", "50:54:00:00:00:01")
    assert backend["a"].lsp_name == "vm1-twin" and backend["a"].router_port_name == "lr0-ls1"
    assert (backend["d"].port, backend["d"].key) == (9090, "10.0.0.11:9090")
    # Each is what validating against a fresh index gives.
    for name in "abcd":
        fresh = validate_lb(topo.lb(name), nb, index_topology(nb))
        assert fresh.vips[0].backends[0] == backend[name]


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
def test_parsed_addresses_behave_as_ipaddress_ones(plain):
    """The cached hash and text of parse_ip's addresses are the ipaddress ones: an
    address parsed from the NB and one built elsewhere meet in the same dict entry."""
    text = str(plain)
    parsed = parse_ip(text)
    assert parsed == plain and hash(parsed) == hash(plain)
    assert str(parsed) == text and repr(parsed) == repr(plain)
    assert {plain: 1}[parsed] == 1 and sorted([parsed, plain]) == [plain, plain]
    if plain.version == 4:
        assert parse_ip(text + ":80") is None   # an endpoint is not a bare address
        assert parse_ip("::ffff:" + text) == ipaddress.IPv6Address("::ffff:" + text)
