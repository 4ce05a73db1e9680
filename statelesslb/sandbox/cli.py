"""statelesslb-sandbox: start, inspect and stop a real OVN sandbox from the shell.

    eval "$(statelesslb-sandbox up --dir /tmp/slb1 --gateways 2 --hypervisors 2)"
    ovn-nbctl show
    statelesslb-sandbox up --dir /tmp/slb2 --topology --agents   # and an agent per chassis
    statelesslb-sandbox up --dir /tmp/slb3 --clustered   # NB and SB as 3-member RAFT clusters
    statelesslb-ctl --socket /tmp/slb2/gw1/slb.ctl status
    statelesslb-sandbox status --dir /tmp/slb1 [--format json]
    statelesslb-sandbox down --dir /tmp/slb1

Exit codes: 0 success, 1 error, 2 bad usage, 3 (status) not everything runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from statelesslb.sandbox import agents
from statelesslb.sandbox.core import MANIFEST, Sandbox
from statelesslb.sandbox.processes import SandboxError
from statelesslb.sandbox.topology import build_lb_topology

LOG = logging.getLogger("statelesslb.sandbox")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NOT_RUNNING = 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="statelesslb-sandbox",
        description="Run a real multi-chassis OVN (user-space dummy datapath) in a directory.")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logging on stderr (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a sandbox; prints `export OVN_NB_DB=...` lines")
    up.add_argument("--dir", required=True, type=Path, help="run directory (short path)")
    up.add_argument("--gateways", type=int, default=2, metavar="N")
    up.add_argument("--hypervisors", type=int, default=2, metavar="M")
    up.add_argument("--physnet", default="physnet1")
    up.add_argument("--topology", action="store_true",
                    help="also build the standard LB topology (lr0, public, sw0, VMs)")
    up.add_argument("--vms", type=int, default=2, help="VMs in the topology (default 2)")
    up.add_argument("--agents", action="store_true",
                    help="also start a statelesslb-agent on every chassis (listed under "
                    "\"agents\" in sandbox.json, stopped by `down`)")
    up.add_argument("--clustered", action="store_true",
                    help="run NB and SB each as a 3-member RAFT cluster (one ovsdb-server "
                    "and database file per member); OVN_NB_DB / OVN_SB_DB list every member")
    up.add_argument("--external-hypervisors", action="store_true",
                    help="put the hypervisors on the external segment too (a br-ext with "
                    "the physnet's bridge mapping and a chassis MAC each), as direct "
                    "return (options:stateless_return=direct) needs")
    up.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")

    down = sub.add_parser("down", help="stop exactly the processes the sandbox recorded")
    down.add_argument("--dir", required=True, type=Path)

    status = sub.add_parser("status", help="is each process alive, each chassis registered")
    status.add_argument("--dir", required=True, type=Path)
    status.add_argument("--format", choices=("text", "json"), default="text")
    return p


def _up(args: argparse.Namespace) -> int:
    sbx = Sandbox(args.dir, gateways=args.gateways, hypervisors=args.hypervisors,
                  physnet=args.physnet, timeout=args.timeout, clustered=args.clustered,
                  external_hypervisors=args.external_hypervisors)
    sbx.up()
    print(f"export OVN_NB_DB={sbx.nb}")
    print(f"export OVN_SB_DB={sbx.sb}")
    print(f"sandbox up in {sbx.run_dir}: {len(sbx.chassis)} chassis registered in "
          f"{sbx.timings['registered']:.2f}s; manifest {sbx.manifest_path}", file=sys.stderr)
    try:
        if args.topology:
            topo = build_lb_topology(sbx, vms=args.vms, timeout=args.timeout)
            vms = ", ".join(f"{v.name} {v.ip} on {v.chassis}" for v in topo.vms)
            print(f"topology: {topo.cr_port} on {topo.gateways[0]} after "
                  f"{topo.timings['cr_port_bound']:.2f}s; {vms}", file=sys.stderr)
        if args.agents:
            agents.start_agents(sbx, debug=False)
            if args.topology:
                agents.wait_agents_ready(sbx, timeout=args.timeout)
            else:
                # An agent derives OVN's table layout from a router's logical flows.
                print("agents started; they sync once a logical router exists",
                      file=sys.stderr)
            for name, info in sorted(sbx.agents.items()):
                print(f"agent on {name}: pid {info['pid']}, log {info['log']}; "
                      f"statelesslb-ctl --socket {info['ctl']} status", file=sys.stderr)
    except BaseException:
        sbx.down()   # nothing half-started stays behind
        raise
    return EXIT_OK


def _down(args: argparse.Namespace) -> int:
    if not (args.dir / MANIFEST).exists():
        print(f"no sandbox in {args.dir}: nothing to stop", file=sys.stderr)
        return EXIT_OK
    sbx = Sandbox.load(args.dir)
    stopped = sbx.down()
    if stopped:
        print(f"stopped {len(stopped)} processes of {sbx.run_dir}", file=sys.stderr)
    else:
        print(f"nothing runs in {sbx.run_dir}", file=sys.stderr)
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    if not (args.dir / MANIFEST).exists():
        if args.format == "json":
            print(json.dumps({"run_dir": str(args.dir), "running": False, "processes": {},
                              "chassis": {}}))
        print(f"no sandbox in {args.dir}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    st = Sandbox.load(args.dir).status()
    if args.format == "json":
        print(json.dumps(st, indent=2))
    else:
        print(f"sandbox {st['run_dir']}: {'running' if st['running'] else 'NOT running'}")
        print(f"  OVN_NB_DB={st['nb']}\n  OVN_SB_DB={st['sb']}")
        for name, p in st["processes"].items():
            print(f"  {name:<22} pid {p['pid']:<8} {'alive' if p['alive'] else 'dead'}")
        for db, c in st.get("clusters", {}).items():
            print(f"  {db} cluster: leader {c['leader'] or 'none'} of "
                  f"{', '.join(c['members'])}")
        for name, c in st["chassis"].items():
            reg = "registered" if c["registered"] else "NOT registered"
            print(f"  chassis {name:<6} {c['role']:<10} {reg}")
    return EXIT_OK if st["running"] else EXIT_NOT_RUNNING


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    handler = {"up": _up, "down": _down, "status": _status}[args.command]
    try:
        return handler(args)
    except (SandboxError, OSError) as exc:  # OSError includes TimeoutError
        print(f"statelesslb-sandbox {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"statelesslb-sandbox {args.command}: interrupted", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
