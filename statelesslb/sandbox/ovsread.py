"""A second, independent reading of `ovs-ofctl dump-groups` for the sandbox checks.

The checks read our groups with the agent's own parser (`openflow.parse_groups`): a bug
there would show the same wrong group to the agent and to the test, and cancel out.
This reads the same text another way: a bracket-aware tokeniser of its own for the
group and its buckets, and the `ovs[flow]` library's OpenFlow action decoder for each
bucket's actions. `cross_check` holds one reading to the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from ovs.flow.ofp import OFPFlow

from statelesslb.openflow.ofctl import InstalledGroup


@dataclass(frozen=True)
class ReadBucket:
    bucket_id: int
    weight: int
    actions: str          # the decoded action list, as text (comparable)


@dataclass(frozen=True)
class ReadGroup:
    group_id: int
    properties: tuple[str, ...]       # "type=select", "selection_method=hash", "fields(..)"
    buckets: tuple[ReadBucket, ...]   # in the group's list order


def _top_level(text: str) -> list[str]:
    """Split at commas outside () and []."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return out


def decode_actions(actions: str) -> str:
    """ovs.flow's decoding of an action list, as text: equal lists compare equal."""
    return repr(OFPFlow(f"priority=0 actions={actions}").actions)


def _bucket(head: str, tokens: list[str], gid: int) -> ReadBucket:
    """One bucket from its tokens: `bucket=bucket_id:N`, then `weight:W`, `actions=...`."""
    fields = dict(part.partition(":")[::2] for part in head.removeprefix("bucket=").split(","))
    weight, actions = -1, []
    for token in tokens:
        if token.startswith("weight:") and not actions:
            weight = int(token.removeprefix("weight:"))
        elif token.startswith("actions="):
            actions.append(token.removeprefix("actions="))
        elif actions:
            actions.append(token)
        else:
            raise ValueError(f"unexpected {token!r} in group {gid}'s bucket")
    return ReadBucket(int(fields["bucket_id"]), weight, decode_actions(",".join(actions)))


def read_groups(dump: str) -> dict[int, ReadGroup]:
    groups: dict[int, ReadGroup] = {}
    for raw in dump.splitlines():
        tokens = _top_level(raw.strip())
        if not tokens[0].startswith("group_id="):
            continue
        gid = int(tokens[0].removeprefix("group_id="))
        starts = [i for i, t in enumerate(tokens) if t.startswith("bucket=")]
        props = tuple(tokens[1:starts[0]] if starts else tokens[1:])
        ends = [*starts[1:], len(tokens)] if starts else []
        buckets = tuple(_bucket(tokens[a], tokens[a + 1:b], gid)
                        for a, b in zip(starts, ends, strict=True))
        groups[gid] = ReadGroup(gid, props, buckets)
    return groups


def cross_check(product: InstalledGroup, independent: ReadGroup) -> None:
    """Raise AssertionError unless both readings of one group say the same."""
    gid = product.group_id
    assert independent.group_id == gid
    assert ",".join(independent.properties) == product.header, (
        f"group {gid}: header {product.header!r} vs {independent.properties!r}")
    ours = []
    for bid, body in product.buckets.items():
        weight, _, actions = body.partition(",actions=")
        ours.append(ReadBucket(bid, int(weight.removeprefix("weight:")),
                               decode_actions(actions)))
    assert tuple(ours) == independent.buckets, (
        f"group {gid}: the agent's parser read {ours}, ovs.flow read {independent.buckets}")
