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
import errno
import json
import logging
import math
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from statelesslb import __version__
from statelesslb.buckets import dump_drain, parse_drain_checked, parse_id_map
from statelesslb.model import EXT_BUCKETS, EXT_DRAIN, MODE_OPTION
from statelesslb.validate import (
    NO_PORT,
    SUPPORTED_PROTOCOLS,
    endpoint_key,
    is_marked,
    parse_endpoint,
    parse_ip,
    parse_port,
    show,
    vip_backend_keys,
)

PROG = "statelesslb-ctl"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
DEFAULT_TIMEOUT = 15.0
_MAX_LB_REF = 255


class CtlError(Exception):
    """A failure to report as one line on stderr, with an exit status."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


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
# Drain list editing (pure)


@dataclass(frozen=True)
class DrainEdit:
    drain: list[str]          # the whole list after the edit, sorted
    changed: bool
    dropped: list[str]        # malformed entries of the old list, not written back


def edit_drain(lb_name: str, vips: Mapping[str, str], drain_text: str | None,
               backend: str, drain: bool, force: bool = False) -> DrainEdit:
    """The drain list after draining (or undraining) canonical `backend`."""
    current, malformed = parse_drain_checked(drain_text)
    dropped = [show(entry) for entry in malformed]
    by_vip = vip_backend_keys(vips)
    known = sorted({b for _, backends in by_vip for b in backends})
    if drain:
        if backend not in known:
            raise CtlError(f"{backend} is not a backend of {show(lb_name)} "
                           f"(its backends: {', '.join(known) or 'none'})")
        new = current | {backend}
        if not force:
            for vip, backends in by_vip:
                if backend in backends and all(b in new for b in backends):
                    raise CtlError(
                        f"draining {backend} would leave VIP {vip} of {show(lb_name)} with "
                        "no backend (its traffic would be dropped); use --force to do it")
    else:
        if backend not in current and backend not in known:
            raise CtlError(f"{backend} is neither drained nor a backend of {show(lb_name)}")
        new = current - {backend}
    return DrainEdit(sorted(new), new != current or bool(malformed), dropped)


# ---------------------------------------------------------------------------
# Transports


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Give up on a blocking call after `seconds` (python-ovs' blocking calls have no
    timeout of their own). Only the main thread can take SIGALRM: elsewhere, no limit."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _expired(signum, frame):
        raise CtlError(f"timed out after {seconds:g}s {what}", EXIT_UNREACHABLE)

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class AgentClient:
    """Asks the agent over its unixctl socket (what `ovs-appctl -t SOCKET` does)."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT):
        # python-ovs resolves relative paths against OVS's run directory, not ours.
        self.path = os.path.abspath(path)
        self.timeout = timeout

    def call(self, command: str, *args: str) -> Any:
        import ovs.unixctl.client

        path = self.path
        if not os.path.exists(path):
            raise CtlError(f"no agent socket at {path}; is statelesslb-agent running? "
                           "(systemctl status statelesslb-agent, or pass --socket PATH)",
                           EXIT_UNREACHABLE)
        with deadline(self.timeout, f"waiting for the agent at {path}"):
            error, client = ovs.unixctl.client.UnixctlClient.create(path)
            if error:
                raise CtlError(_connect_error(path, error), EXIT_UNREACHABLE)
            try:
                error, err_text, result = client.transact(command, list(args))
            finally:
                client.close()
        if error:
            raise CtlError(f"lost the agent at {path}: {os.strerror(error)}", EXIT_UNREACHABLE)
        if err_text is not None:
            text = str(err_text).strip()
            if "is not a valid command" in text:
                text += " (the agent is older than this statelesslb-ctl: restart it)"
            raise CtlError(text)
        try:
            return json.loads(result)
        except ValueError:
            raise CtlError(f"the agent at {path} answered {command} with no JSON: "
                           f"{str(result)[:200]}") from None


def _connect_error(path: str, error: int) -> str:
    if error in (errno.EACCES, errno.EPERM):
        return (f"permission denied on {path}: run {PROG} as root "
                "(the agent's socket is mode 0600)")
    if error == errno.ECONNREFUSED:
        return (f"nothing answers on {path} (a stale socket?); "
                "is statelesslb-agent running?")
    return f"cannot connect to the agent at {path}: {os.strerror(error)}"


class NbClient:
    """The NB Load_Balancer table through ovsdbapp, for the operator's own keys."""

    def __init__(self, remote: str, timeout: float = DEFAULT_TIMEOUT):
        self.remote = remote
        self.timeout = timeout
        self.api = None

    def __enter__(self) -> NbClient:
        from ovsdbapp.backend.ovs_idl import connection, idlutils
        from ovsdbapp.schema.ovn_northbound import impl_idl

        remote = self.remote
        if remote.startswith("unix:") and not os.path.exists(remote[5:]):
            raise CtlError(f"no NB database socket at {remote[5:]}; pass --db REMOTE "
                           "or set OVN_NB_DB", EXIT_UNREACHABLE)
        with deadline(self.timeout, f"connecting to the NB database at {remote}"):
            try:
                helper = idlutils.get_schema_helper(remote, "OVN_Northbound")
                helper.register_table("Load_Balancer")
                idl = connection.OvsdbIdl(remote, helper, leader_only=True)
                conn = connection.Connection(idl, int(max(1, self.timeout)))
                self.api = impl_idl.OvnNbApiIdlImpl(conn, auto_index=False)
            except CtlError:
                raise
            except Exception as exc:
                raise CtlError(f"cannot reach the NB database at {remote}: {exc}; "
                               "pass --db REMOTE or set OVN_NB_DB", EXIT_UNREACHABLE) from exc
        return self

    def __exit__(self, *exc: object) -> None:
        if self.api is not None:
            with contextlib.suppress(Exception):
                self.api.ovsdb_connection.stop(timeout=2)

    def edit_drain(self, lb_ref: str, backend: str, drain: bool, force: bool) -> dict[str, Any]:
        from ovsdbapp.backend.ovs_idl import command

        client = self

        class _EditDrain(command.BaseCommand):
            # Runs again on TRY_AGAIN (someone else changed the row): always from fresh data.
            def run_idl(self, txn):
                row = client._find_row(lb_ref)
                edit = edit_drain(row.name, dict(row.vips),
                                  dict(row.external_ids).get(EXT_DRAIN), backend, drain, force)
                if edit.changed:
                    # Two operators editing at once: the loser's commit retries.
                    row.verify("external_ids")
                    row.setkey("external_ids", EXT_DRAIN, dump_drain(edit.drain))
                self.result = (row, edit)

        with deadline(self.timeout, f"writing to the NB database at {self.remote}"):
            try:
                row, edit = _EditDrain(self.api).execute(check_error=True, log_errors=False)
            except CtlError:
                raise
            except Exception as exc:
                raise CtlError(f"NB transaction failed: {exc}") from exc
        buckets = parse_id_map(dict(row.external_ids).get(EXT_BUCKETS)) or {}
        return {
            "lb": row.name,
            "uuid": str(row.uuid),
            "backend": backend,
            "bucket_id": buckets.get(backend),
            "action": "drain" if drain else "undrain",
            "changed": edit.changed,
            "drain": edit.drain,
            "dropped": edit.dropped,
        }

    def _find_row(self, ref: str):
        rows = list(self.api.tables["Load_Balancer"].rows.values())
        found = ([r for r in rows if str(r.uuid) == ref]
                 or [r for r in rows if r.name == ref])
        if not found:
            raise CtlError(f"no load balancer named {show(ref)} in the NB")
        if len(found) > 1:
            uuids = ", ".join(sorted(str(r.uuid) for r in found))
            raise CtlError(f"{len(found)} load balancers are named {show(ref)}: "
                           f"give one of their UUIDs ({uuids})")
        row = found[0]
        if not is_marked(row):
            raise CtlError(f"load balancer {show(row.name)} is not stateless "
                           f"(options:{MODE_OPTION} is not mac)")
        return row


# ---------------------------------------------------------------------------
# Human output (pure: document in, text out)


def _cell(value: Any) -> str:
    if value is None or value == []:
        return "-"
    if value is True:
        return "yes"
    if value is False:
        return "no"
    if isinstance(value, list | tuple):
        return ",".join(_cell(v) for v in value)
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "") -> str:
    """Left-aligned columns two spaces apart; None/empty shows as '-'."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    lines = []
    for row in [list(headers), *cells]:
        line = "  ".join(text.ljust(widths[i]) for i, text in enumerate(row))
        lines.append(indent + line.rstrip())
    return "\n".join(lines)


def _when(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    return f"{stamp} ({max(0.0, now - ts):.0f}s ago)"


def render_status(doc: Mapping[str, Any]) -> str:
    now = doc.get("now") or time.time()
    conns = " ".join(f"{name}={'up' if up else 'DOWN'}"
                     for name, up in sorted(doc.get("connections", {}).items()))
    layout = doc.get("layout")
    layout_text = (" ".join(f"{k}={v}" for k, v in sorted(layout.items()))
                   if layout else "not derived yet")
    rows = [
        ("chassis", doc.get("chassis")),
        ("health", "ok" if doc.get("healthy") else "PROBLEMS"),
        ("agent", f"statelesslb {doc.get('version', '?')}, pid {doc.get('pid', '?')}, "
                  f"started {_when(doc.get('started_at'), now)}"),
        ("bridge", doc.get("bridge_target")),
        ("connections", conns),
        ("nb writer", "yes (holds the lock)" if doc.get("nb_writer") else "no"),
        ("last full sync", _when(doc.get("last_full_sync"), now)),
        ("last change", _when(doc.get("last_apply"), now)),
        ("last change took", _phases(doc.get("last_apply_ms"))),
        ("flows", f"{_cell(doc.get('flows_installed'))} installed, "
                  f"{_cell(doc.get('flows_expected'))} expected"),
        ("groups", f"{_cell(doc.get('groups_installed'))} installed, "
                   f"{_cell(doc.get('groups_expected'))} expected"),
        ("bundles applied", doc.get("bundles_applied")),
        ("bridge wipes seen", doc.get("wipes_seen")),
        ("missed changes", doc.get("missed_changes")),
        ("last error", doc.get("last_error")),
        ("table layout", layout_text),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {_cell(v)}" for k, v in rows]
    lines += [f"problem: {p}" for p in doc.get("problems", [])]
    return "\n".join(lines)


def _phases(laps: object) -> str | None:
    """'3.1 ms (read_nb 0.2, plan 0.4, bundle 2.1, ...)' from last_apply_ms."""
    if not isinstance(laps, Mapping) or "total" not in laps:
        return None
    parts = ", ".join(f"{k} {v}" for k, v in laps.items() if k != "total")
    return f"{laps['total']} ms ({parts})"


def render_lb_list(doc: Mapping[str, Any]) -> str:
    chassis = doc.get("chassis") or "this chassis"
    lbs = doc.get("load_balancers", [])
    if not lbs:
        return ("no stateless load balancers (mark one with "
                f"`ovn-nbctl set load_balancer LB options:{MODE_OPTION}=mac`)")
    rows = [(lb["name"], lb.get("mode"), lb.get("protocol"), lb.get("persistence"),
             lb.get("vips"), _short_status(lb.get("nb_status")), lb.get("state"),
             lb.get("roles"))
            for lb in lbs]
    text = format_table(("NAME", "MODE", "PROTO", "PERSISTENCE", "VIPS", "NB STATUS",
                         f"ON {chassis.upper()}", "ROLES HERE"), rows)
    notes = []
    for lb in lbs:
        nb_status = lb.get("nb_status")
        if nb_status is None:
            notes.append(f"{lb['name']}: no NB status yet (is an NB writer agent running?)")
        elif not nb_status.startswith("ok"):
            notes.append(f"{lb['name']}: NB: {nb_status}")
        if lb.get("message"):
            notes.append(f"{lb['name']}: {chassis}: {lb['state']}: {lb['message']}")
    return "\n".join([text, *notes])


def _short_status(status: str | None) -> str | None:
    if status is None:
        return None
    return status.split(":", 1)[0].split(" ", 1)[0]


def _persistence_text(doc: Mapping[str, Any], now: float) -> str:
    p = doc.get("persistence")
    if not p:
        return "-"
    layers = [name for name, on in (("affinity", p["affinity"]),
                                     ("second-chance", p["second_chance"])) if on]
    text = ",".join(layers) or "hash only"
    if p["second_chance"]:
        text += f" (window {p['window']}s)"
    prev = doc.get("previous")
    if prev:
        left = prev["until"] - now
        text += (f"; previous bucket set in force for {left:.0f}s more" if left > 0
                 else "; previous bucket set expired")
    return text


def _hash_text(h: Mapping[str, Any] | None) -> str:
    if not h:
        return "-"
    if h.get("classes") is None:
        return f"{_cell(h.get('option'))} (one gateway datapath flow per connection)"
    return (f"{_cell(h.get('option'))} ({h['classes']:,} classes: at most that many "
            "gateway datapath flows per VIP)")


def render_lb_show(doc: Mapping[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    agent = doc.get("agent")
    chassis = doc.get("chassis")
    here = (f"{agent['state']}" + (f": {agent['message']}" if agent.get("message") else "")
            + f", roles: {_cell(agent.get('roles'))}") if agent else "not planned here"
    ports = [f"{p['name']} active on {p['chassis'] or 'no chassis'}"
             + (" (here)" if p.get("here") else "") for p in doc.get("gateway_ports", [])]
    lines = [
        f"load balancer {doc['name']} ({doc['uuid']})",
        f"  mode {_cell(doc.get('mode'))}, protocol {doc.get('protocol')}, "
        f"router {_cell(doc.get('router'))}",
    ]
    fields = [("NB status", _cell(doc.get("nb_status"))), (f"on {chassis}", here),
              ("persistence", _persistence_text(doc, now)),
              ("hash", _hash_text(doc.get("hash"))),
              *([("weights", ", ".join(f"{k}={w}" for k, w in doc["weights"].items())
                               + " (others 1; a weight is that many buckets)")]
                if doc.get("weights") else []),
              ("gateway ports", ", ".join(ports) or "-"), ("drained", _cell(doc.get("drain")))]
    width = max(len(k) for k, _ in fields) + 1
    lines += [f"  {(k + ':').ljust(width)} {v}" for k, v in fields]
    for vip in doc.get("vips", []):
        where = "installed here" if vip.get("group_here") else "not on this chassis"
        lines += ["", f"VIP {vip['vip']}  (VIP id {_cell(vip.get('vip_id'))}, "
                      f"group {_cell(vip.get('group_id'))}, {where})"]
        rows = [(b["backend"], b.get("bucket_id"), b.get("mac"), b.get("logical_port"),
                 b.get("chassis"), b.get("drained"), b.get("health") or "-",
                 b.get("in_group"))
                for b in vip.get("backends", [])]
        lines.append(format_table(("BACKEND", "BUCKET", "MAC", "PORT", "CHASSIS", "DRAINED",
                                   "HEALTH", "IN GROUP HERE"), rows, indent="  "))
    return "\n".join(lines)


def render_groups(doc: Mapping[str, Any]) -> str:
    chassis = doc.get("chassis")
    groups = doc.get("groups", [])
    if not groups:
        what = f" of {doc['lb']}" if doc.get("lb") else ""
        lines = [f"no statelesslb groups{what} on {chassis}"]
        lines += [f"note: {n}" for n in doc.get("notes", [])]
        return "\n".join(lines)
    lines = []
    for g in groups:
        state = ("in sync" if g.get("in_sync") else
                 "DIFFERS from plan" if g.get("in_plan") else "NOT IN PLAN (stale)")
        if lines:
            lines.append("")
        kind = "" if g.get("kind") in (None, "gateway") else f" ({g['kind']} bucket set)"
        lines.append(f"{chassis}: group {g['group_id']}{kind}  {_cell(g.get('lb'))} "
                     f"VIP {_cell(g.get('vip'))}  packets {g.get('packet_count')} "
                     f"bytes {g.get('byte_count')}  [{state}]")
        rows = [(b["bucket_id"], b.get("backend"), b.get("mac"), b.get("logical_port"),
                 b.get("chassis"), b.get("packet_count"), b.get("byte_count"))
                for b in g.get("buckets", [])]
        lines.append(format_table(("BUCKET", "BACKEND", "MAC", "PORT", "CHASSIS", "PACKETS",
                                   "BYTES"), rows, indent="  "))
        if g.get("drained"):
            lines.append(f"  drained (no bucket): {', '.join(g['drained'])}")
    return "\n".join(lines)


def render_trace(doc: Mapping[str, Any], verbose: bool = False) -> str:
    head = (f"{doc['lb']} VIP {doc['vip']}: {doc['protocol']} from {doc['source']} "
            f"on {doc['chassis']}")
    backend = doc.get("backend")
    lines = [head]
    if backend:
        lines.append(f"  backend {_cell(backend.get('backend'))} (bucket "
                     f"{backend['bucket_id']}, MAC {_cell(backend.get('mac'))}, port "
                     f"{_cell(backend.get('logical_port'))} on {_cell(backend.get('chassis'))})")
    else:
        lines.append("  no backend chosen: the packet did not reach the group")
    first = doc.get("first_table") or {}
    if doc.get("intercepted"):
        lines.append(f"  why: the statelesslb VIP flow in table {first.get('table')} (cookie "
                     f"{first.get('cookie')}) matched; group {doc['group_id']}")
        lines.append("       picks the live bucket with the highest hash score:")
        best = backend["bucket_id"] if backend else None
        rows = [(s["bucket_id"], s.get("backend"), s["score"],
                 "<- chosen" if s["bucket_id"] == best else "") for s in doc.get("scores", [])]
        lines.append(format_table(("BUCKET", "BACKEND", "SCORE", ""), rows, indent="    "))
        impl = doc.get("hash_impl")
        classes = doc.get("hash_classes")
        lines.append(f"  hash: {impl} build of OVS" if impl else
                     "  hash: scores match no known OVS build (murmur, crc32)")
        lines.append("  hashed: the 5-tuple" if classes == "5-tuple" else
                     f"  hashed: {_cell(classes)} = {_cell(doc.get('hash_fields'))}")
    else:
        table = _cell(first.get("table"))
        hit = ("nothing matched" if str(first.get("match", "")).startswith("No match")
               else f"{_cell(first.get('match'))} (cookie {_cell(first.get('cookie'))}) "
               "matched")
        lines.append(f"  why: in table {table} {hit}, not the statelesslb VIP flow:")
        lines.append("       check `statelesslb-ctl status` and `groups` on this chassis")
    if doc.get("tunnel_to"):
        lines.append(f"  sent through a tunnel to {doc['tunnel_to']}")
    lines += [textwrap.fill(n, 95, initial_indent="  note: ", subsequent_indent="        ")
              for n in doc.get("notes", [])]
    if verbose:
        lines += ["", f"ofproto/trace of {doc['flow']}:", doc.get("trace", "")]
    return "\n".join(lines)


def render_drain(doc: Mapping[str, Any]) -> str:
    bucket = f" (bucket {doc['bucket_id']})" if doc.get("bucket_id") is not None else ""
    if not doc.get("changed"):
        state = "already drained" if doc["action"] == "drain" else "not drained"
        text = f"{doc['lb']}: {doc['backend']}{bucket} is {state}; nothing changed"
    elif doc["action"] == "drain":
        text = (f"{doc['lb']}: drained {doc['backend']}{bucket}: the gateways remove its "
                "bucket; its DNAT flows stay")
    else:
        text = (f"{doc['lb']}: undrained {doc['backend']}{bucket}: the gateways insert its "
                "bucket again, with the same id")
    lines = [text, f"drain list now: {_cell(doc.get('drain'))}"]
    if doc.get("dropped"):
        lines.append(f"dropped malformed drain entries: {', '.join(doc['dropped'])}")
    return "\n".join(lines)


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
