"""What every benchmark shares: a sandbox with agents, process counters, percentiles,
batches of LBs, the remove-then-re-add backend change some of them time, and real HTTP
load from the netns mode's client with the gateways' counters around it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from statelesslb.sandbox import Sandbox, Topology, build_lb_topology
from statelesslb.sandbox import agents as sandbox_agents
from statelesslb.sandbox.netns import TCPAPPS, NetnsLab, python3
from statelesslb.sandbox.processes import wait_until
from statelesslb.sandbox.traffic import GROUP_BASE, conntrack_lines, lb_ids

TICK = os.sysconf("SC_CLK_TCK")
_LOOKUPS = re.compile(r"lookups: hit:(\d+) missed:(\d+) lost:(\d+)")


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


def stateless_group_count(chassis) -> int:
    """Our LB groups on the chassis (the VIP-id range; not the previous-set groups)."""
    return group_count(chassis, GROUP_BASE, GROUP_BASE + 0x0FFFFFFF)


# -- LBs in bulk -----------------------------------------------------------------------


# LBs per `ovn-nbctl` transaction, the same for stateless and native LBs: each transaction
# costs ovn-northd (a recompute on 23.03) and `ovn-nbctl` (a download of the NB) about
# the same whatever it holds. (Batches cut at a number of arguments gave the stateless
# LBs, with their extra `set`, 54 transactions at 10,000 against native's 34.)
LBS_PER_TXN = 200


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
        if (i + 1) % LBS_PER_TXN == 0 or i == n - 1:
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


# -- real HTTP load (netns mode) -------------------------------------------------------


def vswitchd_cpu(sb: Sandbox) -> dict[str, float]:
    out = {}
    for name in [*sb.chassis, "net"]:
        rec = sb.processes.get(f"{name}/ovs-vswitchd")
        if rec is not None and rec.alive():
            out[name] = cpu_seconds(rec.pid)
    return out


def gw_threads(sb: Sandbox) -> dict[str, float]:
    """gw1's ovs-vswitchd CPU seconds by thread kind (main thread user and system time,
    revalidators, handlers, ...): system time of the main thread is mostly the dummy
    datapath's socket I/O, the same per packet for every configuration."""
    pid = sb.chassis["gw1"].pid_of("ovs-vswitchd")
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue   # the thread ended meanwhile
        comm = text[text.index("(") + 1:text.rindex(")")].rstrip("0123456789")
        utime, stime = (int(v) / TICK for v in text.rsplit(")", 1)[1].split()[11:13])
        if comm == "ovs-vswitchd":
            out["main user"] = out.get("main user", 0.0) + utime
            out["main system"] = out.get("main system", 0.0) + stime
            # Each time the main loop sleeps in poll() and is woken: a voluntary switch.
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    out["main wakeups"] = (out.get("main wakeups", 0.0)
                                           + float(line.split()[1]))
        else:
            out[comm] = out.get(comm, 0.0) + utime + stime
    return out


def upcalls(chassis) -> int:
    """Datapath lookups that missed every megaflow: upcalls (dpctl/show, all datapaths)."""
    return sum(int(m.group(2)) for m in _LOOKUPS.finditer(chassis.appctl("dpctl/show")))


def pmd_stats(chassis) -> dict[str, float]:
    """The userspace datapath's own counters for the gateway's main thread."""
    stats: dict[str, float] = {}
    for line in chassis.appctl("dpif-netdev/pmd-stats-show").splitlines():
        key, sep, value = line.strip().partition(":")
        number = value.strip().split(" ")[0]
        if sep and number.replace(".", "", 1).isdigit():
            stats[key] = stats.get(key, 0.0) + float(number)
    return stats


def vip_dp_flows(chassis, vip: str, side: str = "dst") -> list[str]:
    """The gateway's datapath flows whose match names the VIP as destination (towards the
    backends) or, with side="src", as source (replies)."""
    needles = (f"{side}={vip},", f"{side}={vip}/")   # exact, or masked (replies)
    return [line for line in chassis.dump_dp_flows().splitlines()
            if any(n in line for n in needles)]


def run_load(sb: Sandbox, lab: NetnsLab, label: str, vip: str, sources: str, *,
             clients: int, duration: float, max_requests: int,
             ct_needle: str | None = None, idle: float = 0.0) -> dict:
    """One `tcpapps.py load` run from the client namespace (one GET of /who per new TCP
    connection to vip:80, from the addresses of `sources` in turn, or the client's own
    when empty), with the gateways' and backends' counters around it.

    ct_needle: what a conntrack line of this run's connections contains (default
    "dst=<vip>,"; OVN's use_stateless_nat commits the backend as destination, so count
    those by client source instead).
    idle: seconds to measure gw1's ovs-vswitchd CPU afterwards, with no load but the
    run's datapath flows still there (its revalidators keep working on them): the
    gateway's cost per second that does not come from connections.
    """
    out = lab.dir / f"load-{label}.json"
    out.unlink(missing_ok=True)
    gw = sb.chassis["gw1"]
    gw.appctl("dpif-netdev/pmd-stats-clear")
    cpu0, up0, th0 = vswitchd_cpu(sb), upcalls(gw), gw_threads(sb)
    hv_up0 = sum(upcalls(c) for c in sb.hypervisor_chassis)
    argv = [python3(), "-u", TCPAPPS, "load", "--vip", vip, "--port", "80",
            "--path", "/who", "--clients", str(clients),
            "--duration", str(duration), "--timeout", "5",
            "--max-requests", str(max_requests), "--out", str(out)]
    if sources:
        argv += ["--sources", sources]
    started = time.monotonic()
    lab.start("client", f"load-{label}", argv)
    name = lab.process_name("client", f"load-{label}")
    wait_until(lambda: not sb.is_running(name), duration + 30, 0.1,
               f"load run {label} to finish")
    cpu1, up1, th1 = vswitchd_cpu(sb), upcalls(gw), gw_threads(sb)
    wall = time.monotonic() - started
    result_hv_upcalls = sum(upcalls(c) for c in sb.hypervisor_chassis) - hv_up0
    result = json.loads(out.read_text())
    result["vswitchd_cpu_s"] = {k: round(cpu1[k] - cpu0.get(k, 0.0), 3) for k in cpu1}
    result["upcalls_gw1"] = up1 - up0
    result["gw1_threads_s"] = {k: round(v - th0.get(k, 0.0), 3) for k, v in th1.items()}
    result["upcalls_hv"] = result_hv_upcalls
    result["pmd_gw1"] = pmd_stats(gw)
    flows = vip_dp_flows(gw, vip)
    result["vip_dp_flows_gw1"] = len(flows)
    result["vip_dp_flow_samples"] = flows[:3]
    result["reply_dp_flows_gw1"] = len(vip_dp_flows(gw, vip, "src"))
    needle = ct_needle or f"dst={vip},"
    result["conntrack_gw1"] = len(conntrack_lines(gw, needle))
    result["conntrack_backends"] = sum(
        len(conntrack_lines(c, needle)) for c in sb.hypervisor_chassis)
    result["wall_s"] = round(wall, 3)
    if idle > 0:
        before = vswitchd_cpu(sb).get("gw1", 0.0)
        time.sleep(idle)
        result["gw1_idle_cpu_per_s"] = round(
            (vswitchd_cpu(sb).get("gw1", 0.0) - before) / idle, 4)
    return result


def per_1000(seconds: float | None, ok: int) -> float | None:
    """CPU milliseconds per 1,000 connections."""
    return None if seconds is None or not ok else round(seconds * 1e6 / ok, 1)
