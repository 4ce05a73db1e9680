"""Issue 13: on OVN 25.03, its own answer (`use_stateless_nat`) next to its native LB and
statelesslb's default, side by side in one sandbox run.

The topology of bench/persistence.py: lr0 with two DGPs, lr0-public resident on gw1 and
lr0-public2 on gw2, the client reaching every VIP through either; three LBs with the same
3 backends, each its own VIP:

- native:          OVN's LB (ct_lb_mark on the gateway);
- native+stateless_nat: OVN's LB with options:use_stateless_nat=true (25.03: for routers
  with several DGPs, the backend is picked statelessly and the reply SNATed back);
- statelesslb:     options:stateless_mode=mac, default persistence (second-chance).

Per change (add, remove a backend, traffic shifting to the other gateway, both, DGP
failover): broken established connections; then the gateway's conntrack entries and
datapath flows for 1,000 connections. Run it inside the OVN 25.03 chroot, holding the lock:

    flock /tmp/slb-heavy.lock scripts/chroot-trixie run \\
        .venv-ovn25/bin/python bench/ovn25_compare.py [--conns 100] [--cost 1000]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import time

from common import running_sandbox
from persistence import Bench, run_changes, run_cost

from statelesslb.sandbox.topology import add_second_dgp

LAYERS = [
    ("native", None),
    ("native+stateless_nat", "native:use_stateless_nat=true"),
    ("statelesslb", "second-chance"),
]


def dnat_residency(b: Bench) -> dict[str, list[str]]:
    """Per LB: the chassisredirect ports its lr_in_dnat flows are built for."""
    flows = b.sb.sbctl("lflow-list", "lr0").splitlines()
    out = {}
    for name, _ in b.layers:
        vip = b.vip[name]
        ports = set()
        for line in flows:
            if "lr_in_dnat" in line and f"ip4.dst == {vip}" in line:
                ports.update(re.findall(r'is_chassis_resident[(]"(cr-[^"]+)"[)]', line))
        out[name] = sorted(ports)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=100)
    ap.add_argument("--cost", type=int, default=1000)
    args = ap.parse_args()
    t0 = time.monotonic()
    version = subprocess.run(["ovn-northd", "--version"], capture_output=True,
                             text=True).stdout.splitlines()[0]
    with running_sandbox(vms=4) as (sb, topo):
        dgp2 = add_second_dgp(sb, topo)
        b = Bench(sb, topo, dgp2, args.conns, layers=LAYERS)
        b.create_lbs()
        print(f"{version}; sandbox: 2 gateways (lr0-public on gw1, lr0-public2 on gw2), "
              f"2 hypervisors, backends vm1-vm3 (+vm4 when added); {args.conns} "
              f"connections per LB per change")
        for name, ports in dnat_residency(b).items():
            print(f"  {name}: lr_in_dnat flows for {', '.join(ports) or 'no DGP'}")
        run_cost(b, args.cost)
        # Draining is statelesslb's own (no native equivalent): skipped here.
        run_changes(b, skip=("drain a backend",))
        print(f"\ntotal {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
