"""Issue 15: NB and SB as 3-member RAFT clusters, with churn running (bench/churn.py's
rate): SIGKILL the NB leader, then the SB leader, then the agent holding the NB writer
lock, and print what each costs.

Per kill: the time to a new leader (or writer), and to convergence: the first moment a
change committed after the kill shows in the tracked gateway's group and so does every
change committed before it (or a later change of its LB). Afterwards: changes lost,
gateways' groups against the NB, bucket / VIP ids against the first ones, and the NB
writer lock's holders (from the agents' logs, written by the IDL thread as the server
grants the lock or the session loses it).

    .venv/bin/python bench/cluster_failover.py [--lbs 50] [--rate 5] [--warmup 5] [--rounds 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import pct, running_sandbox

from statelesslb.sandbox.failover import FailoverRun


def _s(value) -> str:
    return "-" if value is None else f"{value:.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lbs", type=int, default=50)
    ap.add_argument("--rate", type=float, default=5.0, help="changes a second (churn.py's)")
    ap.add_argument("--warmup", type=float, default=5.0, help="churn seconds before a kill")
    ap.add_argument("--rounds", type=int, default=1, help="times to run the three kills")
    args = ap.parse_args()
    with running_sandbox(vms=8, clustered=True) as (sb, topo):
        backends = [f"{vm.ip}:8080" for vm in topo.vms]
        macs = {f"{vm.ip}:8080": vm.mac for vm in topo.vms}
        print(f"clustered sandbox: NB {sb.nb}\n                   SB {sb.sb}")
        with FailoverRun(sb, backends, macs, lbs=args.lbs, rate=args.rate) as run:
            print(f"{args.lbs} LBs x {len(backends)} backends; churn {args.rate}/s "
                  f"(each change swaps one backend of one LB; the first backend stays); watching "
                  f"{run.tracker.gateway.name}")
            for rnd in range(args.rounds):
                for db in ("nb", "sb"):
                    time.sleep(args.warmup)
                    r = run.kill_db_leader(db)
                    print(f"[{rnd + 1}] kill -9 {db.upper()} leader {r['killed']}: new leader "
                          f"{r['new_leader']} after {_s(r['elected'])}; converged after "
                          f"{_s(r['converged'])} (worst change latency around the kill "
                          f"{_s(r['worst_latency'])}); killed member rejoined in "
                          f"{_s(r.get('rejoined'))}")
                time.sleep(args.warmup)
                r = run.kill_writer_agent()
                print(f"[{rnd + 1}] kill -9 writer agent {r['killed']}: {r['new_writer']} "
                      f"holds the lock after {r['no_writer'] * 1000:.0f} ms (no writer "
                      f"meanwhile); converged after {_s(r['converged'])} (worst change "
                      f"latency {_s(r['worst_latency'])}); ids changed: "
                      f"{len(r['ids_changed'])} {r['ids_changed'][:3]}; agent running again "
                      f"{_s(r.get('restarted'))} after the kill")
            time.sleep(args.warmup)
            res = run.finish()
        ms = [v * 1000 for v in res["latencies"]]
        print(f"{res['changes']} changes committed ({res['retried']} ovn-nbctl attempts "
              f"refused and retried); {res['seen']} seen on the gateway, "
              f"{res['superseded']} superseded before seen, {len(res['never_seen'])} never "
              f"seen {res['never_seen'][:3]}")
        if ms:
            print(f"change latency (commit to gateway group, whole run): p50 "
                  f"{statistics.median(ms):.0f} ms, p99 {pct(ms, 0.99):.0f} ms, max "
                  f"{max(ms):.0f} ms")
        print(f"NB after the churn: {len(res['nb_problems'])} LBs differ from the last "
              f"committed change {res['nb_problems'][:3]}")
        print(f"gateways: {len(res['group_problems'])} groups differ from the NB "
              f"{res['group_problems'][:3]}")
        print(f"VIP ids, and bucket ids of the backend no change touched, against the first "
              f"ones: {res['ids_changed'][:5] or 'all equal'}")
        holders = {n: len(iv) for n, iv in res["lock_intervals"].items() if iv}
        print(f"NB writer lock: intervals held per agent {holders}; overlaps "
              f"{res['lock_overlaps']}; writes outside the lock {res['writes_outside_lock']}")


if __name__ == "__main__":
    main()
