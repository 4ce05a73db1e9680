"""What the NB writer's keys cost every NB client: bytes per LB row, and the latency of
an `ovn-nbctl` read and write (each command downloads the columns it uses, of every
row; a write of `external_ids` downloads that column of every LB), with N LBs of 16
backends on one gateway. Three kinds of LB, one after the other in one sandbox:
- stateless with second chance (the NB writer records the gateways' active set);
- stateless with plain hashing (ids and status only);
- OVN native (no keys of ours).

    .venv/bin/python bench/nb_footprint.py [--lbs 4000] [--calls 15]

Each kind is created, waited for (groups on gw1, or ovn-controller's flows), measured
with the agents still running, then deleted.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

from common import LBS_PER_TXN, delete, running_sandbox, stateless_group_count

from statelesslb.sandbox.processes import wait_until

KINDS = ("second-chance", "hash", "native")


def create(sb, prefix: str, n: int, backends: list[str], kind: str) -> None:
    """n LBs with one VIP each (172.22.x.y:80) on lr0, LBS_PER_TXN per transaction."""
    batch: list[str] = []
    for i in range(n):
        name = f"{prefix}{i}"
        batch += ["--", "lb-add", name, f"172.22.{i // 250}.{1 + i % 250}:80",
                  ",".join(backends), "tcp", "--", "lr-lb-add", "lr0", name]
        if kind != "native":
            batch += ["--", "set", "load_balancer", name, "options:stateless_mode=mac",
                      f"options:stateless_persistence={kind}"]
        if (i + 1) % LBS_PER_TXN == 0 or i == n - 1:
            sb.nbctl(*batch[1:], timeout=300)
            batch = []


def native_vips(chassis) -> int:
    """VIPs of this bench's native LBs (172.22.x.y) with a DNAT flow on the chassis."""
    dump = chassis.ofctl("dump-flows", "--no-stats")
    return len(set(re.findall(r"nw_dst=(172\.22\.\d+\.\d+).*actions=group:", dump)))


def written(sb, n: int) -> bool:
    """Every LB has the NB writer's status."""
    out = sb.nbctl("--bare", "--columns=external_ids", "list", "load_balancer", timeout=120)
    return out.count("statelesslb:status=ok") >= n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lbs", type=int, default=4000)
    ap.add_argument("--calls", type=int, default=15)
    args = ap.parse_args()
    n = args.lbs
    rows = []
    with running_sandbox(gateways=1, hypervisors=1, vms=16, resync=3600.0) as (sb, topo):
        gw = sb.chassis["gw1"]
        backends = [f"{vm.ip}:8080" for vm in topo.vms]
        for kind in KINDS:
            create(sb, "f", n, backends, kind)
            if kind == "native":
                wait_until(lambda: native_vips(gw) >= n, 900, 0.5,
                           "native flows on gw1")
            else:
                wait_until(lambda: stateless_group_count(gw) >= n, 900, 0.5, "groups on gw1")
                wait_until(lambda: written(sb, n), 300, 0.5, "the NB writer's status")
            time.sleep(1)
            size = len(sb.nbctl("--format=json", "list", "load_balancer", timeout=120)) / n
            reads, writes = [], []
            for k in range(args.calls):
                start = time.monotonic()
                sb.nbctl("get", "load_balancer", f"f{k % n}", "name")
                reads.append(time.monotonic() - start)
                time.sleep(0.2)
                start = time.monotonic()
                sb.nbctl("set", "load_balancer", f"f{k % n}", f"external_ids:bench={k}")
                writes.append(time.monotonic() - start)
                time.sleep(0.2)   # the agents and ovn-northd see the write meanwhile
            rows.append((kind, size, statistics.median(reads) * 1000,
                         statistics.median(writes) * 1000))
            print(f"{kind:>14}: {size:7.0f} bytes per LB row; ovn-nbctl: a read "
                  f"{rows[-1][2]:6.1f} ms, a write {rows[-1][3]:6.1f} ms "
                  f"(medians of {args.calls})", flush=True)
            delete(sb, "f", n)
            if kind == "native":
                wait_until(lambda: native_vips(gw) == 0, 900, 0.5, "flows removed")
            else:
                wait_until(lambda: stateless_group_count(gw) == 0, 900, 0.5, "groups removed")
    native = rows[-1]
    print(f"\nwith {n} LBs of {len(backends)} backends, against native:")
    for kind, size, read, write in rows[:-1]:
        print(f"{kind:>14}: row {size / native[1]:.2f}x, ovn-nbctl read {read / native[2]:.2f}x, "
              f"write {write / native[3]:.2f}x")


if __name__ == "__main__":
    main()
