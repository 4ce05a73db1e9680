"""statelesslb-ctl: look at and steer the statelesslb agent on this chassis.

    statelesslb-ctl status                       agent health
    statelesslb-ctl lb-list                      stateless LBs and their status
    statelesslb-ctl lb-show LB                   VIPs, backends, bucket ids, drain state
    statelesslb-ctl groups [LB]                  groups here, per-bucket counters
    statelesslb-ctl trace LB SRC_IP SRC_PORT [PROTO] [--vip VIP:PORT]
                                                 which backend a flow gets here, and why
    statelesslb-ctl drain LB BACKEND [--force]   take a backend out of the groups
    statelesslb-ctl undrain LB BACKEND           put it back (same bucket id)

Every command takes `--format json` (schemas: docs/operation.md). The agent is
reached over its unixctl socket (`--socket`, default [DEFAULT] unixctl_path of
the agent's configuration); drain/undrain edit the NB directly (`--db`, else
$OVN_NB_DB, else [ovn] ovn_nb_connection).

Exit status: 0 success; 1 the command failed (unknown LB, bad state, and for
`status --check` an unhealthy agent); 2 invalid arguments; 3 the agent or the
NB database cannot be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from statelesslb import __version__
from statelesslb.cli.clients import AgentClient, NbClient
from statelesslb.cli.errors import DEFAULT_TIMEOUT, EXIT_ERROR, EXIT_OK, EXIT_USAGE, PROG, CtlError
from statelesslb.cli.render import (
    render_drain,
    render_groups,
    render_lb_list,
    render_lb_show,
    render_status,
    render_trace,
)
from statelesslb.nb.parse import (
    NO_PORT,
    endpoint_key,
    parse_endpoint,
    parse_ip,
    parse_port,
    show,
)
from statelesslb.nb.validate import SUPPORTED_PROTOCOLS

_MAX_LB_REF = 255


# ---------------------------------------------------------------------------
# Input checks: nothing the operator types goes further unparsed.


def check_lb_ref(text: str) -> str:
    if not text or len(text) > _MAX_LB_REF or not text.isprintable():
        raise CtlError(f"load balancer {show(text)} is not a name or UUID", EXIT_USAGE)
    return text


def check_endpoint(text: str, what: str) -> str:
    """Canonical "IP:port" / "[IPv6]:port" of `text`, or a usage error saying why not."""
    parsed = parse_endpoint(text)
    if parsed == NO_PORT:
        raise CtlError(f"{what} {show(text)} has no port: write IP:port or [IPv6]:port",
                       EXIT_USAGE)
    if isinstance(parsed, str):
        raise CtlError(f"{what} {show(text)} {parsed}", EXIT_USAGE)
    return endpoint_key(*parsed)


def check_trace_args(src_ip: str, src_port: str, proto: str | None) -> tuple[str, str, str]:
    ip = parse_ip(src_ip)
    if ip is None:
        raise CtlError(f"SRC_IP {show(src_ip)} is not an IPv4 or IPv6 address", EXIT_USAGE)
    port = parse_port(src_port)
    if port is None:
        raise CtlError(f"SRC_PORT {show(src_port)} is not a port in 1..65535", EXIT_USAGE)
    if proto is not None and proto.lower() not in SUPPORTED_PROTOCOLS:
        raise CtlError(f"PROTO {show(proto)} is not tcp or udp", EXIT_USAGE)
    return str(ip), str(port), proto.lower() if proto else ""


def timeout_seconds(text: str) -> float:
    """argparse type of --timeout: 0 or less would silently drop the limit, inf overflows
    setitimer and nan slips past every comparison."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{show(text)} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{show(text)} is not a positive, finite number "
                                         "of seconds")
    return seconds


# ---------------------------------------------------------------------------
# Commands


@dataclass
class Context:
    args: argparse.Namespace
    _conf: Any = None

    @property
    def conf(self):
        if self._conf is None:
            self._conf = load_config(self.args.config_file)
        return self._conf

    def agent(self) -> AgentClient:
        path = self.args.socket or self.conf.unixctl_path
        if not path:
            raise CtlError("no agent socket configured: pass --socket PATH", EXIT_USAGE)
        return AgentClient(path, self.args.timeout)

    def nb(self) -> NbClient:
        remote = self.args.db or os.environ.get("OVN_NB_DB") or self.conf.ovn.ovn_nb_connection
        if not remote:
            raise CtlError("no NB database given: pass --db REMOTE or set OVN_NB_DB",
                           EXIT_USAGE)
        if remote.startswith("ssl:"):
            _configure_nb_ssl(self.conf)
        return NbClient(remote, self.args.timeout)


def load_config(config_file: str | None):
    """The agent's configuration: where its socket is, where the NB is."""
    from oslo_config import cfg

    from statelesslb import config

    conf = cfg.ConfigOpts()
    config.register_opts(conf)
    try:
        conf(args=[], project="statelesslb", prog=PROG, use_env=False,
             default_config_files=[config_file] if config_file else None)
    except cfg.Error as exc:
        raise CtlError(f"cannot read the configuration: {exc}", EXIT_USAGE) from exc
    return conf


def _configure_nb_ssl(conf) -> None:
    import ovs.stream

    o = conf.ovn
    if o.ovn_nb_private_key and o.ovn_nb_certificate and o.ovn_nb_ca_cert:
        ovs.stream.Stream.ssl_set_private_key_file(o.ovn_nb_private_key)
        ovs.stream.Stream.ssl_set_certificate_file(o.ovn_nb_certificate)
        ovs.stream.Stream.ssl_set_ca_cert_file(o.ovn_nb_ca_cert)


Result = tuple[Any, str]


def cmd_status(ctx: Context) -> Result:
    doc = ctx.agent().call("status")
    if ctx.args.check and not doc.get("healthy"):
        ctx.args.exit_code = EXIT_ERROR
    return doc, render_status(doc)


def cmd_lb_list(ctx: Context) -> Result:
    agent = ctx.agent()
    chassis = agent.call("status").get("chassis")
    doc = {"chassis": chassis, "load_balancers": agent.call("lb-list")}
    return doc, render_lb_list(doc)


def cmd_lb_show(ctx: Context) -> Result:
    doc = ctx.agent().call("lb-show", check_lb_ref(ctx.args.lb))
    return doc, render_lb_show(doc)


def cmd_groups(ctx: Context) -> Result:
    args = [check_lb_ref(ctx.args.lb)] if ctx.args.lb else []
    doc = ctx.agent().call("groups", *args)
    return doc, render_groups(doc)


def cmd_trace(ctx: Context) -> Result:
    a = ctx.args
    lb = check_lb_ref(a.lb)
    src_ip, src_port, proto = check_trace_args(a.src_ip, a.src_port, a.proto)
    vip = [check_endpoint(a.vip, "VIP")] if a.vip else []
    # An empty PROTO: the agent traces with the LB's own protocol.
    doc = ctx.agent().call("trace", lb, src_ip, src_port, proto, *vip)
    return doc, render_trace(doc, a.verbose)


def cmd_metrics(ctx: Context) -> Result:
    doc = ctx.agent().call("metrics")
    text = doc.get("text", "") if isinstance(doc, dict) else ""
    output = ctx.args.output
    if output:
        # Written whole, then renamed: a scraper never reads half a file.
        tmp = f"{output}.tmp.{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, output)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise CtlError(f"cannot write {output}: {exc.strerror or exc}", EXIT_ERROR) from None
        return {"written": output}, f"wrote {output}"
    return doc, text.rstrip("\n")


def _cmd_drain(ctx: Context, drain: bool) -> Result:
    lb = check_lb_ref(ctx.args.lb)
    backend = check_endpoint(ctx.args.backend, "BACKEND")
    force = bool(getattr(ctx.args, "force", False))
    with ctx.nb() as nb:
        doc = nb.edit_drain(lb, backend, drain, force)
    return doc, render_drain(doc)


def cmd_drain(ctx: Context) -> Result:
    return _cmd_drain(ctx, True)


def cmd_undrain(ctx: Context) -> Result:
    return _cmd_drain(ctx, False)


# ---------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors: one line, exit 2
        raise CtlError(f"{message} (see {PROG} --help)", EXIT_USAGE)


def _common(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Options every command takes, before or after its name."""
    def d(value):
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--socket", metavar="PATH", default=d(None),
                        help="the agent's control socket (default: unixctl_path of the "
                        "configuration, /var/run/statelesslb/statelesslb-agent.ctl)")
    parser.add_argument("--db", metavar="REMOTE", default=d(None),
                        help="OVN NB database for drain/undrain (default: $OVN_NB_DB, "
                        "else [ovn] ovn_nb_connection)")
    parser.add_argument("--config-file", metavar="PATH", default=d(None),
                        help="the agent's configuration (default: "
                        "/etc/statelesslb/statelesslb.conf if it exists)")
    parser.add_argument("--format", choices=("table", "json"), default=d("table"),
                        help="table (default) or json (schemas: docs/operation.md)")
    parser.add_argument("--timeout", type=timeout_seconds, metavar="SECONDS",
                        default=d(DEFAULT_TIMEOUT), help="give up after this long")
    parser.add_argument("--debug", action="store_true", default=d(False),
                        help="log what happens, with tracebacks, on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Look at and steer the statelesslb agent.",
                     epilog="Exit status: 0 ok, 1 command failed, 2 invalid arguments, "
                     "3 agent or NB unreachable.")
    _common(parser, defaults=True)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    common = _Parser(add_help=False)
    _common(common, defaults=False)

    def add(name: str, func: Callable[[Context], Result], help_text: str):
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add("status", cmd_status, "agent health: connections, sync, flows and groups")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when the agent reports a problem")
    add("lb-list", cmd_lb_list, "stateless load balancers, their status and roles here")
    p = add("lb-show", cmd_lb_show, "VIPs and backends of LB: bucket ids, ports, drain state")
    p.add_argument("lb", metavar="LB", help="load balancer name or UUID")
    p = add("groups", cmd_groups, "groups installed here, with per-bucket counters")
    p.add_argument("lb", metavar="LB", nargs="?", help="only this load balancer's groups")
    p = add("trace", cmd_trace, "which backend a flow gets on this gateway, and why")
    p.add_argument("lb", metavar="LB")
    p.add_argument("src_ip", metavar="SRC_IP")
    p.add_argument("src_port", metavar="SRC_PORT")
    p.add_argument("proto", metavar="PROTO", nargs="?",
                   help="tcp or udp (default: the load balancer's)")
    p.add_argument("--vip", metavar="VIP:PORT", help="which VIP, when LB has several")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also print the whole ofproto/trace")
    p = add("metrics", cmd_metrics, "counters of this chassis in the Prometheus text format")
    p.add_argument("--output", metavar="FILE",
                   help="write them to FILE atomically (for node_exporter's textfile "
                   "collector) instead of printing them")
    p = add("drain", cmd_drain, "stop sending new flows to BACKEND (edits the NB)")
    p.add_argument("lb", metavar="LB")
    p.add_argument("backend", metavar="BACKEND", help="IP:port or [IPv6]:port")
    p.add_argument("--force", action="store_true",
                   help="allow draining the last backend of a VIP")
    p = add("undrain", cmd_undrain, "put BACKEND back into the groups (edits the NB)")
    p.add_argument("lb", metavar="LB")
    p.add_argument("backend", metavar="BACKEND", help="IP:port or [IPv6]:port")
    return parser


def _setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # ovsdbapp logs connection trouble at ERROR; we say it once, our way.
    root.setLevel(logging.DEBUG if debug else logging.CRITICAL)


def main(argv: Sequence[str] | None = None, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    debug = False
    try:
        args = build_parser().parse_args(argv)
        debug = args.debug
        _setup_logging(debug)
        args.exit_code = EXIT_OK
        doc, text = args.func(Context(args))
        if args.format == "json":
            out.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        else:
            out.write(text + "\n")
        return args.exit_code
    except CtlError as exc:
        err.write(f"{PROG}: {exc}\n")
        return exc.code
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except Exception as exc:
        if debug:
            raise
        err.write(f"{PROG}: internal error: {type(exc).__name__}: {exc} "
                  "(rerun with --debug for details)\n")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
