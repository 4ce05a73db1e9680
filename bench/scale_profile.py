"""Where the agent's time and memory go at scale (issue 15): the figures in docs/scale.md.

One gateway and one hypervisor with 16 VMs and an agent on each, N stateless LBs of
16 backends created in one batch. It measures:
- time: `py-spy record` (if installed, `--py-spy PATH`) samples gw1's agent from the
  NB commit until all N groups are on gw1, then an agent restart (full resync) the
  same way; the samples are summed per function (inclusive and own time);
- memory: in this process, with tracemalloc, what each piece of the agent holds:
  the NB and SB IDL copies (python-ovs rows), the NB view (model objects), the NB
  writer's state, the planner's state and plan, and the installed-state record.

    .venv/bin/python bench/scale_profile.py --size 4000 [--py-spy /path/to/py-spy]
        [--chassis hv1]   # sample hv1's agent during the install instead
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from common import create, rss_mib, running_sandbox, stateless_group_count

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from statelesslb.sandbox import agents as sandbox_agents  # noqa: E402
from statelesslb.sandbox.processes import wait_until  # noqa: E402


def summarize(raw: Path, top: int) -> str:
    """py-spy's collapsed stacks -> the top functions by inclusive and by own samples."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f.split(" (")[0] + " " + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1]
                  if " (" in f else f for f in stack.split(";")]
        if "idle" in stack and "wait" in frames[-1]:
            continue
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    lines = [f"{total} samples (threads busy)"]
    lines.append("inclusive:")
    lines += [f"  {100 * c / max(total, 1):5.1f}%  {f}" for f, c in inclusive.most_common(top)]
    lines.append("own:")
    lines += [f"  {100 * c / max(total, 1):5.1f}%  {f}" for f, c in own.most_common(top)]
    return "\n".join(lines)


def profiled(py_spy: str | None, pid: int, out: Path):
    if not py_spy:
        return None
    return subprocess.Popen([py_spy, "record", "--pid", str(pid), "--format", "raw",
                             "--rate", "50", "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profile(proc, out: Path, label: str, top: int) -> None:
    if proc is None:
        return
    proc.send_signal(2)
    proc.wait(30)
    if out.exists():
        print(f"\n== py-spy, {label} ==\n{summarize(out, top)}", flush=True)


def memory(sb, size: int) -> None:
    """What each piece of the agent holds, built here in-process against the sandbox."""
    from statelesslb.agent import watchers
    from statelesslb.nb.bucket_ids import NbReconciler
    from statelesslb.nb.model import Snapshot, TableLayout
    from statelesslb.nb.validate import ValidationMemo
    from statelesslb.openflow import diff
    from statelesslb.plan import planner, specs

    def noop(source, reconnected):
        pass

    gc.collect()
    tracemalloc.start()
    steps = []

    def step(name: str) -> None:
        gc.collect()
        current, _ = tracemalloc.get_traced_memory()
        steps.append((name, current))

    step("start")
    nb = watchers.Watcher("nb", "OVN_Northbound", sb.nb, watchers.NB_TABLES, noop)
    nb.start()
    wait_until(lambda: len(nb.idl.tables["Load_Balancer"].rows) >= size, 300, 0.2, "NB IDL")
    step("NB IDL copy")
    sbw = watchers.Watcher("sb", "OVN_Southbound", sb.sb, watchers.SB_TABLES, noop)
    sbw.start()
    wait_until(lambda: len(sbw.idl.tables["Port_Binding"].rows) > 0, 300, 0.2, "SB IDL")
    time.sleep(2)
    step("SB IDL copy")
    nb_view, _ = watchers.NbReader(nb).read()
    sb_view = watchers.SbReader(sbw).read()
    step("NB view (model)")
    validation = ValidationMemo()
    reconciler = NbReconciler(validation)
    reconciler.reconcile(nb_view, time.time())
    step("NB writer state")
    chassis = next(iter(sb.chassis.values()))
    gw = sb.chassis["gw1"]
    del chassis
    layout_text = json.loads(sandbox_agents.agent_ctl(sb, "gw1", "status"))["layout"]
    layout = TableLayout(**layout_text)
    plan_builder = planner.IncrementalPlanner(specs.PlanConfig(), validation)
    update = plan_builder.update(Snapshot(nb_view, sb_view, gw.name, layout), time.time())
    step("planner + plan")
    installed = diff.state_after(update.plan)
    step("installed record")
    del installed
    tracemalloc.stop()
    print(f"\n== memory (tracemalloc, {size} LBs; flows {len(update.plan.flows)}, "
          f"groups {len(update.plan.groups)}) ==")
    prev = steps[0][1]
    for name, current in steps[1:]:
        print(f"  {name:<20} {(current - prev) / 2**20:8.1f} MiB "
              f"({(current - prev) / size / 1024:6.1f} KiB/LB)")
        prev = current
    print(f"  {'total':<20} {(prev - steps[0][1]) / 2**20:8.1f} MiB; "
          f"this process RSS {rss_mib(__import__('os').getpid()):.0f} MiB")
    nb.stop()
    sbw.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4000)
    ap.add_argument("--py-spy", default=None)
    ap.add_argument("--chassis", default="gw1", choices=("gw1", "hv1"),
                    help="whose agent py-spy samples during the first install (hv1: the "
                         "chassis of all 16 backends)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default="/tmp/slb-scale-profile")
    ap.add_argument("--log", action="store_true", help="print the restarted agent's log")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = args.size
    with running_sandbox(gateways=1, hypervisors=1, vms=16, resync=3600.0) as (sb, topo):
        gw = sb.chassis["gw1"]
        backends = [f"{vm.ip}:8080" for vm in topo.vms]
        pid = sb.agents["gw1"]["pid"]
        prof = profiled(args.py_spy, sb.agents[args.chassis]["pid"], out / "install.txt")
        start = time.monotonic()
        create(sb, "s", n, backends, True, 20)
        created = time.monotonic() - start
        wait_until(lambda: stateless_group_count(gw) >= n,
                   1800, 0.2, f"{n} stateless groups on gw1")
        install = time.monotonic() - start
        stop_profile(prof, out / "install.txt", f"first install, {args.chassis}'s agent",
                     args.top)
        time.sleep(2)
        status = json.loads(sandbox_agents.agent_ctl(sb, "gw1", "status"))
        print(f"\nfirst install {install:.2f} s (nbctl {created:.2f} s); "
              f"gw1 agent RSS {rss_mib(pid):.0f} MiB, hv1 agent RSS "
              f"{rss_mib(sb.agents['hv1']['pid']):.0f} MiB; writer on gw1: "
              f"{status['nb_writer']}; last laps {status['last_apply_ms']}", flush=True)
        # Full resync: restart the gw1 agent; the groups stay, it must read and compare.
        sandbox_agents.stop_agent(sb, gw)
        start = time.monotonic()
        info = sandbox_agents.start_agent(sb, gw, debug=False, resync=3600.0)
        prof = profiled(args.py_spy, info["pid"], out / "resync.txt")

        def synced() -> bool:
            st = json.loads(sandbox_agents.agent_ctl(sb, "gw1", "status"))
            return bool(st.get("last_full_sync")) and st.get("groups_installed") == n
        wait_until(synced, 1800, 0.2, "gw1 agent resynced")
        resync = time.monotonic() - start
        stop_profile(prof, out / "resync.txt", "restart (full resync)", args.top)
        status = json.loads(sandbox_agents.agent_ctl(sb, "gw1", "status"))
        print(f"\nresync {resync:.2f} s; RSS {rss_mib(info['pid']):.0f} MiB; "
              f"laps {status['last_apply_ms']}", flush=True)
        if args.log:
            log = Path(info["log"]).read_text().splitlines()
            print("\n".join(line for line in log if "LB " not in line)[-6000:])
        memory(sb, n)


if __name__ == "__main__":
    main()
