"""Issue 7 churn: 100 stateless LBs, backends added and removed at a steady rate by a
separate process for 60 s; then every chassis' groups must equal what the NB says.

The churner (its own process) removes or re-adds one backend of one LB every
1/RATE seconds, round-robin over the LBs, and reports each NB commit time. The
main process waits, per change, for gw1's group to show it and prints the
convergence time distribution. The LBs use the default persistence
(second-chance), so each change includes the NB writer's 1 s settle between
publishing the previous set and moving the gateways.

    .venv/bin/python bench/churn.py [--lbs 100] [--seconds 60] [--rate 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import statistics
import time
from pathlib import Path

from common import bucket_count, pct, running_sandbox

from statelesslb.sandbox import Sandbox
from statelesslb.sandbox.processes import wait_until
from statelesslb.sandbox.traffic import (
    GROUP_BASE,
    groups_in_force,
    lb_ids,
    our_groups,
)

VIP = "172.22.{}.{}:80"


def churner(run_dir: str, lbs: int, seconds: float, rate: float, backends: list[str],
            out: multiprocessing.Queue) -> None:
    sb = Sandbox.load(Path(run_dir))
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < seconds:
        i = n % lbs
        removing = (n // lbs) % 2 == 0
        members = backends[:-1] if removing else backends
        vip = VIP.format(i // 250, 1 + i % 250)
        sb.nbctl("set", "load_balancer", f"c{i}", f'vips:"{vip}"="{",".join(members)}"')
        out.put((time.monotonic(), f"c{i}", len(members)))
        n += 1
        time.sleep(max(0.0, start + n / rate - time.monotonic()))
    out.put(None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lbs", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--rate", type=float, default=5.0)
    args = ap.parse_args()
    with running_sandbox(vms=8, resync=3600.0) as (sb, topo):
        run_dir = sb.run_dir
        backends = [f"{vm.ip}:8080" for vm in topo.vms]
        cmd: list[str] = []
        for i in range(args.lbs):
            name = f"c{i}"
            cmd += ["--", "lb-add", name, VIP.format(i // 250, 1 + i % 250),
                    ",".join(backends), "tcp", "--", "lr-lb-add", "lr0", name,
                    "--", "set", "load_balancer", name, "options:stateless_mode=mac"]
        sb.nbctl(*cmd[1:], timeout=300)
        gw = sb.chassis["gw1"]
        gids = {}
        for i in range(args.lbs):
            vip_ids = wait_until(lambda i=i: lb_ids(sb, f"c{i}")[0], 60, 0.1, "ids")
            gids[f"c{i}"] = GROUP_BASE + next(iter(vip_ids.values()))
        wait_until(lambda: len(our_groups(gw, known=tuple(gids.values()))) == args.lbs,
                   120, 0.2, "all groups on gw1")
        print(f"{args.lbs} LBs x {len(backends)} backends installed; churning "
              f"{args.rate}/s for {args.seconds:.0f} s from a separate process")

        commits: multiprocessing.Queue = multiprocessing.Queue()
        proc = multiprocessing.Process(target=churner, args=(
            str(run_dir), args.lbs, args.seconds, args.rate, backends, commits))
        proc.start()
        latencies, pending, done, superseded = [], [], False, 0
        while not done or pending:
            try:
                while True:
                    item = commits.get(timeout=0.01)
                    if item is None:
                        done = True
                        break
                    pending.append(item)
            except queue.Empty:
                pass
            # Check every pending change (not only the oldest: no head-of-line wait).
            now = time.monotonic()
            for item in list(pending):
                t_commit, name, count = item
                newer = [p for p in pending if p[1] == name and p[0] > t_commit]
                if bucket_count(gw, gids[name]) == count:
                    latencies.append(now - t_commit)
                    pending.remove(item)
                elif newer or now - t_commit > 60:
                    # Superseded by a later change of the same LB before we saw it.
                    superseded += 1
                    pending.remove(item)
            time.sleep(0.02)
        proc.join()
        ms = [v * 1000 for v in latencies]
        print(f"{len(ms)} changes converged on gw1 ({superseded} not seen before the next "
              f"change of the same LB): p50 {statistics.median(ms):.0f} ms, "
              f"p99 {pct(ms, 0.99):.0f} ms, max {max(ms):.0f} ms (includes the 1 s settle)")

        # Afterwards: every gateway's groups equal the NB's sets in force exactly.
        time.sleep(3)
        mismatches = 0
        in_force = groups_in_force(sb)
        wants = {name: in_force.get(name, {}).get(gid, set()) for name, gid in gids.items()}
        for gw_name in ("gw1", "gw2"):
            installed = our_groups(sb.chassis[gw_name], known=tuple(gids.values()))
            for name, gid in gids.items():
                if set(installed.get(gid).buckets if gid in installed else ()) != wants[name]:
                    mismatches += 1
        print(f"after the churn: {mismatches} of {2 * args.lbs} gateway groups differ from "
              f"the NB (gw1 active, gw2 standby)")


if __name__ == "__main__":
    main()
