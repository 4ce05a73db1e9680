"""Issue 3 figures: NB backend change -> bucket installed on the gateway, and agent memory.

Runs a real sandbox (2 gateways, 2 hypervisors, 8 VMs) with agents, then
1. makes N backend changes (remove / re-add one backend of a 3-backend LB) and
   times each from the NB commit returning to the gateway group showing it
   (polled with ovs-ofctl every few ms: figures include that polling);
2. creates 100 stateless LBs of 8 backends and prints the agents' resident
   memory (VmRSS) before and after, and how long the install took.

    .venv/bin/python bench/change_latency.py [--changes 50] [--lbs 100]
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import bucket_count, cpu_seconds, pct, rss_mib, running_sandbox

from statelesslb.sandbox.processes import wait_until
from statelesslb.sandbox.traffic import create_lb, lb_ids, our_groups, wait_lb_ready


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--changes", type=int, default=50)
    ap.add_argument("--lbs", type=int, default=100)
    args = ap.parse_args()
    with running_sandbox(vms=8) as (sb, topo):
        gw = sb.chassis["gw1"]
        backends = [f"{vm.ip}:8080" for vm in topo.vms]

        gateways = [sb.chassis["gw1"], sb.chassis["gw2"]]   # resident and standby
        for name, vip, mode in (("lbh", "172.16.0.99", "hash"),
                                ("lb0", "172.16.0.100", "second-chance")):
            create_lb(sb, name, f"{vip}:80", backends[:3])
            sb.nbctl("set", "load_balancer", name, f"options:stateless_persistence={mode}")
            gid = wait_lb_ready(sb, name, f"{vip}:80", 3, topo=topo)
            latencies = []
            for i in range(args.changes):
                members = backends[:3] if i % 2 else [backends[0], backends[2]]
                want = len(members)
                start = time.monotonic()
                sb.nbctl("set", "load_balancer", name,
                         f'vips:"{vip}:80"="{",".join(members)}"')
                for g in gateways:
                    wait_until(lambda g=g, w=want, k=gid: bucket_count(g, k) == w, 10, 0.002,
                               f"the change on {g.name}")
                latencies.append(time.monotonic() - start)
            ms = [v * 1000 for v in latencies]
            print(f"persistence={mode}: backend change -> bucket changed on both gateways "
                  f"(gw1 resident, gw2 standby), {len(ms)} changes:")
            print(f"  p50 {statistics.median(ms):.1f} ms   p90 {pct(ms, 0.9):.1f} ms   "
                  f"max {max(ms):.1f} ms   (includes ovn-nbctl's own commit and polling)")
            _, buckets = lb_ids(sb, name)
            print(f"  bucket ids after all changes: {buckets}")
        print("  (second-chance waits 1 s between publishing the previous bucket set and "
              "moving the gateways, so that backends' chassis hold it first)")

        pids = {name: info["pid"] for name, info in sb.agents.items()}
        before = {name: rss_mib(pid) for name, pid in pids.items()}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        start = time.monotonic()
        for n in range(args.lbs):
            vip = f"172.16.{1 + n // 250}.{1 + n % 250}:80"
            sb.nbctl("lb-add", f"m{n}", vip, ",".join(backends), "tcp",
                     "--", "lr-lb-add", "lr0", f"m{n}",
                     "--", "set", "load_balancer", f"m{n}", "options:stateless_mode=mac")
        wait_until(lambda: len(our_groups(gw)) == args.lbs + 2, 120, 0.05,
                   f"{args.lbs} more groups on gw1")
        install = time.monotonic() - start
        time.sleep(1)
        print(f"\n{args.lbs} stateless LBs x {len(backends)} backends created one by one "
              f"with ovn-nbctl and installed on gw1 in {install:.1f} s")
        print("agent resident memory (VmRSS) and CPU used during that install:")
        for name, pid in pids.items():
            print(f"  {name}: {before[name]:.1f} MiB -> {rss_mib(pid):.1f} MiB, "
                  f"CPU {cpu_seconds(pid) - cpu_before[name]:.2f} s")


if __name__ == "__main__":
    main()
