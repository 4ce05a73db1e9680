"""The diff keeps every group's buckets in canonical (ascending id) order.

`apply` models OVS 3.1's group edits (ofproto.c, copy_buckets_for_insert_bucket):
insert_bucket puts the new buckets after command_bucket_id, at the front for
"first", at the end for "last"; remove_bucket drops one. The real switch is held to
the same in tests/sandbox/test_bucket_order.py.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from statelesslb.openflow.diff import diff_lines, in_canonical_order
from statelesslb.openflow.ofctl import InstalledGroup, InstalledState
from statelesslb.plan.specs import GROUP_FIELDS, GroupSpec, Plan

GID = 0x70000001
HEADER = f"type=select,selection_method=hash,{GROUP_FIELDS}"
_INSERT = re.compile(r"^group insert_bucket group_id=\d+,command_bucket_id=(\w+),"
                     r"bucket=bucket_id:(\d+),(.*)$")
_REMOVE = re.compile(r"^group remove_bucket group_id=\d+,command_bucket_id=(\d+)$")


def apply(buckets: list[tuple[int, str]], line: str) -> list[tuple[int, str]]:
    if m := _REMOVE.match(line):
        bid = int(m.group(1))
        assert any(b == bid for b, _ in buckets), f"remove of absent bucket {bid}"
        return [(b, t) for b, t in buckets if b != bid]
    m = _INSERT.match(line)
    assert m, line
    where, bid, text = m.group(1), int(m.group(2)), m.group(3)
    assert all(b != bid for b, _ in buckets), f"duplicate bucket {bid}"
    if where == "last":
        return [*buckets, (bid, text)]
    if where == "first":
        return [(bid, text), *buckets]
    at = [b for b, _ in buckets].index(int(where))   # ValueError: unknown bucket
    return [*buckets[:at + 1], (bid, text), *buckets[at + 1:]]


def spec(buckets: dict[int, str]) -> GroupSpec:
    return GroupSpec(GID, GROUP_FIELDS, buckets)


def converge(have: list[tuple[int, str]], want: GroupSpec) -> tuple[list, list[str]]:
    state = InstalledState(set(), {GID: InstalledGroup(GID, HEADER, dict(have))})
    lines = diff_lines(Plan({GID: want}, {}, {}, 0), state)
    for line in lines:
        have = apply(have, line)
    return have, lines


def as_list(group: GroupSpec) -> list[tuple[int, str]]:
    return [(b, f"weight:100,actions={a}") for b, a in group.buckets.items()]


def test_a_reused_low_id_goes_in_at_its_place_not_at_the_end():
    have = as_list(spec({1: "output:1", 3: "output:3", 4: "output:4"}))
    got, lines = converge(have, spec({1: "output:1", 2: "output:2", 3: "output:3",
                                      4: "output:4", 9: "output:9"}))
    assert [b for b, _ in got] == [1, 2, 3, 4, 9]
    assert [line.split(",")[1] for line in lines] == ["command_bucket_id=1",
                                                       "command_bucket_id=4"]


def test_the_smallest_id_goes_first():
    got, lines = converge(as_list(spec({5: "output:5"})), spec({2: "x", 5: "output:5"}))
    assert [b for b, _ in got] == [2, 5] and "command_bucket_id=first" in lines[0]


def test_an_out_of_order_group_is_repaired_with_the_fewest_moves():
    want = spec({b: f"output:{b}" for b in range(1, 8)})
    scrambled = [as_list(want)[i] for i in (0, 1, 5, 2, 3, 4, 6)]   # 6 appended early
    got, lines = converge(scrambled, want)
    assert got == as_list(want)
    assert lines == [want.remove_bucket_line(6), want.insert_bucket_line(6, 5)]


def test_longest_run_in_order():
    assert in_canonical_order([]) == []
    assert in_canonical_order([3, 1, 2, 5, 4, 6]) == [1, 2, 4, 6]
    assert in_canonical_order([9, 8, 7]) == [7]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(st.integers(1, 40), st.sampled_from("abc"), max_size=25),
                min_size=1, max_size=12),
       st.permutations(range(25)))
def test_any_history_ends_in_the_order_of_a_fresh_install(history, shuffle):
    # Start from the first set in a scrambled order (an old agent's appends).
    first = as_list(spec({b: f"output:{t}" for b, t in history[0].items()}))
    have = [first[i] for i in shuffle if i < len(first)]
    for buckets in history:
        want = spec({b: f"output:{t}" for b, t in buckets.items()})
        have, _ = converge(have, want)
        assert have == as_list(want)   # what `group add` of `want` lists, in its order


def test_buckets_are_compared_by_meaning_not_spelling():
    """A bucket that OVS prints back otherwise (3 for 0x3, a MAC without its leading
    zeros) does the same: no bundle line. One that does something else is replaced."""
    want = spec({1: "set_field:00:00:00:00:ff:02->eth_src,set_field:0x3->reg15,"
                    "resubmit(,37)",
                 2: "set_field:00:00:00:00:ff:02->eth_src,set_field:0x4->reg15,"
                    "resubmit(,37)"})
    respelled = [(1, "weight:100,actions=set_field:0:0:0:0:ff:2->eth_src,set_field:3->reg15,"
                     "resubmit(,37)"),
                 (2, "weight:100,actions=set_field:00:00:00:00:ff:02->eth_src,"
                     "set_field:4->reg15,resubmit(,37)")]
    have, lines = converge(respelled, want)
    assert lines == [] and have == respelled
    changed = [respelled[0], (2, respelled[1][1].replace("set_field:4->reg15",
                                                        "set_field:5->reg15"))]
    have, lines = converge(changed, want)
    assert [b for b, _ in have] == [1, 2]
    assert lines[0] == f"group remove_bucket group_id={GID},command_bucket_id=2"
    assert len(lines) == 2 and "bucket_id:2," in lines[1] and "0x4->reg15" in lines[1]
