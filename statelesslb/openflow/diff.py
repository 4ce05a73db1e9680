"""Desired versus installed: the bundle lines that turn one into the other.

Pure, like ovn-controller's ofctl: compare, then send only the difference.
A backend change becomes REMOVE_BUCKET / INSERT_BUCKET on the existing group, so
group ids and the other buckets' ids (and counters) never change.
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Iterator, Mapping, Set

from ovs.flow.ofp import OFPFlow

from statelesslb.openflow.ofctl import InstalledGroup, InstalledState
from statelesslb.plan.specs import GroupSpec, Plan, flow_delete_line, group_delete_line

_BUCKET_ID_PREFIX = re.compile(r"^bucket_id:\d+,")


def bucket_body(text: str) -> str:
    """'bucket_id:3,weight:100,actions=x' and 'weight:100,actions=x' -> 'weight:100,actions=x'."""
    return _BUCKET_ID_PREFIX.sub("", text.strip())


def want_bucket(group: GroupSpec, bucket_id: int) -> str:
    """'weight:..,actions=..' of one planned bucket, the form dump-groups prints back."""
    return bucket_body(group.bucket_text(bucket_id).removeprefix("bucket="))


def want_buckets(group: GroupSpec) -> dict[int, str]:
    """Bucket id -> want_bucket(), for every bucket of the group."""
    return {bid: want_bucket(group, bid) for bid in group.buckets}


def group_header(group: GroupSpec) -> str:
    return _header(group.fields)


@functools.lru_cache(maxsize=256)
def _header(fields: str) -> str:
    # One string per hash-field set, not one per group.
    return f"type=select,selection_method=hash,{fields}"


class _PlannedBuckets(Mapping[int, str]):
    """want_buckets(group), rendered when read: what record() keeps for a group it
    installed from `group`, instead of a copy of every bucket's text (3.8 KiB per LB
    of 16 backends, docs/scale.md). Read only when that group is planned anew."""

    __slots__ = ("_group",)

    def __init__(self, group: GroupSpec):
        self._group = group

    def _rendered(self) -> dict[int, str]:
        return want_buckets(self._group)

    def __getitem__(self, bucket_id: int) -> str:
        if bucket_id not in self._group.buckets:
            raise KeyError(bucket_id)
        return want_bucket(self._group, bucket_id)

    def __iter__(self) -> Iterator[int]:
        return iter(self._group.buckets)

    def __len__(self) -> int:
        return len(self._group.buckets)

    def items(self):
        return self._rendered().items()

    def __repr__(self) -> str:
        return repr(self._rendered())


def same_bucket(want: str, have: str) -> bool:
    """Whether an installed bucket ('weight:..,actions=..') does what the planned one
    does: the same text (the planner writes actions the way OVS prints them back), or
    else the same weight and the same actions as `ovs.flow` parses them, so that a
    difference in spelling only (0x3 or 3, an OVS that prints a field otherwise) is
    not mistaken for a change and the bucket is not replaced."""
    if want == have:
        return True
    meaning = _bucket_meaning(want)
    return meaning is not None and meaning == _bucket_meaning(have)


@functools.lru_cache(maxsize=4096)
def _bucket_meaning(body: str) -> tuple[str, list] | None:
    head, found, actions = body.partition("actions=")
    if not found:
        return None
    try:
        return head, OFPFlow("actions=" + actions).actions
    except Exception:   # ovs.flow raises plain exceptions on what it cannot parse
        return None


def in_sync(want: GroupSpec, have: InstalledGroup) -> bool:
    """The installed group holds the planned buckets, each doing the same, in the
    canonical order."""
    wanted = want_buckets(want)
    return (have.header == group_header(want) and list(have.buckets) == list(wanted)
            and all(same_bucket(wanted[bid], bucket_body(body))
                    for bid, body in have.buckets.items()))


def in_canonical_order(bucket_ids: list[int]) -> list[int]:
    """The longest subsequence of `bucket_ids` already in ascending order (the rest
    must move): a longest increasing subsequence, O(n log n)."""
    tails: list[int] = []          # tails[k]: index of the last id of the best run of k+1
    tail_ids: list[int] = []       # bucket_ids[tails[k]], for bisect
    parent: list[int] = [-1] * len(bucket_ids)
    for i, bid in enumerate(bucket_ids):
        k = bisect.bisect_left(tail_ids, bid)
        if k:
            parent[i] = tails[k - 1]
        if k == len(tails):
            tails.append(i)
            tail_ids.append(bid)
        else:
            tails[k], tail_ids[k] = i, bid
    run, i = [], tails[-1] if tails else -1
    while i >= 0:
        run.append(bucket_ids[i])
        i = parent[i]
    return run[::-1]


def _group_changes(want: GroupSpec, have: InstalledGroup) -> list[str]:
    """Remove and insert buckets so the group ends as `want`, in ascending id order.

    Ties between bucket scores go to the bucket listed later, so every gateway must
    list the same buckets in the same order: the canonical one, ascending ids, as a
    fresh `group add` lists them. New buckets go in at their sorted position; a
    bucket found out of order (appended by an older agent, or added by hand) is
    removed and inserted again, in the same atomic bundle. `have.buckets` is in
    the group's list order (dump order).
    """
    if have.header != group_header(want):
        # Selection method or fields differ (an upgrade, or someone else's edit): a full
        # modify resends them; buckets keep their ids so the choice of backends holds.
        first, *rest = want.add_lines()
        return ["group modify " + first.removeprefix("group add "), *rest]
    lines = []
    wanted = want_buckets(want)
    kept = []
    for bid, body in have.buckets.items():
        if bid in wanted and same_bucket(wanted[bid], bucket_body(body)):
            kept.append(bid)
        else:
            lines.append(want.remove_bucket_line(bid))
    present = in_canonical_order(kept)
    staying = set(present)
    lines.extend(want.remove_bucket_line(bid) for bid in kept if bid not in staying)
    for bid in sorted(wanted.keys() - staying):
        at = bisect.bisect_left(present, bid)
        lines.append(want.insert_bucket_line(bid, present[at - 1] if at else "first"))
        present.insert(at, bid)
    return lines


def diff_lines(plan: Plan, installed: InstalledState,
               flows: Set[int] | None = None, groups: Set[int] | None = None) -> list[str]:
    """Bundle lines, ordered so every step is valid: flows leave before their groups.

    `flows` / `groups`: the only cookies and group ids that may differ between
    the plan and `installed` (an incremental plan's update says which); None
    compares everything.
    """
    if flows is None:
        gone_flows = installed.flows - plan.flows.keys()
        new_flows = plan.flows.keys() - installed.flows
    else:
        gone_flows = {c for c in flows if c in installed.flows and c not in plan.flows}
        new_flows = {c for c in flows if c in plan.flows and c not in installed.flows}
    if groups is None:
        kept_groups = plan.groups.keys()
        gone_groups = installed.groups.keys() - plan.groups.keys()
    else:
        kept_groups = {g for g in groups if g in plan.groups}
        gone_groups = {g for g in groups if g in installed.groups and g not in plan.groups}
    lines = [flow_delete_line(cookie) for cookie in sorted(gone_flows)]
    for gid in sorted(kept_groups):
        group = plan.groups[gid]
        if installed.specs.get(gid) is group:
            continue   # the same planned object we installed last time: unchanged
        have = installed.groups.get(gid)
        if have is None:
            lines.extend(group.add_lines())
        else:
            lines.extend(_group_changes(group, have))
    lines.extend(plan.flows[cookie].add_line() for cookie in sorted(new_flows))
    lines.extend(group_delete_line(gid) for gid in sorted(gone_groups))
    return lines


def record(plan: Plan, installed: InstalledState,
           flows: Set[int] | None = None, groups: Set[int] | None = None) -> None:
    """Update `installed` to what the bridge holds once diff_lines()' bundle committed.

    Same `flows` / `groups` as given to diff_lines(). Groups planned by the very
    same object as before keep their rendering.
    """
    if flows is None:
        installed.flows = set(plan.flows)
    else:
        for cookie in flows:
            if cookie in plan.flows:
                installed.flows.add(cookie)
            else:
                installed.flows.discard(cookie)
    if groups is None:
        for gid in installed.groups.keys() - plan.groups.keys():
            del installed.groups[gid]
            installed.specs.pop(gid, None)
    for gid in plan.groups.keys() if groups is None else groups:
        group = plan.groups.get(gid)
        if group is None:
            installed.groups.pop(gid, None)
            installed.specs.pop(gid, None)
        elif installed.specs.get(gid) is not group or gid not in installed.groups:
            installed.groups[gid] = InstalledGroup(gid, group_header(group),
                                                   _PlannedBuckets(group))
            installed.specs[gid] = group


def state_after(plan: Plan, before: InstalledState | None = None) -> InstalledState:
    """What the bridge holds once a bundle built by diff_lines(plan, before) committed."""
    after = InstalledState(flows=set(), groups={}, specs={})
    if before is not None:
        after = InstalledState(set(before.flows), dict(before.groups), dict(before.specs))
    record(plan, after)
    return after
