"""statelesslb-demo: the whole story on a real OVN sandbox, in about half a minute.

Brings up 2 gateways and 2 hypervisors, runs an agent on each, creates a
stateless LB with 3 backends, opens TCP connections from the external client,
shows where they went and that no gateway holds conntrack for them, then
removes a backend and shows that only that backend's connections moved.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from statelesslb.sandbox import Sandbox, build_lb_topology
from statelesslb.sandbox import agents as sandbox_agents
from statelesslb.sandbox.processes import wait_until
from statelesslb.sandbox.traffic import (
    broken,
    conntrack_lines,
    create_lb,
    lb_ids,
    midstream,
    open_connections,
    our_flows,
    our_groups,
    wait_lb_ready,
)

VIP = "172.16.0.100"
FIRST_SPORT = 30000
MAX_CONNECTIONS = 65535 - FIRST_SPORT + 1   # one client source port each
BACKENDS = ["10.0.0.11:8080", "10.0.0.12:8080", "10.0.0.13:8080"]


def say(text: str = "") -> None:
    print(text, flush=True)


def run(run_dir: Path, connections: int) -> int:
    t0 = time.monotonic()
    sb = Sandbox(run_dir, gateways=2, hypervisors=2)
    say(f"== Real OVN sandbox in {run_dir}")
    sb.up()
    topo = build_lb_topology(sb, vms=3)
    say(f"   NB/SB, northd, 4 chassis (gw1 gw2 hv1 hv2) registered in "
        f"{sb.timings['registered']:.2f}s; cr-lr0-public bound to gw1 after "
        f"{topo.timings['cr_port_bound']:.2f}s")
    for vm in topo.vms:
        say(f"   {vm.name} {vm.ip} {vm.mac} on {vm.chassis}")
    sandbox_agents.start_agents(sb)
    sandbox_agents.wait_agents_ready(sb)
    say("   statelesslb-agent running on every chassis")

    say("\n== The operator marks an ordinary OVN load balancer")
    say(f"   ovn-nbctl lb-add lb1 {VIP}:80 {','.join(BACKENDS)} tcp")
    say("   ovn-nbctl lr-lb-add lr0 lb1")
    say("   ovn-nbctl set load_balancer lb1 options:stateless_mode=mac")
    create_lb(sb, "lb1", f"{VIP}:80", BACKENDS)
    gid = wait_lb_ready(sb, "lb1", f"{VIP}:80", 3, topo=topo)
    vip_ids, buckets = lb_ids(sb, "lb1")
    say(f"   NB writer assigned bucket ids {buckets}; group id {gid:#x}")
    say("   gw1's flows and group:")
    for line in our_flows(sb.chassis["gw1"]):
        say(f"     {line}")
    for bid, body in sorted(our_groups(sb.chassis["gw1"])[gid].buckets.items()):
        say(f"     bucket {bid}: {body}")

    say(f"\n== {connections} TCP connections from the external client {topo.client_ip}")
    conns = open_connections(sb, topo, VIP, range(FIRST_SPORT, FIRST_SPORT + connections))
    counts = Counter(c.vm for c in conns)
    for vm in topo.vms:
        say(f"   {vm.name}: {counts.get(vm.name, 0)} connections")
    lost = connections - len(conns)
    say(f"   not delivered: {lost}")
    gw_entries = sum(len(conntrack_lines(sb.chassis[g], f"dst={VIP}")) for g in ("gw1", "gw2"))
    hv_entries = sum(len(conntrack_lines(sb.chassis[h], f"dst={VIP}")) for h in ("hv1", "hv2"))
    say(f"   conntrack entries for the VIP: gateways {gw_entries}, backend chassis {hv_entries}")

    say("\n== Backend 10.0.0.12:8080 (vm2) is removed")
    sb.nbctl("set", "load_balancer", "lb1", f'vips:"{VIP}:80"="10.0.0.11:8080,10.0.0.13:8080"')
    kept = {buckets["10.0.0.11:8080"], buckets["10.0.0.13:8080"]}
    wait_until(lambda: set(our_groups(sb.chassis["gw1"])[gid].buckets) == kept, 10, 0.02,
               "the bucket removal on gw1")
    say(f"   gw1's group {gid:#x} now holds buckets {sorted(kept)}: same group, same ids")
    # One data packet per connection: vm2's have to land elsewhere, the others at home.
    moved = broken(conns, midstream(sb, topo, VIP, conns, b"demo"))
    moved_needed = sum(1 for c in conns if c.vm == "vm2")
    collateral = sum(1 for c in moved if c.vm != "vm2")
    say(f"   connections on vm2 that had to move: {moved_needed}")
    say(f"   connections on vm1/vm3 that moved anyway (collateral): {collateral}")
    say(f"\n== Done in {time.monotonic() - t0:.1f}s; stopping the sandbox")
    return 0 if lost == 0 and gw_entries == 0 and collateral == 0 else 1


def connection_count(text: str) -> int:
    """argparse type of --connections: 1 .. MAX_CONNECTIONS."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_CONNECTIONS:
        raise argparse.ArgumentTypeError(
            f"{value} is not in 1..{MAX_CONNECTIONS} (one client port each)")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="statelesslb-demo", description=__doc__)
    parser.add_argument("--connections", type=connection_count, default=100)
    parser.add_argument("--keep", action="store_true",
                        help="leave the sandbox running (stop it with statelesslb-sandbox down)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run_dir = Path(tempfile.mkdtemp(prefix="slb-demo-", dir="/tmp"))
    try:
        return run(run_dir, args.connections)
    finally:
        if not args.keep:
            Sandbox.stop_dir(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            say(f"sandbox kept: statelesslb-sandbox down --dir {run_dir}")


if __name__ == "__main__":
    sys.exit(main())
