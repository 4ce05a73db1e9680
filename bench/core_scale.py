"""Cost of one backend change in the pure core, against the number of LBs.

No OVS here: it times, in one process, what the agent does between reading
the NB and running `ovs-ofctl bundle` (the NB writer's pass, planning and
the diff against what is installed), for N stateless LBs of 16 backends on
one gateway, both ways side by side:
- incremental: what the agent runs (NbReconciler, IncrementalPlanner, and a
  diff limited to the cookies and groups the planner names);
- from scratch: reconcile_nb over every LB, plan(), and a full diff.

    .venv/bin/python bench/core_scale.py [--sizes 10,100,1000,5000] [--changes 21]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from statelesslb.nb.bucket_ids import NbReconciler, reconcile_nb  # noqa: E402
from statelesslb.nb.model import Snapshot  # noqa: E402
from statelesslb.nb.validate import ValidationMemo  # noqa: E402
from statelesslb.openflow import diff  # noqa: E402
from statelesslb.plan.planner import IncrementalPlanner, plan
from statelesslb.plan.specs import PlanConfig
from tests.unit.factories import TABLES, Topo  # noqa: E402


def build(n: int) -> tuple[Topo, list[str]]:
    topo = Topo()
    topo.add_router("lr0", 3, {"lr0-public": "gw1"})
    topo.add_switch("ls0", 1)
    backends = []
    for i in range(16):
        topo.add_vif("ls0", f"vm{i}", f"50:54:00:00:01:{i:02x}", f"10.0.0.{11 + i}", "hv1")
        backends.append(f"10.0.0.{11 + i}:8080")
    # A VM no LB uses: its moves and neighbours should cost the LBs nothing.
    topo.add_vif("ls0", "other", "50:54:00:00:02:01", "10.0.1.1", "hv2")
    for i in range(n):
        # Marked stateless, persistence=hash (the factories' MARKED options).
        topo.add_lb(f"s{i}", {f"172.20.{i // 250}.{1 + i % 250}:80": ",".join(backends)})
    return topo, backends


def measure(n: int, changes: int) -> tuple[float, float, float, float]:
    topo, backends = build(n)
    now = 1000.0
    topo.writer_pass(now)
    sb = topo.sb()
    base = topo.nb()
    config = PlanConfig()
    validation = ValidationMemo()    # shared, as in the agent
    reconciler = NbReconciler(validation)
    planner = IncrementalPlanner(config, validation)

    def view():
        # As the NbReader: new LB mapping, the same topology mappings.
        return dataclasses.replace(base, load_balancers=dict(topo.load_balancers))

    reconciler.reconcile(view(), now)
    first = planner.update(Snapshot(view(), sb, "gw1", TABLES), now)
    installed = diff.state_after(first.plan)
    full_installed = diff.state_after(first.plan)
    incremental, scratch = [], []
    for k in range(changes):
        name = f"s{(k // 2 * 7) % n}"   # remove a backend, then add it back
        lb = topo.lb(name)
        vip = next(iter(lb.vips))
        members = backends[:15] if k % 2 == 0 else backends
        topo.update_lb(name, vips={vip: ",".join(members)})
        uuid = lb.uuid
        # Incremental: the writer's pass, its write, then planning and the diff.
        t0 = time.perf_counter()
        nb = view()
        delta = reconciler.reconcile(nb, now, frozenset({uuid}))
        topo.write(delta)
        nb = view()
        reconciler.reconcile(nb, now, frozenset(delta))
        update = planner.update(Snapshot(nb, sb, "gw1", TABLES), now, frozenset({uuid}))
        lines = diff.diff_lines(update.plan, installed, update.flows, update.groups)
        diff.record(update.plan, installed, update.flows, update.groups)
        incremental.append(time.perf_counter() - t0)
        # From scratch on the same state (its writer pass finds nothing left to write).
        t0 = time.perf_counter()
        nb = topo.nb()
        reconcile_nb(nb.load_balancers.values(), nb, now)
        reconcile_nb(nb.load_balancers.values(), nb, now)
        whole = plan(Snapshot(nb, topo.sb(), "gw1", TABLES), config, now)
        full_lines = diff.diff_lines(whole, full_installed)
        full_installed = diff.state_after(whole, full_installed)
        scratch.append(time.perf_counter() - t0)
        assert lines and sorted(lines) == sorted(full_lines), (lines, full_lines)
    # Not an LB change: the VM nobody balances to moves (SB), then a port is added
    # next to it (NB topology). Writer and planner, as the agent runs them.
    moves, ports = [], []
    for k in range(5):
        binding = topo.port_bindings["other"]
        topo.port_bindings["other"] = dataclasses.replace(
            binding, chassis="hv1" if binding.chassis == "hv2" else "hv2")
        sb = topo.sb()
        t0 = time.perf_counter()
        reconciler.reconcile(view(), now, frozenset())
        planner.update(Snapshot(view(), sb, "gw1", TABLES), now, frozenset())
        moves.append(time.perf_counter() - t0)
        topo.add_vif("ls0", f"new{k}", f"50:54:00:00:03:{k:02x}", f"10.0.2.{k + 1}", "hv2")
        base = topo.nb()
        sb = topo.sb()
        t0 = time.perf_counter()
        reconciler.reconcile(view(), now, frozenset())
        planner.update(Snapshot(view(), sb, "gw1", TABLES), now, frozenset())
        ports.append(time.perf_counter() - t0)
    return (statistics.median(incremental), statistics.median(scratch),
            statistics.median(moves), statistics.median(ports))


def first_install(n: int, chassis: str, memory: bool) -> tuple[float, float | None]:
    """A first install in the core, as the agent meets it in bench/scale.py: the LBs
    arrive attached and marked, 230 per NB transaction (ovn-nbctl's batches there); per
    batch the NB writer's pass, its write coming back (a second pass), planning and the
    diff. Returns (seconds, MiB the writer's and planner's state hold at the end, with
    `memory`)."""
    import gc
    import tracemalloc

    topo, _ = build(n)
    every = dict(topo.load_balancers)
    router = topo.routers[topo.router_uuid("lr0")]
    sb = topo.sb()
    gc.collect()
    if memory:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0] if memory else 0
    validation = ValidationMemo()
    reconciler = NbReconciler(validation)
    planner = IncrementalPlanner(PlanConfig(), validation)
    empty = dataclasses.replace(topo.nb(), load_balancers={},
                                routers={**topo.routers, router.uuid: dataclasses.replace(
                                    router, load_balancers=())})
    installed = diff.state_after(planner.update(Snapshot(empty, sb, chassis, TABLES),
                                                1000.0).plan)
    names = list(every)
    shown: dict = {}
    started = time.perf_counter()
    for start in range(0, n, 230):
        batch = names[start:start + 230]
        shown.update((u, every[u]) for u in batch)
        topo.routers[router.uuid] = dataclasses.replace(router, load_balancers=tuple(shown))
        topo.load_balancers = dict(shown)
        nb = topo.nb()
        delta = reconciler.reconcile(nb, 1000.0, frozenset(batch))
        topo.write(delta)
        shown.update((u, topo.load_balancers[u]) for u in delta)
        nb = dataclasses.replace(nb, load_balancers=dict(shown))
        reconciler.reconcile(nb, 1000.0, frozenset(delta))
        update = planner.update(Snapshot(nb, sb, chassis, TABLES), 1000.0,
                                frozenset(batch) | frozenset(delta))
        diff.diff_lines(update.plan, installed, update.flows, update.groups)
        diff.record(update.plan, installed, update.flows, update.groups)
    took = time.perf_counter() - started
    held = None
    if memory:
        del topo, every, shown, nb, update
        gc.collect()
        held = (tracemalloc.get_traced_memory()[0] - base) / 2**20
        tracemalloc.stop()
    assert planner is not None and reconciler is not None and installed is not None
    return took, held


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,100,1000,5000")
    ap.add_argument("--changes", type=int, default=21)
    ap.add_argument("--install", action="store_true",
                    help="time a first install in batches instead (gw1 and hv1), and "
                         "with --memory what the writer and planner hold after it")
    ap.add_argument("--memory", action="store_true")
    args = ap.parse_args()
    if args.install:
        print(f"{'LBs':>6} {'gw1 s':>7} {'hv1 s':>7}" + (
            f" {'gw1 MiB':>8} {'hv1 MiB':>8}" if args.memory else ""))
        for n in (int(x) for x in args.sizes.split(",")):
            (gw_s, gw_mib), (hv_s, hv_mib) = (first_install(n, c, args.memory)
                                              for c in ("gw1", "hv1"))
            print(f"{n:>6} {gw_s:>7.2f} {hv_s:>7.2f}" + (
                f" {gw_mib:>8.1f} {hv_mib:>8.1f}" if args.memory else ""), flush=True)
        print("\nfirst install in the core: N LBs of 16 backends arriving 230 per NB "
              "transaction; per batch the NB writer's pass, its write coming back, "
              "planning and the diff, on the gateway gw1 and on hv1 (all 16 backends "
              "bound there); MiB: what the writer, the planner and the installed record "
              "hold afterwards (tracemalloc, which slows the timing: time without it)")
        return
    print(f"{'LBs':>6} {'incremental ms':>15} {'from scratch ms':>16} {'ratio':>7} | "
          f"{'other VM moved ms':>18} {'port added ms':>14}")
    for n in (int(x) for x in args.sizes.split(",")):
        inc, full, moved, added = measure(n, args.changes)
        print(f"{n:>6} {inc * 1000:>15.2f} {full * 1000:>16.2f} {full / inc:>7.1f} | "
              f"{moved * 1000:>18.2f} {added * 1000:>14.2f}", flush=True)
    print("\none backend change of one LB (median): NB writer pass + write + writer pass, "
          "planning, diff; the bundle lines of both ways are checked equal.\n"
          "other VM moved: an SB binding no LB reads changes; port added: a VIF with a new "
          "address appears on the backends' switch (an NB topology change that no LB's "
          "validation read); both as the agent runs them (writer pass and planning)")


if __name__ == "__main__":
    main()
