"""What every benchmark shares: a sandbox with agents, process counters, percentiles."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from statelesslb.sandbox import Sandbox, Topology, build_lb_topology
from statelesslb.sandbox import agents as sandbox_agents

TICK = os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def running_sandbox(gateways: int = 2, hypervisors: int = 2, vms: int = 8,
                    agents: bool = True, **agent_kwargs) -> Iterator[tuple[Sandbox, Topology]]:
    """A real sandbox with the LB topology (and agents), always stopped and removed."""
    run_dir = Path(tempfile.mkdtemp(prefix="slb-bench-", dir="/tmp"))
    sb = Sandbox(run_dir, gateways=gateways, hypervisors=hypervisors)
    try:
        sb.up()
        topo = build_lb_topology(sb, vms=vms)
        if agents:
            sandbox_agents.start_agents(sb, debug=False, **agent_kwargs)
            sandbox_agents.wait_agents_ready(sb)
        yield sb, topo
    finally:
        sb.down()
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
