"""Issue 5 figures: real HTTP load through the stateless LB and OVN's native LB.

Runs a real sandbox in netns mode (2 gateways, 2 hypervisors, 3 VM namespaces serving
`python3 -m http.server`, a client namespace on the external segment) with agents, then
for each of two LBs with the same three backends, one after the other (native first):

- stateless: VIP 172.16.0.100:80, options:stateless_mode=mac (persistence --persistence);
- native:    VIP 172.16.0.110:80, OVN's own LB (conntrack on the gateway);

runs --clients concurrent HTTP clients in the client namespace for --duration seconds
(one GET per new TCP connection) and prints completed requests, errors, requests/s,
latency, the spread over backends, the conntrack entries left on the active gateway and
on the backends' chassis, and the CPU seconds each ovs-vswitchd used.

    sudo .venv/bin/python bench/real_tcp.py [--clients 8] [--duration 10]

Bounded: --duration is at most 120 s and each client stops after --max-requests in all.
Only the namespaces' addresses are used; everything is removed at the end (--keep keeps
the run directory's logs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_seconds

from statelesslb.sandbox import agents as sandbox_agents
from statelesslb.sandbox import netns as N
from statelesslb.sandbox.core import Sandbox, wait_until
from statelesslb.sandbox.traffic import conntrack_lines, wait_lb_ready

LBS = {
    "stateless": ("bench-stateless", "172.16.0.100"),
    "native": ("bench-native", "172.16.0.110"),
}
# Native first by default: the stateless LB's TIME_WAIT entries on the backends' chassis
# would un-DNAT replies of later native connections that reuse a client port towards the
# same backend (docs/real-tcp.md, "shared backends"); the native LB leaves nothing there.


def vswitchd_cpu(sb: Sandbox) -> dict[str, float]:
    out = {}
    for name in [*sb.chassis, "net"]:
        rec = sb.processes.get(f"{name}/ovs-vswitchd")
        if rec is not None and rec.alive():
            out[name] = cpu_seconds(rec.pid)
    return out


def run_load(sb: Sandbox, lab: N.NetnsLab, label: str, vip: str, args) -> dict:
    out = lab.dir / f"load-{label}.json"
    out.unlink(missing_ok=True)
    cpu0 = vswitchd_cpu(sb)
    lab.start("client", f"load-{label}",
              [N.python3(), "-u", N.TCPAPPS, "load", "--vip", vip, "--port", "80",
               "--path", "/who", "--clients", str(args.clients),
               "--duration", str(args.duration), "--timeout", "5",
               "--max-requests", str(args.max_requests), "--out", str(out)])
    name = lab.process_name("client", f"load-{label}")
    wait_until(lambda: not sb.is_running(name), args.duration + 30, 0.1,
               f"load run {label} to finish")
    cpu1 = vswitchd_cpu(sb)
    result = json.loads(out.read_text())
    result["vswitchd_cpu_s"] = {k: round(cpu1[k] - cpu0.get(k, 0.0), 2) for k in cpu1}
    active = sb.chassis["gw1"]
    result["conntrack_gw1"] = len(conntrack_lines(active, f"dst={vip},"))
    result["conntrack_backends"] = sum(
        len(conntrack_lines(c, f"dst={vip},")) for c in sb.hypervisor_chassis)
    return result


def row(label: str, values: list) -> str:
    return f"{label:<34}" + "".join(f"{str(v):>30}" for v in values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument("--persistence", default="second-chance",
                    help="the stateless LB's options:stateless_persistence")
    ap.add_argument("--stateless-first", action="store_true",
                    help="run the stateless LB first: shows the stale-entry interaction "
                    "of docs/real-tcp.md (native connections then time out)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    ap.add_argument("--keep", action="store_true", help="keep the run directory")
    args = ap.parse_args()
    if not 1 <= args.clients <= 64 or not 1 <= args.duration <= 120:
        ap.error("--clients must be 1..64 and --duration 1..120")
    ok, why = N.netns_available()
    if not ok:
        print(f"cannot run: {why}", file=sys.stderr)
        return 1

    run_dir = Path(tempfile.mkdtemp(prefix="slb-bench-", dir="/tmp"))
    sb = N.real_sandbox(run_dir, gateways=2, hypervisors=2)
    try:
        t0 = time.monotonic()
        sb.up()
        topo, lab = N.build_real_topology(sb, vms=3)
        sandbox_agents.start_agents(sb, debug=False)
        sandbox_agents.wait_agents_ready(sb)
        lab.start_http_servers()
        backends = ",".join(f"{vm.ip}:8080" for vm in topo.vms)
        for kind, (name, vip) in LBS.items():
            cmd = ["lb-add", name, f"{vip}:80", backends, "tcp"]
            if kind == "stateless":
                cmd += ["--", "set", "load_balancer", name, "options:stateless_mode=mac",
                        f"options:stateless_persistence={args.persistence}"]
            sb.nbctl(*cmd)
            sb.nbctl("lr-lb-add", topo.router, name)
        wait_lb_ready(sb, LBS["stateless"][0], f"{LBS['stateless'][1]}:80", 3, topo=topo)
        sb.wait_flows_installed()
        for _, vip in LBS.values():
            rc, body = lab.curl(f"http://{vip}/who")
            if rc != 0:
                raise SystemExit(f"warm-up request to {vip} failed (curl exit {rc})")
        print(f"sandbox ready in {time.monotonic() - t0:.1f}s; {args.clients} clients x "
              f"{args.duration:g}s per LB, one GET per TCP connection", file=sys.stderr)
        order = list(LBS) if args.stateless_first else list(LBS)[::-1]
        results = {kind: run_load(sb, lab, kind, LBS[kind][1], args) for kind in order}
    finally:
        sb.down()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)

    kinds = list(results)
    print()
    print(row("", kinds))
    print(row("completed requests", [results[k]["ok"] for k in kinds]))
    print(row("errors", [results[k]["errors"] for k in kinds]))
    print(row("requests/s", [results[k]["rps"] for k in kinds]))
    for p in ("p50", "p90", "p99", "max"):
        print(row(f"latency {p} (ms)", [results[k]["latency_ms"][p] for k in kinds]))
    print(row("per backend", [" ".join(f"{b}:{n}" for b, n in sorted(
        results[k]["backends"].items())) for k in kinds]))
    print(row("conntrack entries on gw1", [results[k]["conntrack_gw1"] for k in kinds]))
    print(row("conntrack entries on backends' hv", [results[k]["conntrack_backends"]
                                                    for k in kinds]))
    for name in ("gw1", "hv1", "hv2", "net"):
        print(row(f"ovs-vswitchd CPU s ({name})",
                  [results[k]["vswitchd_cpu_s"].get(name) for k in kinds]))
    for k in kinds:
        if results[k]["error_kinds"]:
            print(f"{k} errors: {results[k]['error_kinds']}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
