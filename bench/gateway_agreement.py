"""Issue 4: every gateway picks the same backend for a flow, and predict.py says which.

Real sandbox, two DGPs of lr0 on gw1 and gw2, agents installing one stateless LB
with 8 backends. For N random client tuples, `ofproto/trace` on gw1 (entering
through lr0-public) and on gw2 (through lr0-public2) reports the chosen bucket;
the script prints how often the gateways agree with each other and with
`statelesslb.predict`, and how many tuples move when one backend is removed.

    .venv/bin/python bench/gateway_agreement.py [--tuples 10000]
"""

from __future__ import annotations

import argparse
import random
import time

import ovs.unixctl.client
from common import running_sandbox

from statelesslb.observe.predict import FlowTuple, predict_bucket
from statelesslb.observe.trace import parse_trace
from statelesslb.sandbox import Sandbox
from statelesslb.sandbox import agents as sandbox_agents
from statelesslb.sandbox.processes import wait_until
from statelesslb.sandbox.topology import add_second_dgp
from statelesslb.sandbox.traffic import (
    create_lb,
    installed_fields,
    lb_ids,
    our_groups,
    wait_lb_ready,
)

VIP = "172.16.0.100"


class Tracer:
    def __init__(self, ctl: str):
        err, self.client = ovs.unixctl.client.UnixctlClient.create(ctl)
        if err:
            raise SystemExit(f"cannot reach {ctl}")

    def bucket(self, flow: str, table: int) -> int | None:
        # OVS 3.1's ofproto/trace takes no table=: start there with a packet-out.
        err, error, result = self.client.transact(
            "ofproto/trace-packet-out", ["br-int", flow, f"resubmit(,{table})"])
        if err or error:
            raise RuntimeError(f"trace failed: {err} {error}")
        return parse_trace(result)["bucket_id"]


def sb_table(sb: Sandbox) -> int:
    """The router intercept table the gw1 agent derived (lr_in_defrag)."""
    import json
    status = json.loads(sandbox_agents.agent_ctl(sb, "gw1", "status"))
    return status["layout"]["lr_in_intercept"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tuples", type=int, default=10000)
    args = ap.parse_args()
    with running_sandbox(vms=8) as (sb, topo):
        dgp2 = add_second_dgp(sb, topo)
        backends = [f"{vm.ip}:8080" for vm in topo.vms]
        create_lb(sb, "lb1", f"{VIP}:80", backends)
        gid = wait_lb_ready(sb, "lb1", f"{VIP}:80", 8)
        wait_lb_ready(sb, "lb1", f"{VIP}:80", 8, gateway="gw2")
        router = topo.dp_key("lr0")
        keys = {"gw1": topo.port_key(topo.dgp), "gw2": topo.port_key(dgp2.name)}
        tracers = {gw: Tracer(sb.chassis[gw].vswitchd_ctl) for gw in keys}
        table = sb_table(sb)
        rng = random.Random(7)
        tuples = []
        for _ in range(args.tuples):
            src = f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}." \
                  f"{rng.randint(1, 254)}"
            tuples.append((src, rng.randint(1024, 65535)))

        def trace_all(gw):
            out = []
            for src, sport in tuples:
                out.append(tracers[gw].bucket(
                    f"tcp,metadata={router:#x},reg14={keys[gw]:#x},"
                    f"nw_src={src},nw_dst={VIP},tp_src={sport},tp_dst=80,nw_ttl=64", table))
            return out

        _, ids = lb_ids(sb, "lb1")
        start = time.monotonic()
        on = {gw: trace_all(gw) for gw in keys}
        elapsed = time.monotonic() - start
        fields = installed_fields(sb.chassis["gw1"], gid)
        predicted = [predict_bucket(ids.values(), 100, fields,
                                    FlowTuple.make(src, VIP, "tcp", sport, 80))
                     for src, sport in tuples]
        n = len(tuples)
        same = sum(a == b for a, b in zip(on["gw1"], on["gw2"], strict=True))
        pred = sum(a == p for a, p in zip(on["gw1"], predicted, strict=True))
        print(f"{n} random TCP tuples to {VIP}:80, 8 backends, traced on two gateways "
              f"({2 * n / elapsed:.0f} traces/s):")
        print(f"  gw1 and gw2 choose the same bucket: {same}/{n} ({100.0 * same / n:.2f}%)")
        print(f"  statelesslb.predict agrees with gw1: {pred}/{n} ({100.0 * pred / n:.2f}%)")
        share = {bid: on["gw1"].count(bid) / n for bid in sorted(set(on["gw1"]))}
        print("  share per bucket: " + ", ".join(f"{b}:{s:.3f}" for b, s in share.items()))

        # Remove one backend; only its own tuples may move.
        victim = backends[4]
        sb.nbctl("set", "load_balancer", "lb1",
                 f'vips:"{VIP}:80"="{",".join(b for b in backends if b != victim)}"')
        wait_until(lambda: ids[victim] not in our_groups(sb.chassis["gw1"])[gid].buckets,
                   10, 0.02, "the removal on gw1")
        after = trace_all("gw1")
        moved = sum(a != b for a, b in zip(on["gw1"], after, strict=True))
        needed = sum(a == ids[victim] for a in on["gw1"])
        collateral = sum(a != b and a != ids[victim]
                         for a, b in zip(on["gw1"], after, strict=True))
        print(f"  removing 1 of 8 backends moved {moved}/{n} tuples "
              f"({100.0 * moved / n:.2f}%); {needed} were on it; collateral {collateral}")


if __name__ == "__main__":
    main()
