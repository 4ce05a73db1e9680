"""How well statelesslb.predict agrees with a real ovs-vswitchd, and how flows move.

Starts a private ovsdb-server + ovs-vswitchd (dummy datapath) in a temp dir, installs the
planner's hash select group with 8 buckets and the same group with one bucket removed,
and `ofproto/trace`s N random TCP/UDP, IPv4/IPv6 tuples through both (over the unixctl
socket: one connection, no process per trace). Prints:

- agreement: fraction of tuples where predict_bucket() == the bucket OVS used (and where
  every bucket's score matches too);
- churn when one of 8 buckets is removed: fraction of tuples OVS moved (expected ~1/8,
  all from the removed bucket), vs. a naive `hash % N` scheme (expected ~7/8).

    .venv/bin/python bench/predict_agreement.py [--tuples 10000] [--seed 1]

Stops its daemons by pid and removes the temp dir. Needs Open vSwitch installed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from statelesslb.observe.predict import FlowTuple, bucket_scores, flow_basis, predict_bucket
from statelesslb.observe.trace import parse_trace
from statelesslb.plan.specs import BUCKET_WEIGHT, GROUP_FIELDS
from statelesslb.sandbox.switch import Switch, find_tools, random_tuples

BUCKETS = [1, 2, 3, 4, 5, 6, 7, 8]
REMOVED = 5
GID_FULL, GID_LESS = 1879048193, 1879048194


def install(sw: Switch, gid: int, reg0: int, buckets: Sequence[int]) -> None:
    spec = ",".join(f"bucket=bucket_id:{b},weight:{BUCKET_WEIGHT},actions=resubmit(,{b})"
                    for b in buckets)
    sw.ofctl("add-group", f"group_id={gid},type=select,selection_method=hash,"
                          f"{GROUP_FIELDS},{spec}")
    sw.ofctl("add-flow", f"table=0,reg0={reg0},actions=group:{gid}")


def trace(sw: Switch, reg0: int, pkt: FlowTuple) -> str:
    return sw.trace(f"reg0={reg0},in_port=1,{pkt.ovs_flow()}")


def choice(text: str) -> tuple[int | None, dict[int, int]]:
    """The bucket a trace used and every bucket's score."""
    found = parse_trace(text)
    return found["bucket_id"], found["scores"]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tuples", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    tuples = random_tuples(args.tuples, args.seed, range(1024, 65536), range(1, 65536))
    less = [b for b in BUCKETS if b != REMOVED]

    rundir = Path(tempfile.mkdtemp(prefix="slbp-", dir="/tmp"))
    tools = find_tools()
    if tools is None:
        sys.exit("Open vSwitch not found: run scripts/setup")
    sw = Switch(rundir, tools)
    try:
        t0 = time.perf_counter()
        sw.start()
        install(sw, GID_FULL, 1, BUCKETS)
        install(sw, GID_LESS, 2, less)
        t1 = time.perf_counter()
        traces_full = [trace(sw, 1, p) for p in tuples]
        traces_less = [trace(sw, 2, p) for p in tuples]
        t2 = time.perf_counter()
    finally:
        sw.stop()
        shutil.rmtree(rundir, ignore_errors=True)

    pred_full = [predict_bucket(BUCKETS, BUCKET_WEIGHT, GROUP_FIELDS, p) for p in tuples]
    pred_less = [predict_bucket(less, BUCKET_WEIGHT, GROUP_FIELDS, p) for p in tuples]
    t3 = time.perf_counter()
    # Parsed outside the timings: those are of the traces and of the predictions.
    ovs_full = [choice(t) for t in traces_full]
    ovs_less = [choice(t) for t in traces_less]
    scores_ok = sum(bucket_scores(BUCKETS, BUCKET_WEIGHT, GROUP_FIELDS, p) == o[1]
                    for p, o in zip(tuples, ovs_full, strict=True))

    n = len(tuples)
    agree_full = sum(p == o[0] for p, o in zip(pred_full, ovs_full, strict=True))
    agree_less = sum(p == o[0] for p, o in zip(pred_less, ovs_less, strict=True))
    moved = [i for i in range(n) if ovs_full[i][0] != ovs_less[i][0]]
    moved_from_removed = sum(ovs_full[i][0] == REMOVED for i in moved)
    on_removed = sum(o[0] == REMOVED for o in ovs_full)
    # Naive modulo: the same per-flow hash, bucket = hash % N over the sorted bucket list.
    basis = [flow_basis(GROUP_FIELDS, p) for p in tuples]
    naive_moved = sum(BUCKETS[h % len(BUCKETS)] != less[h % len(less)] for h in basis)
    spread = Counter(o[0] for o in ovs_full)

    print(f"OVS: {tools['ovs-vswitchd']}, fields {GROUP_FIELDS}, weight {BUCKET_WEIGHT}")
    print(f"tuples: {n} random (TCP/UDP x IPv4/IPv6), seed {args.seed}")
    print(f"traces: {2 * n} in {t2 - t1:.1f}s ({(t2 - t1) / (2 * n) * 1e3:.2f} ms each); "
          f"switch setup {t1 - t0:.1f}s; predictions {2 * n} in {t3 - t2:.1f}s")
    print(f"agreement, 8 buckets: {agree_full}/{n} = {agree_full / n:.4%} "
          f"(all bucket scores equal: {scores_ok}/{n})")
    print(f"agreement, 7 buckets: {agree_less}/{n} = {agree_less / n:.4%}")
    print("share per bucket (OVS, 8 buckets): "
          + " ".join(f"{b}:{spread[b] / n:.3f}" for b in BUCKETS))
    print(f"remove bucket {REMOVED} of 8: OVS moved {len(moved) / n:.4f} of tuples "
          f"(expected 1/8 = {1 / 8:.4f}); {moved_from_removed}/{len(moved)} of the moved "
          f"were on bucket {REMOVED} ({on_removed} tuples were)")
    print(f"naive hash % N, 8 -> 7 buckets: moves {naive_moved / n:.4f} of tuples "
          f"(expected 7/8 = {7 / 8:.4f})")
    return 0 if agree_full == agree_less == n else 1


if __name__ == "__main__":
    sys.exit(main())
