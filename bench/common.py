"""What every benchmark shares: a sandbox with agents, process counters, percentiles,
batches of LBs and the remove-then-re-add backend change some of them time."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from statelesslb.sandbox import Sandbox, Topology, build_lb_topology
from statelesslb.sandbox import agents as sandbox_agents
from statelesslb.sandbox.processes import wait_until
from statelesslb.sandbox.traffic import GROUP_BASE, lb_ids

TICK = os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def running_sandbox(gateways: int = 2, hypervisors: int = 2, vms: int = 8,
                    agents: bool = True, clustered: bool = False,
                    **agent_kwargs) -> Iterator[tuple[Sandbox, Topology]]:
    """A real sandbox with the LB topology (and agents), always stopped and removed;
    clustered: NB and SB as 3-member RAFT clusters."""
    run_dir = Path(tempfile.mkdtemp(prefix="slb-bench-", dir="/tmp"))
    sb = Sandbox(run_dir, gateways=gateways, hypervisors=hypervisors, clustered=clustered)
    try:
        sb.up()
        topo = build_lb_topology(sb, vms=vms)
        if agents:
            sandbox_agents.start_agents(sb, debug=False, **agent_kwargs)
            sandbox_agents.wait_agents_ready(sb)
        yield sb, topo
    finally:
        sb.down()
        if os.environ.get("STATELESSLB_KEEP_SANDBOX"):
            print(f"kept {run_dir} (STATELESSLB_KEEP_SANDBOX)")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


# -- groups on a chassis -------------------------------------------------------------


def bucket_count(chassis, gid: int) -> int:
    """Buckets of one group: a dump of that group only, cheap enough to poll often."""
    return chassis.ofctl("dump-groups", str(gid)).count("bucket_id:")


def group_count(chassis, low: int, high: int) -> int:
    ids = [int(m) for m in re.findall(r"group_id=(\d+),", chassis.ofctl("dump-group-stats"))]
    return sum(1 for i in ids if low <= i <= high)


# -- LBs in bulk -----------------------------------------------------------------------


def create(sb, prefix: str, n: int, backends: list[str], stateless: bool, subnet: int):
    batch: list[str] = []
    for i in range(n):
        name = f"{prefix}{i}"
        vip = f"172.{subnet}.{i // 250}.{1 + i % 250}:80"
        batch += ["--", "lb-add", name, vip, ",".join(backends), "tcp",
                  "--", "lr-lb-add", "lr0", name]
        if stateless:
            batch += ["--", "set", "load_balancer", name, "options:stateless_mode=mac",
                      "options:stateless_persistence=hash"]
        if len(batch) > 3000 or i == n - 1:
            sb.nbctl(*batch[1:], timeout=300)
            batch = []


def delete(sb, prefix: str, n: int) -> None:
    names = [f"{prefix}{i}" for i in range(n)]
    for start in range(0, n, 200):
        cmd: list[str] = []
        for name in names[start:start + 200]:
            cmd += ["--", "lb-del", name]
        sb.nbctl(*cmd[1:], timeout=300)


def toggle_backend(sb, gw, prefix: str, n: int, k: int, backends: list[str],
                   timeout: float) -> float:
    """Change k of a series over the stateless LBs `create` made: even k removes the
    last backend of one LB, odd k adds it back to the same LB.

    Returns the seconds from just before the NB commit to gw's group showing the new
    bucket count.
    """
    name = f"{prefix}{(k // 2 * 7) % n}"
    vip_ids, _ids = lb_ids(sb, name)
    gid = GROUP_BASE + next(iter(vip_ids.values()))
    vip = next(iter(vip_ids))
    members = backends[:-1] if k % 2 == 0 else backends
    count = len(members)
    t0 = time.monotonic()
    sb.nbctl("set", "load_balancer", name, f'vips:"{vip}"="{",".join(members)}"')
    # Poll only this group (one small dump): the bench must not eat the CPU the
    # agent needs (two cores).
    wait_until(lambda: bucket_count(gw, gid) == count, timeout, 0.01,
               f"the change on {gw.name}")
    return time.monotonic() - t0
