from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statelesslb.nb.bucket_ids import IdSpaceExhausted, allocate_ids, reconcile_nb
from statelesslb.nb.model import (
    EXT_ACTIVE,
    EXT_BUCKETS,
    EXT_DRAIN,
    EXT_PREVIOUS,
    EXT_STATUS,
    EXT_VIP_IDS,
    PERSISTENCE_OPTION,
)
from statelesslb.nb.stored import (
    MAX_BUCKET_ID,
    dump_drain,
    dump_id_map,
    parse_drain,
    parse_drain_checked,
    parse_id_map,
)

from .factories import basic_topo

# -- allocate_ids ------------------------------------------------------------------


def test_new_keys_get_the_smallest_free_ids_in_sorted_order():
    assert allocate_ids({}, ["b", "c", "a"]) == {"a": 1, "b": 2, "c": 3}
    assert allocate_ids({"a": 1, "c": 3}, ["a", "c", "d", "b"]) == {
        "a": 1, "b": 2, "c": 3, "d": 4}


def test_removed_keys_free_their_ids_and_survivors_keep_theirs():
    ids = allocate_ids({"a": 1, "b": 2, "c": 3}, ["a", "c"])
    assert ids == {"a": 1, "c": 3}
    assert allocate_ids(ids, ["a", "c", "z"]) == {"a": 1, "c": 3, "z": 2}


def test_reserved_ids_are_not_handed_out_but_do_not_evict():
    assert allocate_ids({"a": 2}, ["a", "b", "c"], reserved={1, 2, 3}) == {
        "a": 2, "b": 4, "c": 5}


def test_duplicated_or_out_of_range_stored_ids_are_replaced():
    stored = {"a": 5, "b": 5, "c": 0, "d": MAX_BUCKET_ID + 1, "e": True, "f": "7"}
    ids = allocate_ids(stored, "abcdef")
    assert ids["a"] == 5                      # first in sorted order keeps it
    assert sorted(ids.values()) == [1, 2, 3, 4, 5, 6]


def test_exhaustion_raises():
    assert allocate_ids({}, ["a", "b"], max_id=2) == {"a": 1, "b": 2}
    with pytest.raises(IdSpaceExhausted):
        allocate_ids({}, ["a", "b", "c"], max_id=2)
    with pytest.raises(IdSpaceExhausted):
        allocate_ids({}, ["a"], reserved={1, 2}, max_id=2)


operations = st.lists(
    st.tuples(st.booleans(), st.sampled_from([f"10.0.0.{i}:80" for i in range(12)])),
    max_size=60,
)


@given(operations)
def test_allocation_is_stable_unique_and_compact(ops):
    live: set[str] = set()
    ids: dict[str, int] = {}
    peak = 0
    for add, key in ops:
        (live.add if add else live.discard)(key)
        previous = ids
        ids = allocate_ids(previous, live)
        peak = max(peak, len(live))
        assert set(ids) == live
        assert all(ids[k] == previous[k] for k in live & previous.keys())
        assert len(set(ids.values())) == len(ids)
        # Smallest-free allocation never needs more ids than keys ever lived at once.
        assert all(1 <= v <= peak for v in ids.values())


@given(st.dictionaries(st.text(max_size=5), st.integers(-3, 30), max_size=10),
       st.lists(st.text(max_size=5), max_size=12),
       st.frozensets(st.integers(1, 30), max_size=10))
def test_allocation_of_any_input_is_deterministic_and_unique(stored, keys, reserved):
    ids = allocate_ids(stored, keys, reserved=reserved)
    assert ids == allocate_ids(dict(reversed(stored.items())), list(reversed(keys)),
                               reserved=reserved)
    assert set(ids) == set(keys)
    assert len(set(ids.values())) == len(ids)
    new_ids = {v for k, v in ids.items() if stored.get(k) != v}
    assert not new_ids & reserved


# -- id maps and drain lists ----------------------------------------------------------


def test_id_map_round_trip_is_deterministic():
    text = dump_id_map({"b": 2, "a": 1})
    assert text == '{"a":1,"b":2}'
    assert parse_id_map(text) == {"a": 1, "b": 2}
    assert dump_id_map({"a": 1, "b": 2}) == text


@pytest.mark.parametrize("text", [
    "", "{", "[]", "null", "1", '"x"', '{"a": "1"}', '{"a": 0}', '{"a": -1}', '{"a": true}',
    '{"a": 1.0}', '{"a": null}', '{"a": [1]}', "[" * 100_000, '{"a": ' + "9" * 5000 + "}",
    "NaN", b"{}",
])
def test_malformed_id_maps_parse_to_none(text):
    assert parse_id_map(text) is None


def test_absent_id_map_is_empty():
    assert parse_id_map(None) == {}
    assert parse_id_map("{}") == {}


def test_drain_list_is_canonicalised():
    assert parse_drain('["10.0.0.11:8080", "[FD00:0::11]:80"]') == {
        "10.0.0.11:8080", "[fd00::11]:80"}
    assert parse_drain(dump_drain(["10.0.0.12:80", "10.0.0.11:80"])) == {
        "10.0.0.11:80", "10.0.0.12:80"}
    assert parse_drain_checked(None) == (frozenset(), [])


@pytest.mark.parametrize("text, keys, dropped", [
    ("nope", set(), ["nope"]),
    ('{"10.0.0.11:8080": 1}', set(), ['{"10.0.0.11:8080": 1}']),
    ("[" * 50_000, set(), ["[" * 50_000]),
    ('["10.0.0.11:8080", 7, "garbage"]', {"10.0.0.11:8080"}, [7, "garbage"]),
])
def test_malformed_drain_lists_are_flagged(text, keys, dropped):
    assert parse_drain_checked(text) == (frozenset(keys), dropped)


# -- reconcile_nb -------------------------------------------------------------------


def ids_of(topo, name, key=EXT_BUCKETS):
    return json.loads(topo.lb(name).external_ids[key])


ACTIVE_TEXT = ('{"172.16.0.100:80":{"10.0.0.11:8080":[1,"50:54:00:00:00:01","vm1"],'
               '"10.0.0.12:8080":[2,"50:54:00:00:00:02","vm2"]}}')


@pytest.mark.parametrize("persistence", ["hash", "affinity", "second-chance"])
def test_fresh_lb_gets_ids_and_ok_status_then_nothing_changes(persistence):
    topo = basic_topo()
    lb = topo.lb("lb0")
    topo.update_lb("lb0", options={**lb.options, PERSISTENCE_OPTION: persistence})
    changes = reconcile_nb(topo.load_balancers.values(), topo.nb())
    want = {
        EXT_VIP_IDS: '{"172.16.0.100:80":1}',
        EXT_BUCKETS: '{"10.0.0.11:8080":1,"10.0.0.12:8080":2}',
        EXT_STATUS: "ok",
    }
    if persistence == "second-chance":
        # Only a second chance needs the set the gateways use recorded: the next change
        # publishes it as the previous set.
        want[EXT_ACTIVE] = ACTIVE_TEXT
    assert changes == {"uuid-lb-lb0": want}
    topo.write(changes)
    assert reconcile_nb(topo.load_balancers.values(), topo.nb()) == {}


def test_the_active_set_comes_and_goes_with_second_chance():
    topo = basic_topo()
    lb = topo.lb("lb0")
    topo.writer_pass()
    assert EXT_ACTIVE not in topo.lb("lb0").external_ids
    # Turned on: recorded at once (there is no earlier set to keep).
    topo.update_lb("lb0", options={**lb.options, PERSISTENCE_OPTION: "second-chance"})
    changes = reconcile_nb(topo.load_balancers.values(), topo.nb(), now=1000.0)
    assert changes == {"uuid-lb-lb0": {EXT_ACTIVE: ACTIVE_TEXT}}
    topo.write(changes)
    # A change: phase 1 publishes the previous set.
    topo.update_lb("lb0", vips={"172.16.0.100:80": "10.0.0.11:8080"})
    changes = reconcile_nb(topo.load_balancers.values(), topo.nb(), now=1001.0)
    assert EXT_PREVIOUS in changes["uuid-lb-lb0"]
    topo.write(changes)
    # Turned off in the middle of it: both sets go (an older writer's stale ones too).
    topo.update_lb("lb0", options={**lb.options, PERSISTENCE_OPTION: "hash"})
    changes = reconcile_nb(topo.load_balancers.values(), topo.nb(), now=1002.0)
    assert changes["uuid-lb-lb0"][EXT_ACTIVE] is None
    assert changes["uuid-lb-lb0"][EXT_PREVIOUS] is None
    topo.write(changes)
    assert {EXT_ACTIVE, EXT_PREVIOUS}.isdisjoint(topo.lb("lb0").external_ids)
    assert reconcile_nb(topo.load_balancers.values(), topo.nb(), now=1003.0) == {}


def test_backend_shared_by_two_vips_of_one_lb_shares_its_bucket_id():
    topo = basic_topo(with_lb=False)
    topo.add_lb("lb0", {"172.16.0.100:80": "10.0.0.12:8080,10.0.0.11:8080",
                        "172.16.0.100:443": "10.0.0.11:8080"})
    topo.writer_pass()
    assert ids_of(topo, "lb0") == {"10.0.0.11:8080": 1, "10.0.0.12:8080": 2}
    assert ids_of(topo, "lb0", EXT_VIP_IDS) == {"172.16.0.100:443": 1, "172.16.0.100:80": 2}


def test_vip_ids_are_unique_across_lbs_and_bucket_ids_are_per_lb():
    topo = basic_topo()
    topo.add_lb("lb1", {"172.16.0.101:80": "10.0.0.12:8080"})
    topo.writer_pass()
    assert ids_of(topo, "lb0", EXT_VIP_IDS) == {"172.16.0.100:80": 1}
    assert ids_of(topo, "lb1", EXT_VIP_IDS) == {"172.16.0.101:80": 2}
    assert ids_of(topo, "lb1") == {"10.0.0.12:8080": 1}


def test_backend_change_keeps_surviving_ids():
    topo = basic_topo()
    topo.writer_pass()
    topo.add_vif("ls0", "vm3", "50:54:00:00:00:03", "10.0.0.13", "hv1")
    topo.update_lb("lb0", vips={"172.16.0.100:80": "10.0.0.13:8080,10.0.0.12:8080"})
    topo.writer_pass()
    assert ids_of(topo, "lb0") == {"10.0.0.12:8080": 2, "10.0.0.13:8080": 1}


def test_a_vip_id_freed_in_one_pass_is_not_reused_in_the_same_pass():
    topo = basic_topo()
    topo.add_lb("lb1", {"172.16.0.101:80": "10.0.0.12:8080"})
    topo.writer_pass()
    topo.update_lb("lb0", vips={"172.16.0.102:80": "10.0.0.11:8080"})   # frees VIP id 1
    topo.update_lb("lb1", vips={"172.16.0.101:80": "10.0.0.12:8080",
                                "172.16.0.103:80": "10.0.0.12:8080"})
    topo.writer_pass()
    assert ids_of(topo, "lb0", EXT_VIP_IDS) == {"172.16.0.102:80": 3}
    assert ids_of(topo, "lb1", EXT_VIP_IDS) == {"172.16.0.101:80": 2, "172.16.0.103:80": 4}
    # Next pass: id 1 is free again.
    topo.add_lb("lb2", {"172.16.0.104:80": "10.0.0.11:8080"})
    topo.writer_pass()
    assert ids_of(topo, "lb2", EXT_VIP_IDS) == {"172.16.0.104:80": 1}


def test_invalid_lb_keeps_its_ids_and_reports_the_error():
    topo = basic_topo()
    topo.writer_pass()
    before = dict(topo.lb("lb0").external_ids)
    topo.update_lb("lb0", vips={"172.16.0.100:80": "10.0.0.11:8080,10.0.0.99:8080"})
    changes = reconcile_nb(topo.load_balancers.values(), topo.nb())
    assert changes == {"uuid-lb-lb0": {EXT_STATUS: (
        "error: backend 10.0.0.99:8080 of VIP 172.16.0.100:80 matches no logical switch port "
        "on a switch attached to router lr0")}}
    topo.write(changes)
    assert topo.lb("lb0").external_ids[EXT_BUCKETS] == before[EXT_BUCKETS]
    # A typo that cannot even be parsed keeps them too.
    topo.update_lb("lb0", vips={"172.16.0.100:80": "10.0.0.11:80:80"})
    changes = reconcile_nb(topo.load_balancers.values(), topo.nb())
    assert set(changes["uuid-lb-lb0"]) == {EXT_STATUS}
    assert changes["uuid-lb-lb0"][EXT_STATUS].startswith("error: backend ")


def test_invalid_lb_keeps_even_a_malformed_map():
    topo = basic_topo(with_lb=False)
    topo.add_lb("lb0", {"172.16.0.100": "10.0.0.11:8080"},
                external_ids={EXT_BUCKETS: "{oops", EXT_VIP_IDS: "[]"})
    changes = reconcile_nb(topo.load_balancers.values(), topo.nb())
    assert changes == {"uuid-lb-lb0": {EXT_STATUS: (
        "error: stateless_mode=mac needs a port on VIP 172.16.0.100 "
        "(write IPv4:port or [IPv6]:port)")}}


def test_malformed_maps_are_reallocated_and_said_so():
    topo = basic_topo(with_lb=False)
    topo.add_lb("lb0", {"172.16.0.100:80": "10.0.0.11:8080"},
                external_ids={EXT_BUCKETS: "{oops", EXT_VIP_IDS: '{"172.16.0.100:80": 0}'})
    changes = reconcile_nb(topo.load_balancers.values(), topo.nb())["uuid-lb-lb0"]
    assert changes[EXT_BUCKETS] == '{"10.0.0.11:8080":1}'
    assert changes[EXT_VIP_IDS] == '{"172.16.0.100:80":1}'
    assert changes[EXT_STATUS] == ("ok (bucket ids re-allocated: stored map was malformed; "
                                   "VIP ids re-allocated: stored map was malformed)")
    topo.write({"uuid-lb-lb0": changes})
    assert reconcile_nb(topo.load_balancers.values(), topo.nb()) == {
        "uuid-lb-lb0": {EXT_STATUS: "ok"}}


def test_vip_id_used_by_two_lbs_stays_with_the_first_by_name():
    topo = basic_topo(with_lb=False)
    copied = {EXT_VIP_IDS: '{"172.16.0.100:80":7}'}
    topo.add_lb("b", {"172.16.0.100:80": "10.0.0.11:8080"}, external_ids=copied)
    topo.add_lb("a", {"172.16.0.100:80": "10.0.0.12:8080"}, external_ids=copied)
    changes = reconcile_nb(topo.load_balancers.values(), topo.nb())
    assert EXT_VIP_IDS not in changes["uuid-lb-a"]
    assert changes["uuid-lb-b"][EXT_VIP_IDS] == '{"172.16.0.100:80":1}'
    assert changes["uuid-lb-b"][EXT_STATUS] == (
        "ok (VIP id 7 of 172.16.0.100:80 re-allocated: also used by load balancer a)")


def test_unmarked_lb_loses_the_writer_keys_but_keeps_the_drain_list():
    topo = basic_topo(with_lb=False)
    topo.add_lb("lb0", {"172.16.0.100:80": "10.0.0.11:8080"}, marked=False, external_ids={
        EXT_BUCKETS: "{}", EXT_STATUS: "ok", EXT_DRAIN: "[]", "other": "x"})
    topo.add_lb("plain", {"172.16.0.100:80": "10.0.0.11:8080"}, marked=False)
    assert reconcile_nb(topo.load_balancers.values(), topo.nb()) == {
        "uuid-lb-lb0": {EXT_BUCKETS: None, EXT_STATUS: None}}


def test_drained_backends_keep_their_ids_and_drain_problems_are_reported():
    topo = basic_topo()
    lb = topo.lb("lb0")
    topo.update_lb("lb0", options={**lb.options, PERSISTENCE_OPTION: "second-chance"})
    topo.writer_pass()
    before = topo.lb("lb0").external_ids[EXT_BUCKETS]
    ext = dict(topo.lb("lb0").external_ids)
    ext[EXT_DRAIN] = '["10.0.0.11:8080", "10.0.0.77:1", 5]'
    topo.update_lb("lb0", external_ids=ext)
    changes = reconcile_nb(topo.load_balancers.values(), topo.nb(), now=1000.0)
    assert changes["uuid-lb-lb0"][EXT_STATUS] == (
        "ok (statelesslb:drain is not a JSON list of IP:port strings; bad entries ignored; "
        "statelesslb:drain names 10.0.0.77:1: not a backend)")
    # Phase 1: the gateways' current set is published as "previous", stamped; the
    # gateways' "active" set does not change yet.
    assert EXT_ACTIVE not in changes["uuid-lb-lb0"]
    previous = json.loads(changes["uuid-lb-lb0"][EXT_PREVIOUS])
    assert previous["since"] == 1000.0
    assert set(previous["vips"]["172.16.0.100:80"]) == {"10.0.0.11:8080", "10.0.0.12:8080"}
    topo.write(changes)
    # With no chassis to wait for (no SB given), the next pass moves the gateways
    # (tests/unit/test_acks.py: the wait for the backends' chassis).
    later = reconcile_nb(topo.load_balancers.values(), topo.nb(), now=1000.1)
    assert json.loads(later["uuid-lb-lb0"][EXT_ACTIVE]) == {
        "172.16.0.100:80": {"10.0.0.12:8080": [2, "50:54:00:00:00:02", "vm2"]}}
    assert EXT_PREVIOUS not in later["uuid-lb-lb0"]
    assert EXT_BUCKETS not in changes["uuid-lb-lb0"]
    assert topo.lb("lb0").external_ids[EXT_BUCKETS] == before


def test_only_the_given_lbs_are_updated_but_all_vip_ids_are_respected():
    topo = basic_topo()
    topo.add_lb("lb1", {"172.16.0.101:80": "10.0.0.12:8080"},
                external_ids={EXT_VIP_IDS: '{"172.16.0.101:80":1}'})
    changes = reconcile_nb([topo.lb("lb0")], topo.nb())
    assert set(changes) == {"uuid-lb-lb0"}
    assert changes["uuid-lb-lb0"][EXT_VIP_IDS] == '{"172.16.0.100:80":2}'


vip_pool = [f"172.16.0.{100 + i}:80" for i in range(6)]
backend_pool = ["10.0.0.11:8080", "10.0.0.12:8080", "10.0.0.11:9090", "10.0.0.12:9090"]
lb_specs = st.lists(
    st.dictionaries(st.sampled_from(vip_pool),
                    st.sampled_from(["10.0.0.11:8080", "10.0.0.12:8080,10.0.0.11:9090",
                                     "10.0.0.12:9090", "10.0.0.99:1", ""]),
                    max_size=4),
    min_size=1, max_size=4,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(lb_specs, min_size=1, max_size=4))
def test_reconcile_converges_with_unique_vip_ids_and_stable_buckets(rounds):
    topo = basic_topo(with_lb=False)
    previous_buckets: dict[str, dict[str, int]] = {}
    for specs in rounds:
        for i, vips in enumerate(specs):
            name = f"lb{i}"
            if f"uuid-lb-{name}" in topo.load_balancers:
                topo.update_lb(name, vips=vips)
            else:
                topo.add_lb(name, vips)
        topo.writer_pass()
        assert reconcile_nb(topo.load_balancers.values(), topo.nb()) == {}
        all_vip_ids = []
        for lb in topo.load_balancers.values():
            status = lb.external_ids[EXT_STATUS]
            if status != "ok":
                assert status.startswith("error: ")
                continue
            vip_ids = json.loads(lb.external_ids[EXT_VIP_IDS])
            buckets = json.loads(lb.external_ids[EXT_BUCKETS])
            assert set(vip_ids) == set(lb.vips)
            all_vip_ids += vip_ids.values()
            old = previous_buckets.get(lb.uuid, {})
            assert all(buckets[k] == old[k] for k in buckets.keys() & old.keys())
            previous_buckets[lb.uuid] = buckets
        assert len(all_vip_ids) == len(set(all_vip_ids))
