"""Where the `ovs-ofctl bundle` time of one backend change goes, against the bridge size.

bench/scale.py shows the agent's own work flat from 10 to 1,000 LBs while its
`ovs-ofctl bundle` grows. This bench separates the causes, on one gateway with
N stateless LBs of 16 backends (N = 10, then 1,000), median of repeated runs:
- trivial bundle: ovs-ofctl adding and deleting one flow in an unused table
  (process start, connection, bundle commit; no group involved);
- agent's bundle: the bundle the agent ran for one backend change, as its
  `last_apply_ms` reports it, with gw1's ovn-controller running, then stopped
  (so that OVN's own work on the same NB change does not compete).

    .venv/bin/python bench/bundle_cost.py [--sizes 10,1000] [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from common import create, delete, group_count, running_sandbox, toggle_backend

from statelesslb.sandbox.agents import agent_ctl
from statelesslb.sandbox.processes import wait_until
from statelesslb.sandbox.traffic import GROUP_BASE

ALL_OURS = (GROUP_BASE, GROUP_BASE + 0x0FFFFFFF)


def trivial_bundle_ms(gw, runs: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".bundle") as f:
        f.write("flow add table=251,priority=1,cookie=0x1234,actions=drop\n"
                "flow delete table=251,cookie=0x1234/-1\n")
        f.flush()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            gw.ofctl("bundle", f.name)
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def agent_bundle_ms(sb, gw, backends: list[str], n: int, runs: int) -> float:
    times = []
    for k in range(runs):   # remove a backend, then add it back
        toggle_backend(sb, gw, "s", n, k, backends, 60)
        time.sleep(0.3)
        times.append(json.loads(agent_ctl(sb, "gw1", "status"))["last_apply_ms"]["bundle"])
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,1000")
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    with running_sandbox(gateways=1, hypervisors=1, vms=16, resync=3600.0) as (sb, topo):
        gw = sb.chassis["gw1"]
        backends = [f"{vm.ip}:8080" for vm in topo.vms]
        print(f"{'LBs':>6} {'trivial bundle ms':>18} {'agent bundle ms':>16} "
              f"{'same, ovn-controller stopped':>29}")
        for n in sizes:
            if not sb.processes["gw1/ovn-controller"].running():
                sb.start_again("gw1/ovn-controller")
            create(sb, "s", n, backends, True, 20)
            wait_until(lambda n=n: group_count(gw, *ALL_OURS) >= n, 900, 0.2,
                       f"{n} groups on gw1")
            time.sleep(3)
            trivial = trivial_bundle_ms(gw, args.runs)
            running = agent_bundle_ms(sb, gw, backends, n, args.runs)
            sb.stop_process("gw1/ovn-controller")
            stopped = agent_bundle_ms(sb, gw, backends, n, args.runs)
            print(f"{n:>6} {trivial:>18.1f} {running:>16.1f} {stopped:>29.1f}", flush=True)
            sb.start_again("gw1/ovn-controller")
            delete(sb, "s", n)
            wait_until(lambda: group_count(gw, *ALL_OURS) == 0, 900, 0.2, "groups removed")
        print("\ntrivial: one flow added and deleted in table 251 by ovs-ofctl bundle; agent: "
              "the bundle of one backend change (remove_bucket / insert_bucket), from the "
              "agent's last_apply_ms; medians")


if __name__ == "__main__":
    main()
