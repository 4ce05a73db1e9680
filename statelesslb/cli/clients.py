"""statelesslb-ctl's two connections - the agent's control socket and the NB database."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from statelesslb.cli.drain import edit_drain
from statelesslb.cli.errors import DEFAULT_TIMEOUT, EXIT_UNREACHABLE, PROG, CtlError
from statelesslb.nb.model import EXT_DRAIN, MODE_OPTION
from statelesslb.nb.parse import (
    is_marked,
    show,
)
from statelesslb.nb.stored import dump_drain, stored_ids

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
        buckets = stored_ids(dict(row.external_ids))[1] or {}
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
