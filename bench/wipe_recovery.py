"""How long a gateway is without its stateless groups after br-int lost them.

One gateway and one hypervisor with 16 VMs, as bench/scale.py, both agents running.
Creates N stateless LBs of 16 backends, waits for all N groups on gw1, then for each
way br-int loses them (ovs-vswitchd restarted: every flow and group gone; ovn-controller
restarted: it clears br-int as it connects) prints the seconds from the stop to:
- ovn-controller's flows back (table 0 has flows again);
- all N of our groups back on gw1 (the agent's rebuild: a full read of the bridge, the
  whole plan as one bundle);
and the agent's laps of that rebuild (read_bridge, bundle: milliseconds).

    .venv/bin/python bench/wipe_recovery.py [--lbs 4000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

from common import create, running_sandbox, stateless_group_count

from statelesslb.sandbox.agents import agent_ctl
from statelesslb.sandbox.processes import CommandError, wait_until


class Watch(threading.Thread):
    """Polls gw1 from the stop on: when OVN's flows and when all N groups are back."""

    def __init__(self, gw, n: int, t0: float):
        super().__init__(daemon=True)
        self.gw, self.n, self.t0 = gw, n, t0
        self.flows_back: float | None = None
        self.groups_back: float | None = None
        self.lowest = n

    def run(self) -> None:
        deadline = self.t0 + 600
        # Until both are known: with few LBs our groups can be back before OVN's flows.
        while time.monotonic() < deadline and (self.groups_back is None
                                               or self.flows_back is None):
            try:
                if self.flows_back is None and "actions=" in self.gw.dump_flows("table=0"):
                    self.flows_back = time.monotonic() - self.t0
                count = stateless_group_count(self.gw)
            except CommandError:
                count = 0   # ovs-vswitchd down
            self.lowest = min(self.lowest, count)
            if self.groups_back is None and self.lowest < self.n and count >= self.n:
                self.groups_back = time.monotonic() - self.t0
            time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lbs", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with running_sandbox(gateways=1, hypervisors=1, vms=16, resync=3600.0) as (sb, topo):
        gw = sb.chassis["gw1"]
        backends = [f"{vm.ip}:8080" for vm in topo.vms]
        create(sb, "s", args.lbs, backends, True, 20)
        wait_until(lambda: stateless_group_count(gw) >= args.lbs, 900, 0.2,
                   f"{args.lbs} groups on gw1")
        print(f"{args.lbs} stateless LBs installed on gw1", flush=True)
        results: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            for how, restart in (("ovs-vswitchd restarted", gw.restart_vswitchd),
                                 ("ovn-controller restarted", gw.restart_ovn_controller)):
                time.sleep(2)
                t0 = time.monotonic()
                watch = Watch(gw, args.lbs, t0)
                watch.start()
                restart()
                watch.join(600)
                laps = json.loads(agent_ctl(sb, "gw1", "status")).get("last_apply_ms", {})
                flows = watch.flows_back if watch.flows_back is not None else float("nan")
                groups = watch.groups_back if watch.groups_back is not None else float("nan")
                print(f"  {how}: OVN's flows back {flows:.2f} s, our {args.lbs} groups back "
                      f"{groups:.2f} s (lowest count seen {watch.lowest}); agent laps ms: "
                      f"read_bridge {laps.get('read_bridge', 0):.0f}, "
                      f"bundle {laps.get('bundle', 0):.0f}", flush=True)
                results.setdefault(how, []).append((flows, groups))
        print(f"\n{args.lbs} LBs, median of {args.rounds}:")
        for how, rows in results.items():
            print(f"  {how:26s} OVN's flows {statistics.median(r[0] for r in rows):6.2f} s, "
                  f"our groups {statistics.median(r[1] for r in rows):6.2f} s")


if __name__ == "__main__":
    main()
