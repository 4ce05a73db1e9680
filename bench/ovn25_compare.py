"""Issue 13: on OVN 25.03, its own answer (`use_stateless_nat`) next to its native LB and
statelesslb's default, side by side in one run.

The topology of bench/persistence.py: lr0 with two DGPs, lr0-public resident on gw1 and
lr0-public2 on gw2, the client reaching every VIP through either. Three configurations:

- native:          OVN's LB (ct_lb_mark on the gateway);
- native+stateless_nat: OVN's LB with options:use_stateless_nat=true (25.03: for routers
  with several DGPs; the reply is SNATed back to the VIP without the gateway's conntrack);
- statelesslb:     options:stateless_mode=mac, default persistence (second-chance) and
  default hash classes (client-bits:8,port-bits:5).

Part 1, injected packets (the sandbox's dummy ports; one LB per configuration, the same 3
backends, each its own VIP): per change (add, remove a backend, traffic shifting to the
other gateway, both, DGP failover) the broken established connections; then the
gateway's conntrack entries and datapath flows for 1,000 connections.

Part 2, real TCP (the netns mode: the client and the backends are namespaces with their
own kernel TCP stacks; each configuration its own 3 backends plus a spare, so no backend is
shared between configurations): requests/s, latency, gateway CPU and datapath flows of HTTP
load (one GET per new connection, 256 client addresses per configuration, cold then
warm); then per configuration two LBs with different VIPs and the same 3 backends
(address:port): do echo connections to both VIPs work, from which address the replies
arrive (a sniffer on the client's interface), and what the connections of one VIP see when
the other LB gains a backend, loses one and is deleted.

Run it inside the OVN 25.03 chroot, holding the lock:

    flock /tmp/slb-heavy.lock scripts/chroot-trixie run \\
        .venv-ovn25/bin/python bench/ovn25_compare.py [--conns 100] [--cost 1000] \\
        [--clients 8] [--duration 10] [--echo-conns 20] [--parts injected,real]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import per_1000, run_load, running_sandbox
from persistence import Bench, run_changes, run_cost

from statelesslb.sandbox import Sandbox
from statelesslb.sandbox import agents as sandbox_agents
from statelesslb.sandbox.netns import (
    ECHO_PORT,
    HTTP_PORT,
    NetnsLab,
    build_real_topology,
    netns_available,
    real_sandbox,
)
from statelesslb.sandbox.processes import wait_until
from statelesslb.sandbox.topology import Vm, add_second_dgp
from statelesslb.sandbox.traffic import (
    GROUP_BASE,
    installed_fields,
    lb_ids,
    our_groups,
    set_backends,
    wait_lb_ready,
)

LAYERS = [
    ("native", None),
    ("native+stateless_nat", "native:use_stateless_nat=true"),
    ("statelesslb", "second-chance"),
]
PARTS = ("injected", "real")


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


# -- real TCP (netns mode) ------------------------------------------------------------

REAL = [  # label, options of its LBs
    ("native", []),
    ("native+stateless_nat", ["options:use_stateless_nat=true"]),
    ("statelesslb", ["options:stateless_mode=mac"]),  # default persistence and classes
]
ECHO_SPORTS = 42000      # the two-VIP echo connections' client ports start here
ECHO_TIMEOUT = 4.0       # an echo that takes longer breaks its connection


@dataclass
class RealConfig:
    """One configuration's LBs and backends in the real-TCP part."""

    label: str
    options: list[str]
    index: int
    backends: list[Vm]      # the LBs' backends (their own VMs: no configuration
    spare: Vm               # shares a backend with another)
    load_vip: str = ""
    sources: str = ""       # the load's client addresses (their own range)
    vips: dict[str, str] = field(default_factory=dict)   # "a"/"b" -> VIP address
    sports: dict[str, range] = field(default_factory=dict)
    members: dict[str, list[str]] = field(default_factory=dict)  # "a"/"b" -> backends
    gids: dict[str, int] = field(default_factory=dict)

    @property
    def stateless(self) -> bool:
        return "options:stateless_mode=mac" in self.options

    def lb(self, which: str) -> str:
        return f"real{self.index}-{which}"


def group_fields(sb: Sandbox, lb: str, vip: str) -> str:
    """What gw1's group for a stateless LB's VIP hashes (the classes in force)."""
    vip_ids, _ = lb_ids(sb, lb)
    return installed_fields(sb.chassis["gw1"], GROUP_BASE + vip_ids[vip])


def create_lb(sb: Sandbox, topo, cfg: RealConfig, name: str, vip: str,
              backends: list[str]) -> int | None:
    sb.nbctl("lb-add", name, vip, ",".join(backends), "tcp", "--", "lr-lb-add", topo.router,
             name)
    if cfg.options:
        sb.nbctl("set", "load_balancer", name, *cfg.options)
    if cfg.stateless:
        return wait_lb_ready(sb, name, vip, len(backends), topo=topo)
    return None


def real_load(sb: Sandbox, topo, lab: NetnsLab, cfgs: list[RealConfig], args) -> dict:
    """requests/s, latency and gateway cost of real HTTP load, per configuration: cold
    (the gateway has no datapath flow for the VIP yet) then warm (right after)."""
    for cfg in cfgs:
        cfg.load_vip = f"172.16.0.{130 + cfg.index}"
        cfg.sources = f"172.16.{10 + cfg.index}.0/24"   # off both DGPs' subnets
        lab.add_client_sources(topo, cfg.sources)
        create_lb(sb, topo, cfg, cfg.lb("load"), f"{cfg.load_vip}:80",
                  [f"{vm.ip}:{HTTP_PORT}" for vm in cfg.backends])
    sb.wait_flows_installed()
    for cfg in cfgs:
        if cfg.stateless:
            print(f"  {cfg.label}: gw1's group hashes "
                  + group_fields(sb, cfg.lb("load"), f"{cfg.load_vip}:80"))
        rc, body = lab.curl(f"http://{cfg.load_vip}/who")
        if rc != 0 or body.strip() not in {vm.name for vm in cfg.backends}:
            raise SystemExit(f"{cfg.label}: warm-up request to {cfg.load_vip} failed "
                             f"(curl exit {rc}, body {body!r})")
    time.sleep(11)   # the warm-up's datapath flows expire (max-idle 10 s): cold is cold
    results: dict[str, dict[str, dict]] = {}
    for cfg in cfgs:
        ct = f"src=172.16.{10 + cfg.index}."   # use_stateless_nat commits the backend as
        results[cfg.label] = {}                # destination: count by client source
        for phase in ("cold", "warm"):
            res = run_load(sb, lab, f"{cfg.index}-{phase}", cfg.load_vip, cfg.sources,
                           clients=args.clients, duration=args.duration,
                           max_requests=args.max_requests, ct_needle=ct)
            results[cfg.label][phase] = res
            print(f"  {cfg.label} {phase}: {res['rps']} req/s, {res['errors']} errors",
                  file=sys.stderr, flush=True)
    return results


def print_load(results: dict[str, dict[str, dict]], args) -> None:
    labels = list(results)
    print(f"\nreal TCP: {args.clients} client threads x {args.duration:g} s per phase, one "
          "GET per new TCP connection, 256 client addresses per configuration, 3 "
          "backends each, through gw1:")
    rows = [
        ("completed requests", lambda r: r["ok"]),
        ("errors", lambda r: r["errors"]),
        ("requests/s", lambda r: r["rps"]),
        ("latency p50 (ms)", lambda r: r["latency_ms"]["p50"]),
        ("latency p99 (ms)", lambda r: r["latency_ms"]["p99"]),
        ("gw1 vswitchd CPU ms / 1,000 conns",
         lambda r: per_1000(r["vswitchd_cpu_s"].get("gw1"), r["ok"])),
        ("gw2 vswitchd CPU ms / 1,000 conns",
         lambda r: per_1000(r["vswitchd_cpu_s"].get("gw2"), r["ok"])),
        ("hv1+hv2 vswitchd CPU ms / 1,000 conns",
         lambda r: per_1000(r["vswitchd_cpu_s"].get("hv1", 0.0)
                            + r["vswitchd_cpu_s"].get("hv2", 0.0), r["ok"])),
        ("gw1 upcalls per connection", lambda r: round(r["upcalls_gw1"] / max(r["ok"], 1), 3)),
        ("gw1 datapath flows for the VIP", lambda r: r["vip_dp_flows_gw1"]),
        ("gw1 conntrack entries (end)", lambda r: r["conntrack_gw1"]),
        ("backends' hv conntrack entries (end)", lambda r: r["conntrack_backends"]),
    ]
    for phase in ("cold", "warm"):
        print(f"  {phase}:")
        print(f"  {'':40}" + "".join(f"{k:>24}" for k in labels))
        for title, get in rows:
            print(f"  {title:40}" + "".join(f"{get(results[k][phase])!s:>24}"
                                            for k in labels))
        for k in labels:
            if results[k][phase]["error_kinds"]:
                print(f"  {k} errors: {results[k][phase]['error_kinds']}")


def wrong_sources(counts: dict[tuple[str, int, int], int], vip: str,
                  sports: range) -> tuple[int, int, set[str]]:
    """(packets from vip:7, packets from anything else, those other sources) that
    arrived for the client ports `sports`."""
    good = bad = 0
    others = set()
    for (src, sport, dport), n in counts.items():
        if dport in sports:
            if (src, sport) == (vip, 7):
                good += n
            else:
                bad += n
                others.add(f"{src}:{sport}")
    return good, bad, others


def two_vips(sb: Sandbox, topo, lab: NetnsLab, cfgs: list[RealConfig], n: int) -> None:
    """Per configuration two LBs, a and b, different VIPs, the same 3 backends
    (address:port): echo connections to both; the replies' sources as the client's
    interface saw them; then the connections of one VIP while the other LB changes."""
    for cfg in cfgs:
        base = ECHO_SPORTS + 200 * cfg.index
        for j, which in enumerate("ab"):
            cfg.vips[which] = f"172.16.0.{140 + 2 * cfg.index + j}"
            cfg.sports[which] = range(base + 100 * j, base + 100 * j + n)
            cfg.members[which] = [f"{vm.ip}:{ECHO_PORT}" for vm in cfg.backends]
            gid = create_lb(sb, topo, cfg, cfg.lb(which), f"{cfg.vips[which]}:7",
                            cfg.members[which])
            if gid is not None:
                cfg.gids[which] = gid
    sb.wait_flows_installed()
    sniff = lab.sniff("sniff", ECHO_SPORTS, ECHO_SPORTS + 200 * len(cfgs))
    runs = {(cfg.label, w): lab.echo_client(f"echo{cfg.index}{w}", cfg.vips[w], 7,
                                            cfg.sports[w], duration=300,
                                            timeout=ECHO_TIMEOUT)
            for cfg in cfgs for w in "ab"}
    first = {key: run.wait_established(timeout=ECHO_TIMEOUT + 10)
             for key, run in runs.items()}
    counts = sniff.counts()
    print(f"\na backend serving two VIPs: per configuration LBs a and b, VIPs "
          f"{', '.join(c.vips['a'] + '/' + c.vips['b'] for c in cfgs)} (port 7), the same 3 "
          f"backends (address:port); {n} echo connections to each VIP:")
    print(f"  {'':34}" + "".join(f"{c.label:>24}" for c in cfgs))
    for w in "ab":
        cells = []
        for cfg in cfgs:
            conns = first[(cfg.label, w)]
            ok = sum(1 for c in conns.values() if c["ok"] >= 3 and not c["error"])
            cells.append(f"{ok}/{len(conns)}")
        print(f"  {'VIP ' + w + ': connections working':34}" + "".join(f"{c:>24}" for c in cells))
        cells = []
        for cfg in cfgs:
            good, bad, others = wrong_sources(counts, cfg.vips[w], cfg.sports[w])
            cells.append(f"{good}/{bad}" + (f" ({','.join(sorted(others))})" if bad else ""))
        print(f"  {'  replies from the VIP/elsewhere':34}" + "".join(f"{c:>24}" for c in cells))
        cells = [",".join(sorted({c["backend"] for c in first[(cfg.label, w)].values()
                                  if c["backend"]})) or "-" for cfg in cfgs]
        print(f"  {'  backends reached':34}" + "".join(f"{c:>24}" for c in cells))
    for key, conns in first.items():
        errs = {c["error"] for c in conns.values() if c["error"]}
        if errs:
            print(f"  {key[0]} VIP {key[1]} errors: {', '.join(sorted(errs))}")

    # Watch the VIP whose connections work; change the other LB. (With use_stateless_nat
    # one of the two may not work at all.)
    watch = {}
    for cfg in cfgs:
        working = {w: sum(1 for c in first[(cfg.label, w)].values() if not c["error"])
                   for w in "ab"}
        watch[cfg.label] = "b" if working["a"] == 0 and working["b"] > 0 else "a"
    other = {label: "b" if w == "a" else "a" for label, w in watch.items()}
    print(f"  the other LB changes; the watched VIP's established connections "
          f"(watched: {', '.join(f'{k} {v}' for k, v in watch.items())}):")
    spare_used = {}

    def add(cfg: RealConfig) -> None:
        o = other[cfg.label]
        cfg.members[o] = cfg.members[o] + [f"{cfg.spare.ip}:{ECHO_PORT}"]
        spare_used[cfg.label] = True
        change(cfg, o)

    def remove(cfg: RealConfig) -> None:
        # The shared backend the watched VIP's connections use most.
        o, w = other[cfg.label], watch[cfg.label]
        use = [c["backend"] for c in runs[(cfg.label, w)].conns().values()
               if c["backend"] and not c["error"]]
        vm = max(cfg.backends, key=lambda v: use.count(v.name))
        cfg.members[o] = [m for m in cfg.members[o] if m != f"{vm.ip}:{ECHO_PORT}"]
        change(cfg, o)

    def delete(cfg: RealConfig) -> None:
        o = other[cfg.label]
        sb.nbctl("lb-del", cfg.lb(o))
        if cfg.stateless:
            gid = cfg.gids[o]
            for gw in ("gw1", "gw2"):
                wait_until(lambda g=gw: gid not in our_groups(sb.chassis[g]), 20, 0.05,
                           f"group {gid:#x} gone from {gw}")
        sb.wait_flows_installed()

    def change(cfg: RealConfig, which: str) -> None:
        vip = f"{cfg.vips[which]}:7"
        if cfg.stateless:
            set_backends(sb, topo, cfg.lb(which), vip, cfg.members[which])
        else:
            sb.nbctl("set", "load_balancer", cfg.lb(which),
                     f'vips:"{vip}"="{",".join(cfg.members[which])}"')
        sb.wait_flows_installed()

    def fresh(cfgs: list[RealConfig], which: dict[str, str], title: str) -> list[str]:
        """New echo connections to each configuration's changed VIP: "working/n"."""
        tag = len(fresh_sports)
        new = {}
        for cfg in cfgs:
            base = cfg.sports[which[cfg.label]].stop + 20 * tag
            sports = range(base, base + min(n, 20))
            fresh_sports.append(sports)
            new[cfg.label] = lab.echo_client(f"fresh{cfg.index}{tag}",
                                             cfg.vips[which[cfg.label]], 7, sports,
                                             duration=ECHO_TIMEOUT + 3, timeout=ECHO_TIMEOUT)
        cells = []
        for cfg in cfgs:
            conns = new[cfg.label].wait_established(timeout=ECHO_TIMEOUT + 10)
            new[cfg.label].finish()
            ok = sum(1 for c in conns.values() if c["ok"] >= 3 and not c["error"])
            cells.append(f"{ok}/{len(conns)}")
        return cells

    fresh_sports: list[range] = []
    steps = [("add a backend", add), ("remove the most used shared backend", remove),
             ("delete the LB", delete)]
    print(f"  {'':34}" + "".join(f"{c.label:>24}" for c in cfgs))
    dead: dict[str, set[int]] = {cfg.label: set() for cfg in cfgs}
    for cfg in cfgs:
        dead[cfg.label] = {s for s, c in first[(cfg.label, watch[cfg.label])].items()
                           if c["error"]}
    for title, step in steps:
        before_sniff = sniff.counts()
        for cfg in cfgs:
            step(cfg)
        # A connection whose echo does not come back within ECHO_TIMEOUT fails.
        time.sleep(ECHO_TIMEOUT + 1.5)
        after_sniff = sniff.counts()
        cells, wrong = [], []
        for cfg in cfgs:
            now = runs[(cfg.label, watch[cfg.label])].conns()
            alive = [s for s in now if s not in dead[cfg.label]]
            broke = {s for s in alive if now[s]["error"]}
            dead[cfg.label] |= broke
            cells.append(f"{len(broke)}/{len(alive)} broke")
            delta = {k: v - before_sniff.get(k, 0) for k, v in after_sniff.items()}
            _, bad, _ = wrong_sources(delta, cfg.vips[watch[cfg.label]],
                                      cfg.sports[watch[cfg.label]])
            wrong.append(bad)
        print(f"  {title:34}" + "".join(f"{c:>24}" for c in cells))
        print(f"  {'  replies from elsewhere meanwhile':34}" + "".join(f"{c:>24}" for c in wrong))
        if step is not delete:
            print(f"  {'  new conns to the changed VIP':34}"
                  + "".join(f"{c:>24}" for c in fresh(cfgs, other, title)))
    for run in runs.values():
        run.finish()
    sniff.finish()


def run_injected(args) -> None:
    with running_sandbox(vms=4) as (sb, topo):
        dgp2 = add_second_dgp(sb, topo)
        b = Bench(sb, topo, dgp2, args.conns, layers=LAYERS)
        b.create_lbs()
        print(f"part 1, injected packets: 2 gateways (lr0-public on gw1, lr0-public2 on "
              f"gw2), 2 hypervisors, backends vm1-vm3 (+vm4 when added); {args.conns} "
              f"connections per LB per change")
        for name, ports in dnat_residency(b).items():
            print(f"  {name}: lr_in_dnat flows for {', '.join(ports) or 'no DGP'}")
        print("  statelesslb: gw1's group hashes "
              + group_fields(sb, "lb-statelesslb", f"{b.vip['statelesslb']}:80"))
        run_cost(b, args.cost)
        # Draining is statelesslb's own (no native equivalent): skipped here.
        run_changes(b, skip=("drain a backend",))


def run_real(args) -> None:
    ok, why = netns_available()
    if not ok:
        print(f"\npart 2, real TCP: cannot run here: {why}")
        return
    run_dir = Path(tempfile.mkdtemp(prefix="slb-bench-", dir="/tmp"))
    sb = real_sandbox(run_dir, gateways=2, hypervisors=2)
    try:
        t0 = time.monotonic()
        sb.up()
        topo, lab = build_real_topology(sb, vms=4 * len(REAL))
        add_second_dgp(sb, topo)
        sandbox_agents.start_agents(sb, debug=False)
        sandbox_agents.wait_agents_ready(sb)
        lab.start_http_servers()
        lab.start_echo_servers()
        cfgs = [RealConfig(label, options, i, topo.vms[4 * i:4 * i + 3], topo.vms[4 * i + 3])
                for i, (label, options) in enumerate(REAL)]
        print(f"\npart 2, real TCP (netns mode; sandbox ready in "
              f"{time.monotonic() - t0:.0f} s): the same two DGPs; backends "
              + "; ".join(f"{c.label} {','.join(v.name for v in c.backends)} (+{c.spare.name})"
                          for c in cfgs), flush=True)
        print_load(real_load(sb, topo, lab, cfgs, args), args)
        two_vips(sb, topo, lab, cfgs, args.echo_conns)
    finally:
        sb.down()
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=100,
                    help="part 1: connections per LB per change")
    ap.add_argument("--cost", type=int, default=1000,
                    help="part 1: connections for the gateway cost")
    ap.add_argument("--clients", type=int, default=8, help="part 2: client threads")
    ap.add_argument("--duration", type=float, default=10.0,
                    help="part 2: seconds per load phase")
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument("--echo-conns", type=int, default=20,
                    help="part 2: echo connections per VIP (at most 40)")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"which parts to run, comma-separated ({', '.join(PARTS)})")
    args = ap.parse_args()
    parts = args.parts.split(",")
    if not set(parts) <= set(PARTS) or not parts:
        ap.error(f"--parts: some of {', '.join(PARTS)}")
    if not 1 <= args.clients <= 64 or not 1 <= args.duration <= 120:
        ap.error("--clients must be 1..64 and --duration 1..120")
    if not 1 <= args.echo_conns <= 40:
        ap.error("--echo-conns must be 1..40")
    t0 = time.monotonic()
    version = subprocess.run(["ovn-northd", "--version"], capture_output=True,
                             text=True).stdout.splitlines()[0]
    print(f"{version}; load average at start {os.getloadavg()[0]:.2f} "
          f"({os.cpu_count()} CPUs)")
    if "injected" in parts:
        run_injected(args)
    if "real" in parts:
        run_real(args)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; total "
          f"{time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
