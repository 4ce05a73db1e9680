"""The agent's control socket, spoken the ovs-appctl way (python-ovs unixctl).

statelesslb-ctl (or plain `ovs-appctl -t SOCKET COMMAND`) asks; every reply is
one JSON document, so the CLI renders tables or passes JSON through unchanged.
The socket is created mode 0600 in a directory of its own: only root (or the
agent's user) can drive the agent. Nothing listens on a network port.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict
from typing import TYPE_CHECKING

import ovs.poller
import ovs.unixctl
import ovs.unixctl.server

if TYPE_CHECKING:
    from statelesslb.agent import Agent

LOG = logging.getLogger(__name__)


class CtlServer:
    def __init__(self, path: str, agent: Agent):
        self.path = path
        self.agent = agent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ctl-server", daemon=True)
        self._server = None
        self.commands: dict[str, callable] = {}
        self.register("status", self._status)
        self.register("lb-list", self._lb_list)
        self.register("plan", self._plan)
        self.register("resync", self._resync)

    def register(self, name: str, handler, min_args: int = 0, max_args: int = 0) -> None:
        """handler(argv) -> JSON-able object; raise ValueError for a user error."""
        self.commands[name] = handler

        def _callback(conn, argv, aux):
            try:
                conn.reply(json.dumps(handler(argv), sort_keys=True, default=str))
            except ValueError as exc:
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

    # -- commands -----------------------------------------------------------------
    def _status(self, argv):
        agent = self.agent
        status = asdict(agent.status)
        status["connections"] = {
            name: bool(w is not None and w.connected)
            for name, w in (("nb", agent.nb), ("sb", agent.sb), ("ovs", agent.ovs))
        }
        return status

    def _lb_list(self, argv):
        plan = self.agent.plan
        if plan is None:
            return []
        return [
            {"uuid": uuid, **asdict(st)} for uuid, st in sorted(plan.lb_status.items())
        ]

    def _plan(self, argv):
        plan = self.agent.plan
        if plan is None:
            return {"flows": [], "groups": []}
        return {
            "flows": [f.add_line() for _, f in sorted(plan.flows.items())],
            "groups": [line for _, g in sorted(plan.groups.items()) for line in g.add_lines()],
        }

    def _resync(self, argv):
        self.agent.request_resync()
        return {"resync": "requested"}
