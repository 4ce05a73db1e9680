"""Desired versus installed: the bundle lines that turn one into the other.

Pure, like ovn-controller's ofctl: compare, then send only the difference.
A backend change becomes REMOVE_BUCKET / INSERT_BUCKET on the existing group, so
group ids and the other buckets' ids (and counters) never change.
"""

from __future__ import annotations

import re

from statelesslb.openflow import InstalledGroup, InstalledState
from statelesslb.planner import GroupSpec, Plan

_BUCKET_ID_PREFIX = re.compile(r"^bucket_id:\d+,")


def bucket_body(text: str) -> str:
    """'bucket_id:3,weight:100,actions=x' and 'weight:100,actions=x' -> 'weight:100,actions=x'."""
    return _BUCKET_ID_PREFIX.sub("", text.strip())


def want_buckets(group: GroupSpec) -> dict[int, str]:
    """Bucket id -> 'weight:..,actions=..', the form dump-groups prints back."""
    return {
        bid: bucket_body(group.bucket_text(bid).removeprefix("bucket="))
        for bid in group.buckets
    }


def group_header(group: GroupSpec) -> str:
    return f"type=select,selection_method=hash,{group.fields}"


def _group_changes(want: GroupSpec, have: InstalledGroup) -> list[str]:
    if have.header != group_header(want):
        # Selection method or fields differ (an upgrade, or someone else's edit): a full
        # modify resends them; buckets keep their ids so the choice of backends holds.
        first, *rest = want.add_lines()
        return ["group modify " + first.removeprefix("group add "), *rest]
    lines = []
    wanted = want_buckets(want)
    for bid, body in sorted(have.buckets.items()):
        if wanted.get(bid) != bucket_body(body):
            lines.append(want.remove_bucket_line(bid))
    for bid, body in sorted(wanted.items()):
        if bucket_body(have.buckets.get(bid, "")) != body:
            lines.append(want.insert_bucket_line(bid))
    return lines


def diff_lines(plan: Plan, installed: InstalledState) -> list[str]:
    """Bundle lines, ordered so every step is valid: flows leave before their groups."""
    lines: list[str] = []
    for cookie in sorted(installed.flows - plan.flows.keys()):
        lines.append(f"flow delete cookie={cookie:#x}/-1")
    for gid, group in sorted(plan.groups.items()):
        if installed.specs.get(gid) is group:
            continue   # the same planned object we installed last time: unchanged
        have = installed.groups.get(gid)
        if have is None:
            lines.extend(group.add_lines())
        else:
            lines.extend(_group_changes(group, have))
    for cookie, flow in sorted(plan.flows.items()):
        if cookie not in installed.flows:
            lines.append(flow.add_line())
    for gid in sorted(installed.groups.keys() - plan.groups.keys()):
        lines.append(f"group delete group_id={gid}")
    return lines


def state_after(plan: Plan, before: InstalledState | None = None) -> InstalledState:
    """What the bridge holds once a bundle built by diff_lines() has committed.

    Groups planned by the very same object as in `before` keep their rendering.
    """
    groups = {}
    for gid, g in plan.groups.items():
        if before is not None and before.specs.get(gid) is g and gid in before.groups:
            groups[gid] = before.groups[gid]
        else:
            groups[gid] = InstalledGroup(gid, group_header(g), want_buckets(g))
    return InstalledState(flows=set(plan.flows), groups=groups, specs=dict(plan.groups))
