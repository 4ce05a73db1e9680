"""The agent's control socket, spoken the ovs-appctl way (python-ovs unixctl).

statelesslb-ctl (or plain `ovs-appctl -t SOCKET COMMAND`) asks; every reply is
one JSON document, so the CLI renders tables or passes JSON through unchanged.
The socket is created mode 0600 in a directory of its own: only root (or the
agent's user) can drive the agent. Nothing listens on a network port.

Commands (reply schemas: docs/operation.md):

    status                       health, connections, counters, table layout
    lb-list                      marked LBs: NB status and this chassis' plan status
    lb-show LB                   VIPs, backends, bucket ids, ports, chassis, drain
    groups [LB]                  installed groups with per-bucket counters
    trace LB SRC_IP SRC_PORT PROTO [VIP:PORT]
                                 which bucket the gateway picks for that flow
                                 (PROTO "": the LB's own)
    plan                         the desired flows and groups as bundle lines
    resync                       re-read the bridge and reinstall what differs

Everything an operator types is parsed into typed values (nb/parse.py's strict
parsers) before it reaches any command line; the ones built here go through
ofstrings' checks like the planner's.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import ovs.poller
import ovs.unixctl
import ovs.unixctl.server

from statelesslb import __version__
from statelesslb.agent.state import AgentState
from statelesslb.nb.model import (
    Snapshot,
)
from statelesslb.observe.metrics import (
    conntrack_counts,
)
from statelesslb.observe.reports import (
    GroupStats,
    NotReady,
    find_lb,
    groups_doc,
    health_problems,
    lb_list_doc,
    lb_show_doc,
    metrics_text,
    parse_group_stats,
)
from statelesslb.observe.trace import trace_doc, trace_followup, trace_request
from statelesslb.ofstrings import (
    checked_piece,
)
from statelesslb.openflow.ofctl import InstalledGroup, OfctlError

LOG = logging.getLogger(__name__)
# How often `groups` re-reads when a bundle changed a group between its two dumps.
GROUP_READ_ATTEMPTS = 3


# ---------------------------------------------------------------------------
# The socket


class CtlServer:
    """Serves the commands; reads the agent only through `state()` (an AgentState)."""

    def __init__(self, path: str, conf, state: Callable[[], AgentState],
                 request_resync: Callable[[], None]):
        self.path = path
        self.conf = conf
        self._state = state
        self._request_resync = request_resync
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ctl-server", daemon=True)
        self._server = None
        self.commands: dict[str, Callable[[list[str]], Any]] = {}
        self.register("status", self._status)
        self.register("lb-list", self._lb_list)
        self.register("lb-show", self._lb_show, 1, 1)
        self.register("groups", self._groups, 0, 1)
        self.register("trace", self._trace, 4, 5)
        self.register("plan", self._plan)
        self.register("resync", self._resync)
        self.register("metrics", self._metrics)

    def register(self, name: str, handler, min_args: int = 0, max_args: int = 0) -> None:
        """handler(argv) -> JSON-able object; raise ValueError for a user error."""
        self.commands[name] = handler

        def _callback(conn, argv, aux):
            try:
                conn.reply(json.dumps(handler(argv), sort_keys=True, default=str))
            except ValueError as exc:
                LOG.debug("ctl command %s %s: %s", name, argv, exc)
                conn.reply_error(str(exc))
            except Exception as exc:  # the agent keeps running whatever a command does
                LOG.exception("ctl command %s failed", name)
                conn.reply_error(f"internal error: {exc}")

        ovs.unixctl.command_register(name, "", min_args, max_args, _callback, None)

    def start(self) -> None:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o750, exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)  # a stale socket of a previous run
        old_umask = os.umask(0o177)
        try:
            error, self._server = ovs.unixctl.server.UnixctlServer.create(self.path)
        finally:
            os.umask(old_umask)
        if error:
            raise SystemExit(f"cannot create control socket {self.path}: {os.strerror(error)}")
        os.chmod(self.path, 0o600)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        if self._server is not None:
            self._server.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._server.run()
            poller = ovs.poller.Poller()
            self._server.wait(poller)
            poller.timer_wait(200)
            poller.block()

    # -- state access ----------------------------------------------------------------
    def _snapshot(self) -> tuple[AgentState, Snapshot]:
        state = self._state()
        if state.snapshot is None:
            raise NotReady("the agent has not read the NB, SB and bridge yet "
                           "(starting, or waiting for ovn-controller); try again shortly")
        return state, state.snapshot

    # -- commands -----------------------------------------------------------------
    def _status(self, argv):
        status = dict(self._state().status)
        status["resync_interval"] = self.conf.statelesslb.resync_interval
        status["version"] = __version__
        status["pid"] = os.getpid()
        now = time.time()
        status["now"] = now
        status["problems"] = health_problems(status, status["resync_interval"], now)
        status["healthy"] = not status["problems"]
        return status

    def _lb_list(self, argv):
        state = self._state()
        return lb_list_doc(state.snapshot, state.plan)

    def _lb_show(self, argv):
        state, snapshot = self._snapshot()
        return lb_show_doc(snapshot, state.plan, state.plan_config, argv[0])

    def _groups(self, argv):
        state, snapshot = self._snapshot()
        ref = argv[0] if argv else None
        if ref is not None:
            find_lb(snapshot, ref)  # an unknown LB is an error before any ovs-ofctl
        installed, stats = self._read_groups(state)
        return groups_doc(snapshot, state.plan, state.plan_config, installed, stats, ref)

    def _read_groups(self, state: AgentState
                     ) -> tuple[dict[int, InstalledGroup], dict[int, GroupStats]]:
        """Groups and their stats, read so that bucket positions line up.

        dump-group-stats numbers buckets by position; a bundle landing between the
        two dumps could reorder them, so the group list is read again after the
        stats and the pair retried until both dumps agree.
        """
        ofctl = state.ofctl
        if ofctl is None:
            raise NotReady("the agent is still starting; try again shortly")
        id_min, id_max = state.plan_config.group_range
        known = set(state.plan.groups) if state.plan is not None else set()
        try:
            # Per group (Ofctl.groups): a whole-bridge dump-groups can crash OVS 3.1.
            before = ofctl.groups(id_min, id_max, known)
            for _ in range(GROUP_READ_ATTEMPTS):
                stats = parse_group_stats(ofctl.group_stats())
                after = ofctl.groups(id_min, id_max, known)
                if _bucket_orders(before) == _bucket_orders(after):
                    return after, {gid: s for gid, s in stats.items() if gid in after}
                before = after
        except OfctlError as exc:
            raise ValueError(f"cannot read groups from the bridge: {exc}") from exc
        raise ValueError("groups kept changing while being read; try again")

    def _trace(self, argv):
        state, snapshot = self._snapshot()
        config = state.plan_config
        req = trace_request(snapshot, state.plan, config, list(argv))
        bridge = self._bridge(state)
        text = self._appctl("ofproto/trace-packet-out", bridge, req.flow, req.actions)
        followup = trace_followup(req, text)
        if followup is None:
            return trace_doc(snapshot, config, req, text)
        flow, actions, zone = followup
        more = self._appctl("ofproto/trace-packet-out", bridge, flow, actions)
        return trace_doc(snapshot, config, req, text, more, zone)

    def _plan(self, argv):
        plan = self._state().plan
        if plan is None:
            return {"flows": [], "groups": []}
        return {
            "flows": [f.add_line() for _, f in sorted(plan.flows.items())],
            "groups": [line for _, g in sorted(plan.groups.items()) for line in g.add_lines()],
        }

    def _resync(self, argv):
        self._request_resync()
        return {"resync": "requested"}

    def _metrics(self, argv):
        state, snapshot = self._snapshot()
        installed, stats = self._read_groups(state)
        groups = groups_doc(snapshot, state.plan, state.plan_config, installed, stats)
        conntrack = conntrack_counts(self._appctl("dpctl/dump-conntrack"))
        healthy = self._status([])["healthy"]
        return {"text": metrics_text(snapshot, state.plan, groups, conntrack, healthy)}

    # -- ovs-vswitchd ------------------------------------------------------------------
    def _bridge(self, state: AgentState) -> str:
        # The bridge the agent programs, chosen by Agent.start before this server starts.
        if state.bridge is None:
            raise NotReady("the agent is still starting; try again shortly")
        return checked_piece(state.bridge)

    def _appctl(self, *args: str) -> str:
        conf = self.conf
        binary = conf.ovs.appctl_path or appctl_binary(conf.ovs.ofctl_path)
        argv = [binary, "-t", vswitchd_ctl(conf), *args]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=conf.ovs.ofctl_timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ValueError(f"cannot run {argv[0]}: {exc}") from exc
        if proc.returncode != 0:
            raise ValueError(f"{' '.join(argv[:4])} failed: {proc.stderr.strip()[-2000:]}")
        return proc.stdout


def _bucket_orders(groups: Mapping[int, InstalledGroup]) -> dict[int, list[int]]:
    return {gid: list(g.buckets) for gid, g in groups.items()}


def appctl_binary(ofctl_path: str) -> str:
    """ovs-appctl from the same installation as the configured ovs-ofctl ([ovs]
    appctl_path unset)."""
    head, _ = os.path.split(ofctl_path)
    return os.path.join(head, "ovs-appctl") if head else "ovs-appctl"


def vswitchd_ctl(conf, exists: Callable[[str], bool] = os.path.exists,
                 read: Callable[[str], str] | None = None) -> str:
    """ovs-vswitchd's control socket: [ovs] vswitchd_ctl if set, else
    <ovs_rundir>/ovs-vswitchd.ctl (an explicit --unixctl), else the packaged
    daemon's <ovs_rundir>/ovs-vswitchd.<pid>.ctl."""
    explicit = conf.ovs.vswitchd_ctl
    if explicit:
        return explicit
    rundir = conf.ovs.ovs_rundir
    fixed = os.path.join(rundir, "ovs-vswitchd.ctl")
    if exists(fixed):
        return fixed
    pidfile = os.path.join(rundir, "ovs-vswitchd.pid")
    try:
        text = read(pidfile) if read else _read_text(pidfile)
        pid = int(text.split()[0])
    except (OSError, ValueError, IndexError) as exc:
        raise ValueError(f"cannot find ovs-vswitchd's control socket: no {fixed} and no "
                         f"pid in {pidfile} ({exc}); check [ovs] ovs_rundir") from exc
    return os.path.join(rundir, f"ovs-vswitchd.{pid}.ctl")


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()
