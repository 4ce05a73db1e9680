"""Agents started on an NB that already holds N marked load balancers (an upgrade, or a
first deployment): the NB writer writes every LB's ids in its first pass.

One gateway and one hypervisor with 16 VMs, as bench/scale.py. Creates N stateless LBs
of 16 backends with no agent running, waits --settle seconds (5), starts both agents and
prints how long until gw1 holds all N groups, then the agents' timeline (their INFO
lines, seconds from the start: the writer's pass, planning, each bundle applied).

    .venv/bin/python bench/first_start.py [--lbs 10000] [--settle 5]
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from common import cpu_seconds, create, running_sandbox, stateless_group_count

from statelesslb.sandbox.agents import start_agent
from statelesslb.sandbox.failover import log_time
from statelesslb.sandbox.processes import wait_until

_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \d+ \w+ \S+ (.*)")
_TIMELINE = ("written", "applied", "changed status", "lock acquired", "started on")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lbs", type=int, default=10_000)
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds between creating the LBs and starting the agents")
    args = ap.parse_args()
    with running_sandbox(gateways=1, hypervisors=1, vms=16, agents=False) as (sb, topo):
        gw = sb.chassis["gw1"]
        backends = [f"{vm.ip}:8080" for vm in topo.vms]
        t = time.monotonic()
        create(sb, "s", args.lbs, backends, True, 20)
        print(f"{args.lbs} marked LBs created in {time.monotonic() - t:.1f} s", flush=True)
        time.sleep(args.settle)   # ovn-northd's and ovn-controller's own work on them
        t0 = time.time()
        for name in ("gw1", "hv1"):
            start_agent(sb, sb.chassis[name], debug=False, resync=3600.0)
        wait_until(lambda: stateless_group_count(gw) >= args.lbs, 1800, 0.5,
                   f"{args.lbs} groups on gw1")
        print(f"all {args.lbs} groups on gw1 {time.time() - t0:.1f} s after the agents' "
              "start", flush=True)
        for name in ("gw1", "hv1"):
            print(f"{name}'s agent ({cpu_seconds(sb.agents[name]['pid']):.1f} s of CPU):")
            log = Path(sb.chassis[name].rundir) / "statelesslb-agent.log"
            for line in log.read_text(errors="replace").splitlines():
                m = _LINE.match(line)
                if m and any(word in m.group(2) for word in _TIMELINE):
                    at = log_time(m.group(1))
                    print(f"  {at - t0:7.2f} s  {m.group(2)[:120]}")


if __name__ == "__main__":
    main()
