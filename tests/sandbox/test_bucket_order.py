"""Gateways agree on ties: one that lived through many backend changes and a fresh one.

OVS scores each bucket of a hash select group with 16 bits and gives a tie to the
bucket listed later, so two gateways with the same buckets in another order pick
apart on tied flows. Three real switches (standalone ovs-vswitchd, dummy datapath)
hold the same group:

- `lived`: 150 random backend changes (bucket ids freed and reused, bodies changed,
  now and then an append by an agent of the old kind), each applied the way the agent
  does: read the group back from the bridge, `diff_lines`, one `ovs-ofctl bundle`;
- `fresh`: the final bucket set installed at once (a gateway started afterwards);
- `legacy`: the same changes with the old diff (every insert appended at the end),
  the control: it must pick apart from `fresh` on some tie, or the ties prove nothing.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from statelesslb.observe.predict import bucket_hash16, flow_basis
from statelesslb.openflow.diff import diff_lines
from statelesslb.openflow.ofctl import InstalledState, Ofctl, parse_groups
from statelesslb.plan.specs import BUCKET_WEIGHT, GROUP_FIELDS, GroupSpec, Plan
from statelesslb.sandbox.ovsread import cross_check, read_groups
from statelesslb.sandbox.switch import Switch, find_tools, random_tuples

pytestmark = pytest.mark.sandbox

GID = 0x70000001
OUT_PORT = 2
STEPS = 150
POOL = range(1, 49)      # bucket ids the backends are given (smallest free first)
N_TUPLES = 100_000
_USING = re.compile(r"-> using bucket (\d+)")


def body(bid: int, generation: int) -> str:
    """The planner's two bucket forms (gateway, previous set); the generation stands for
    a backend's MAC changing under the same bucket id."""
    mac = f"02:00:00:00:{generation % 256:02x}:{bid:02x}"
    if bid % 2:
        return (f"set_field:00:00:00:00:ff:02->eth_src,set_field:{mac}->eth_dst,dec_ttl,"
                f"set_field:0x2->reg15,resubmit(,37)")
    return (f"set_field:{mac}->eth_dst,set_field:0x2->metadata,set_field:0->reg14,"
            f"set_field:{bid:#x}->reg15,resubmit(,203)")


def spec(buckets: dict[int, int]) -> GroupSpec:
    return GroupSpec(GID, GROUP_FIELDS, {bid: body(bid, gen) for bid, gen in buckets.items()})


def plan_of(group: GroupSpec) -> Plan:
    return Plan(groups={GID: group}, flows={}, lb_status={}, sentinel_cookie=0)


def installed(ofctl: Ofctl) -> InstalledState:
    """What the agent reads back on a resync: the group in its list order."""
    return InstalledState(flows=set(), groups=ofctl.groups(GID, GID, (GID,)))


def order(ofctl: Ofctl) -> list[int]:
    """The bucket ids in list order, read independently of the agent's parser."""
    dump = ofctl.run("dump-groups", str(GID))
    read = read_groups(dump)[GID]
    cross_check(parse_groups(dump, GID, GID)[GID], read)
    return [b.bucket_id for b in read.buckets]


def legacy_lines(group: GroupSpec, state: InstalledState) -> list[str]:
    """The diff before canonical order: removals, then every insert appended."""
    have = state.groups[GID].buckets
    want = {bid: f"weight:{BUCKET_WEIGHT},actions={a}" for bid, a in group.buckets.items()}
    lines = [group.remove_bucket_line(b) for b, text in have.items() if want.get(b) != text]
    lines += [group.insert_bucket_line(b, "last") for b in sorted(want)
              if have.get(b) != want[b]]
    return lines


@pytest.fixture(scope="module")
def switches(require) -> Iterator[dict[str, Switch]]:
    tools = find_tools()
    require(tools is not None, "needs Open vSwitch (ovsdb-server, ovs-vswitchd)")
    started: dict[str, Switch] = {}
    dirs = []
    try:
        for name in ("lived", "fresh", "legacy"):
            rundir = Path(tempfile.mkdtemp(prefix=f"slbo{name[0]}-", dir="/tmp"))
            dirs.append(rundir)
            sw = Switch(rundir, tools, extra_ports={"p2": OUT_PORT})
            started[name] = sw
            sw.start()
        yield started
    finally:
        for sw in started.values():
            sw.stop()
        if not os.environ.get("STATELESSLB_KEEP_SANDBOX"):
            for rundir in dirs:
                shutil.rmtree(rundir, ignore_errors=True)


def _history(rng: random.Random) -> Iterator[dict[int, int]]:
    """Bucket sets {id: generation}: backends come and go, freed ids are reused."""
    current = {bid: 0 for bid in range(1, 13)}
    for step in range(1, STEPS + 1):
        current = dict(current)
        for bid in rng.sample(sorted(current), min(len(current) - 4, rng.randint(0, 3))):
            del current[bid]
        for _ in range(rng.randint(0, 3)):
            free = [b for b in POOL if b not in current]
            if free:
                current[free[0] if rng.random() < 0.7 else rng.choice(free)] = step
        if rng.random() < 0.2:
            current[rng.choice(sorted(current))] = step   # a changed bucket body
        yield current


def _traced_bucket(sw: Switch, flow: str) -> int:
    m = _USING.search(sw.trace(f"in_port=1,{flow}"))
    assert m, f"no bucket chosen for {flow}"
    return int(m.group(1))


def test_lived_and_fresh_gateways_agree_on_every_tuple_ties_included(switches):
    ofctl = {name: Ofctl(sw.mgmt, sw.tools["ovs-ofctl"]) for name, sw in switches.items()}
    rng = random.Random(12)
    first = spec({bid: 0 for bid in range(1, 13)})
    for name in ("lived", "legacy"):
        ofctl[name].bundle(first.add_lines())
        switches[name].ofctl("add-flow", f"table=0,in_port=1,actions=group:{GID}")
    appended = 0
    final = first
    for step, buckets in enumerate(_history(rng)):
        final = spec(buckets)
        if step % 10 == 9 and any(b not in buckets for b in range(1, max(buckets))):
            # An agent of the old kind (or an operator) appended a bucket: the next
            # diff must put it back in place.
            free = [b for b in POOL if b not in buckets and b < max(buckets)]
            extra = dict(buckets)
            extra[free[0]] = step
            grown = spec(extra)
            ofctl["lived"].bundle(legacy_lines(grown, installed(ofctl["lived"])))
            appended += order(ofctl["lived"]) != sorted(extra)
        ofctl["lived"].bundle(diff_lines(plan_of(final), installed(ofctl["lived"])))
        assert order(ofctl["lived"]) == sorted(buckets), f"step {step}"
        # Round trip: what OVS prints back is what the planner renders (no churn).
        assert diff_lines(plan_of(final), installed(ofctl["lived"])) == [], f"step {step}"
        ofctl["legacy"].bundle(legacy_lines(final, installed(ofctl["legacy"])))
    assert appended >= 8   # the repair path really ran
    ofctl["fresh"].bundle(final.add_lines())
    switches["fresh"].ofctl("add-flow", f"table=0,in_port=1,actions=group:{GID}")

    lived, fresh = (ofctl[n].groups(GID, GID, (GID,))[GID] for n in ("lived", "fresh"))
    assert list(lived.buckets.items()) == list(fresh.buckets.items())   # order included
    legacy_order = order(ofctl["legacy"])
    assert sorted(legacy_order) == list(fresh.buckets) != legacy_order

    # 100,000 random tuples, scored as OVS scores them; the tied ones found on purpose.
    ids = list(fresh.buckets)
    ties = []
    for pkt in random_tuples(N_TUPLES, seed=5):
        basis = flow_basis(GROUP_FIELDS, pkt)
        scores = [bucket_hash16(bid, basis) for bid in ids]
        top = max(scores)
        if scores.count(top) > 1:
            tied = [bid for bid, s in zip(ids, scores, strict=True) if s == top]
            ties.append((pkt, tied))
    assert len(ties) >= 5, len(ties)
    # The real switches decide: on every tie (and on a sample of the rest) lived and
    # fresh pick the same bucket, the later one in canonical order.
    sample = random_tuples(300, seed=6)
    disagree_legacy = 0
    for pkt, tied in ties:
        flow = pkt.ovs_flow()
        got = {n: _traced_bucket(switches[n], flow) for n in ("lived", "fresh", "legacy")}
        assert got["lived"] == got["fresh"] == max(tied), (flow, tied, got)
        disagree_legacy += got["legacy"] != got["fresh"]
    for pkt in sample:
        flow = pkt.ovs_flow()
        assert _traced_bucket(switches["lived"], flow) == _traced_bucket(switches["fresh"], flow)
    # The control: without canonical order, gateways do pick apart on ties.

    assert disagree_legacy > 0, f"{len(ties)} ties, none decided by order: vacuous"
