"""Per-connection cost of a gateway: real HTTP load through OVN's native LB and the
stateless LB with several hash classes, side by side in one run.

Runs a real sandbox in netns mode (2 gateways, 2 hypervisors, --vms VM namespaces serving
`python3 -m http.server`, a client namespace on the external segment) with agents, then
one LB per configuration over the same backends, one after the other:

- native:     OVN's own LB (conntrack on the gateway), VIP 172.16.0.110:80;
- stateless:  options:stateless_mode=mac with options:stateless_hash=<each --hash>,
              VIPs 172.16.0.100, .101, ... (persistence --persistence), once per
              --return: `gateway` (replies back through the gateway holding the DGP, as
              OVN's own) and/or `direct` (options:stateless_return=direct: replies leave
              the backend's chassis; the hypervisors are then on the external segment
              too, with chassis MACs, for every configuration).

Each configuration's clients come from their own range of --client-addrs addresses
(172.16.<n>.0/24 routed to the client namespace: many clients, as on the internet; own
ranges so no configuration meets another's conntrack entries). Each runs twice in a row:
"cold" right after the LB is set up, then "warm" (the gateway's datapath flows of the cold
phase are still there, but at a modest rate part of the hash classes have not been hit
yet), then with --phases 3 "steady" (nearly every class hit: what a busy gateway pays for
ever). Printed per phase: requests/s,
latency, gateway datapath flows for the VIP, gateway upcalls (`dpctl/show` "missed"), the
gateway's and the backends' ovs-vswitchd CPU per 1,000 connections, balance (busiest
backend's requests / mean over all backends), and ratios to native.

    sudo .venv/bin/python bench/real_tcp.py [--vms 16] [--clients 8] [--duration 10]
        [--hash 5-tuple --hash client-bits:8,port-bits:5] [--return gateway --return direct]

Bounded: --duration is at most 120 s per phase and each client stops after
--max-requests in all. Only the namespaces' addresses are used; everything is removed at
the end (--keep keeps the run directory's logs).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import per_1000, run_load

from statelesslb.nb.hashing import DEFAULT_HASH, HashOptionError, parse_hash
from statelesslb.observe.predict import FlowTuple, predict_bucket
from statelesslb.plan.specs import BUCKET_WEIGHT
from statelesslb.sandbox import agents as sandbox_agents
from statelesslb.sandbox import netns as N
from statelesslb.sandbox.traffic import lb_ids, wait_lb_ready

NATIVE_VIP = "172.16.0.110"


def phase_names(count: int) -> list[str]:
    """cold, warm, then "steady" for every later phase: by then the clients have hit
    nearly every hash class at least once (8,192 by default; two phases of ~10,000
    connections leave e^-2.4 of them unseen), so what is left per connection is what a
    busy gateway pays for ever."""
    return ["cold", "warm", *(["steady"] if count == 3 else
                              [f"steady{i}" for i in range(1, count - 1)])][:count]


def class_balance(bucket_ids: dict[str, int], vip: str, sources: str,
                  hash_text: str) -> float | None:
    """Busiest backend's share of the hash classes the clients fall in, over the mean
    (statelesslb.predict; every class equally busy): the balance the hash itself gives,
    without the sampling noise of a few thousand requests. None for the 5-tuple."""
    hashing = parse_hash({"stateless_hash": hash_text})
    if not hashing.bounded or not sources:
        return None
    fields = hashing.fields(4, "tcp")
    ids = sorted(bucket_ids.values())
    counts = dict.fromkeys(ids, 0)
    for src in ipaddress.ip_network(sources):
        for sport in range(0, 2 << hashing.port_bits, 2):
            pkt = FlowTuple(4, src, vip, 6, sport, 80)   # only bits 1..port_bits count
            counts[predict_bucket(ids, BUCKET_WEIGHT, fields, pkt)] += 1
    return round(max(counts.values()) / statistics.mean(counts.values()), 3)


def balance(counts: dict[str, int], backends: int) -> float | None:
    values = [counts.get(f"vm{i}", 0) for i in range(1, backends + 1)]
    mean = statistics.mean(values)
    return round(max(values) / mean, 3) if mean else None


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def row(label: str, values: list) -> str:
    return f"{label:<40}" + "".join(f"{str(v):>28}" for v in values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=16, help="backends (VM namespaces)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    ap.add_argument("--client-addrs", type=int, default=256,
                    help="client addresses per configuration (1: the client's own)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    ap.add_argument("--phases", type=int, default=2,
                    help="phases per configuration, one after the other: cold, warm, "
                    "then steady (1..4)")
    ap.add_argument("--idle", type=float, default=0.0,
                    help="after each phase, measure gw1's ovs-vswitchd CPU for this many "
                    "seconds with no load (its datapath flows still there) and print the "
                    "CPU per connection above that idle rate too (0: not measured)")
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument("--hash", action="append", dest="hashes",
                    help="an options:stateless_hash value to measure (repeat; default: "
                    f"5-tuple and the default {DEFAULT_HASH.text})")
    ap.add_argument("--max-idle", type=int, default=None,
                    help="set the gateways' other_config:max-idle (ms; OVS default 10000): "
                    "how long an unused datapath flow lives")
    ap.add_argument("--return", action="append", dest="returns", choices=("gateway", "direct"),
                    help="options:stateless_return values to measure for each --hash "
                    "(repeat; default: gateway)")
    ap.add_argument("--persistence", default="second-chance",
                    help="the stateless LBs' options:stateless_persistence")
    ap.add_argument("--show-flows", action="store_true",
                    help="print a few of the gateway's datapath flows for each VIP")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    ap.add_argument("--keep", action="store_true", help="keep the run directory")
    args = ap.parse_args()
    hashes = args.hashes or ["5-tuple", DEFAULT_HASH.text]
    returns = list(dict.fromkeys(args.returns or ["gateway"]))
    if not 1 <= args.clients <= 64 or not 1 <= args.duration <= 120:
        ap.error("--clients must be 1..64 and --duration 1..120")
    if not 1 <= args.phases <= 4:
        ap.error("--phases must be 1..4")
    phases = phase_names(args.phases)
    if not 1 <= args.vms <= 32 or args.client_addrs not in (1, 16, 64, 256):
        ap.error("--vms must be 1..32 and --client-addrs 1, 16, 64 or 256")
    if len(hashes) * len(returns) > 8:
        ap.error("at most 8 stateless configurations (--hash values x --return values)")
    for text in hashes:
        try:
            parse_hash({"stateless_hash": text})
        except HashOptionError as exc:
            ap.error(str(exc))
    ok, why = N.netns_available()
    if not ok:
        print(f"cannot run: {why}", file=sys.stderr)
        return 1

    # label -> (LB name, VIP, stateless_hash or None for native, stateless_return)
    configs = {"native": ("bench-native", NATIVE_VIP, None, "gateway")}
    for text in hashes:
        for way in returns:
            i = len(configs) - 1
            label = f"hash {text}" + (" direct" if way == "direct" else "")
            configs[label] = (f"bench-h{i}", f"172.16.0.{100 + i}", text, way)
    prefix = 32 - (args.client_addrs - 1).bit_length()
    sources = {label: ("" if args.client_addrs == 1 else f"172.16.{n}.0/{prefix}")
               for n, label in enumerate(configs, start=1)}

    run_dir = Path(tempfile.mkdtemp(prefix="slb-bench-", dir="/tmp"))
    sb = N.real_sandbox(run_dir, gateways=2, hypervisors=2,
                        external_hypervisors="direct" in returns)
    results: dict[str, dict[str, dict]] = {}
    try:
        t0 = time.monotonic()
        sb.up()
        topo, lab = N.build_real_topology(sb, vms=args.vms)
        if args.max_idle is not None:
            for gw in sb.gateway_chassis:
                gw.vsctl("set", "Open_vSwitch", ".", f"other_config:max-idle={args.max_idle}")
        sandbox_agents.start_agents(sb, debug=False)
        sandbox_agents.wait_agents_ready(sb)
        lab.start_http_servers()
        for cidr in filter(None, sources.values()):
            lab.add_client_sources(topo, cidr)
        backends = ",".join(f"{vm.ip}:8080" for vm in topo.vms)
        for name, vip, hash_text, way in configs.values():
            cmd = ["lb-add", name, f"{vip}:80", backends, "tcp"]
            if hash_text is not None:
                cmd += ["--", "set", "load_balancer", name, "options:stateless_mode=mac",
                        f"options:stateless_persistence={args.persistence}",
                        f"options:stateless_hash=\"{hash_text}\"",
                        f"options:stateless_return={way}"]
            sb.nbctl(*cmd)
            sb.nbctl("lr-lb-add", topo.router, name)
        expected_balance = {}
        for label, (name, vip, hash_text, _way) in configs.items():
            if hash_text is not None:
                wait_lb_ready(sb, name, f"{vip}:80", args.vms, topo=topo)
                expected_balance[label] = class_balance(lb_ids(sb, name)[1], vip,
                                                        sources[label], hash_text)
        sb.wait_flows_installed()
        for _, vip, _, _ in configs.values():
            rc, body = lab.curl(f"http://{vip}/who")
            if rc != 0:
                raise SystemExit(f"warm-up request to {vip} failed (curl exit {rc})")
        print(f"sandbox ready in {time.monotonic() - t0:.1f}s; {args.clients} clients x "
              f"{args.duration:g}s per phase, {args.client_addrs} client addresses per "
              f"configuration, {args.vms} backends, one GET per TCP connection",
              file=sys.stderr)
        # Let the warm-up's datapath flows expire: "cold" starts cold.
        time.sleep((args.max_idle or 10_000) / 1000 + 1)
        for label, (_name, vip, _hash, _way) in configs.items():
            results[label] = {}
            for phase in phases:
                results[label][phase] = run_load(
                    sb, lab, f"{label}-{phase}".replace(" ", "_").replace(",", "_").replace(
                        ":", ""), vip, sources[label], clients=args.clients,
                    duration=args.duration, max_requests=args.max_requests,
                    idle=args.idle)
                print(f"  {label} {phase}: {results[label][phase]['rps']} req/s",
                      file=sys.stderr)
    finally:
        sb.down()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)

    report(results, expected_balance, phases, args)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def report(results: dict[str, dict[str, dict]], expected_balance: dict[str, float | None],
           phases: list[str], args) -> None:
    labels = list(results)
    native = results["native"]
    for phase in phases:
        res = {k: results[k][phase] for k in labels}
        print(f"\n{phase} phase ({args.duration:g} s each)")
        print(row("", labels))
        print(row("completed requests", [res[k]["ok"] for k in labels]))
        print(row("errors", [res[k]["errors"] for k in labels]))
        print(row("requests/s", [res[k]["rps"] for k in labels]))
        for p in ("p50", "p99"):
            print(row(f"latency {p} (ms)", [res[k]["latency_ms"][p] for k in labels]))
        print(row("gw1 datapath flows for the VIP", [res[k]["vip_dp_flows_gw1"]
                                                     for k in labels]))
        print(row("gw1 datapath flows for replies", [res[k]["reply_dp_flows_gw1"]
                                                     for k in labels]))
        print(row("gw1 upcalls", [res[k]["upcalls_gw1"] for k in labels]))
        print(row("gw1 upcalls per connection",
                  [round(res[k]["upcalls_gw1"] / max(res[k]["ok"], 1), 3) for k in labels]))
        gw = {k: per_1000(res[k]["vswitchd_cpu_s"].get("gw1"), res[k]["ok"]) for k in labels}
        hv = {k: per_1000(res[k]["vswitchd_cpu_s"].get("hv1", 0)
                          + res[k]["vswitchd_cpu_s"].get("hv2", 0), res[k]["ok"])
              for k in labels}
        print(row("gw1 vswitchd CPU ms / 1,000 conns", [gw[k] for k in labels]))
        wakeups = {k: res[k]["gw1_threads_s"].get("main wakeups") for k in labels}
        print(row("gw1 main loop wake-ups per connection", [
            None if wakeups[k] is None else round(wakeups[k] / max(res[k]["ok"], 1), 2)
            for k in labels]))
        print(row("gw1 main loop CPU µs per wake-up", [
            None if not wakeups[k] else round(
                (res[k]["gw1_threads_s"].get("main user", 0.0)
                 + res[k]["gw1_threads_s"].get("main system", 0.0)) * 1e6 / wakeups[k], 1)
            for k in labels]))
        kinds = sorted(t for t in {t for k in labels for t in res[k]["gw1_threads_s"]}
                       if t != "main wakeups")
        for kind in kinds:
            print(row(f"  of which {kind}", [per_1000(res[k]["gw1_threads_s"].get(kind, 0.0),
                                                      res[k]["ok"]) for k in labels]))
        if args.idle:
            idle = {k: res[k].get("gw1_idle_cpu_per_s") for k in labels}
            print(row("gw1 vswitchd CPU ms/s idle after it", [
                None if idle[k] is None else round(idle[k] * 1000, 1) for k in labels]))
            above = {k: None if gw[k] is None or idle[k] is None else round(
                gw[k] - idle[k] * res[k]["wall_s"] * 1e6 / max(res[k]["ok"], 1), 1)
                for k in labels}
            print(row("gw1 CPU ms / 1,000 conns above idle", [above[k] for k in labels]))
            print(row("  vs native", [ratio(above[k], above["native"]) for k in labels]))
        for key in ("packets received", "avg. datapath passes per packet",
                    "avg. subtable lookups per megaflow hit",
                    "avg. packets per output batch"):
            print(row(f"gw1 dp: {key}", [res[k]["pmd_gw1"].get(key) for k in labels]))
        print(row("hv1+hv2 vswitchd CPU ms / 1,000 conns", [hv[k] for k in labels]))
        print(row("hv1+hv2 upcalls per connection",
                  [round(res[k]["upcalls_hv"] / max(res[k]["ok"], 1), 3) for k in labels]))
        print(row("balance (busiest / mean)", [balance(res[k]["backends"], args.vms)
                                               for k in labels]))
        print(row("balance of the hash classes (predict)",
                  [expected_balance.get(k) for k in labels]))
        print(row("conntrack entries on gw1", [res[k]["conntrack_gw1"] for k in labels]))
        print(row("conntrack entries on backends' hv", [res[k]["conntrack_backends"]
                                                        for k in labels]))
        print(row("gw1 CPU per conn vs native", [ratio(gw[k], gw["native"])
                                                 for k in labels]))
        print(row("requests/s vs native", [ratio(res[k]["rps"], native[phase]["rps"])
                                           for k in labels]))
        print(row("p99 vs native", [ratio(res[k]["latency_ms"]["p99"],
                                          native[phase]["latency_ms"]["p99"])
                                    for k in labels]))
        if args.show_flows:
            for k in labels:
                print(f"{k}: some of gw1's datapath flows for the VIP:")
                for line in res[k]["vip_dp_flow_samples"]:
                    print(f"    {line}")
        for k in labels:
            if res[k]["error_kinds"]:
                print(f"{k} errors: {res[k]['error_kinds']}")


if __name__ == "__main__":
    sys.exit(main())
