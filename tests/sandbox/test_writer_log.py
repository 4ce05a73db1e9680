"""The NB writer logs a write while it holds the IDL's connection lock, with a real NB
ovsdb-server.

The failover checks (statelesslb/sandbox/failover.py) read, from each agent's log, when
it held the NB writer lock (lines the IDL's thread logs, under the connection lock) and
when it wrote. Logged after the connection lock is released, a write committed just
before its server died could show after the IDL's thread had logged the lock lost.
"""

from __future__ import annotations

import logging
import subprocess
import threading

import pytest

from statelesslb.agent.nb_writer import NbWriter
from statelesslb.agent.service import NB_LOCK
from statelesslb.agent.watchers import NB_TABLES, NbReader, Watcher
from statelesslb.sandbox.processes import wait_until


class OwnedLock:
    """A lock that knows which thread holds it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: int | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if blocking and timeout < 0:
            # A deadlock fails the test rather than hang the suite.
            if not self._lock.acquire(True, 60):
                raise RuntimeError("the connection lock was not free for 60 s")
            got = True
        else:
            got = self._lock.acquire(blocking, timeout)
        if got:
            self.owner = threading.get_ident()
        return got

    def release(self) -> None:
        self.owner = None
        self._lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class LockProbe(logging.Handler):
    """Notes, for each "LBs written" record, whether its thread held `lock`."""

    def __init__(self, connection_lock: OwnedLock):
        super().__init__()
        self.connection_lock = connection_lock   # not `lock`: Handler has its own
        self.writes: list[bool] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "LBs written" in record.getMessage():
            self.writes.append(self.connection_lock.owner == threading.get_ident())


def add_marked_lb(nbctl: str, remote: str) -> None:
    """lb1, marked stateless, on no router (the writer writes an error status for it)."""
    subprocess.run([nbctl, f"--db={remote}", "lb-add", "lb1", "10.0.0.10:80",
                    "10.0.1.2:8080", "--", "set", "load_balancer", "lb1",
                    "options:stateless_mode=mac"], check=True, capture_output=True)


def test_the_writer_logs_its_write_under_the_connection_lock(nb_server):
    remote, nbctl = nb_server
    # A marked LB on no router: the writer writes its error status.
    add_marked_lb(nbctl, remote)
    watcher = Watcher("nb", "OVN_Northbound", remote, NB_TABLES, lambda *_: None,
                      lock_name=NB_LOCK)
    lock = OwnedLock()
    watcher.connection.lock = lock     # before its thread starts: it takes this one
    probe = LockProbe(lock)
    writer_log = logging.getLogger("statelesslb.agent.nb_writer")
    writer_log.addHandler(probe)
    old_level = writer_log.level
    writer_log.setLevel(logging.INFO)
    watcher.start()
    try:
        wait_until(lambda: watcher.has_lock, 20, 0.02, "the writer lock")
        reader, writer = NbReader(watcher), NbWriter(watcher)
        nb, _changed = reader.read(everything=True)
        assert writer.reconcile(nb) == 1, writer.last_error
        status = subprocess.run([nbctl, f"--db={remote}", "get", "load_balancer", "lb1",
                                 "external_ids:\"statelesslb:status\""], check=True,
                                capture_output=True, text=True).stdout
        assert "error" in status, status
        assert probe.writes == [True]
    finally:
        writer_log.removeHandler(probe)
        writer_log.setLevel(old_level)
        watcher.stop()


def test_only_the_connection_thread_runs_the_idl(nb_server):
    """Writes are committed by the IDL's own thread: ovsdbapp's loop works out what to
    poll for without the connection lock, so an IDL run from another thread (a
    commit_block() in the agent's loop) could reconnect the session under it and leave
    it polling a dead one. Seen in the clustered failover test: a gateway's agent that
    heard nothing for 30 s after the NB leader died during its write."""
    remote, nbctl = nb_server
    add_marked_lb(nbctl, remote)
    woken = threading.Event()
    watcher = Watcher("nb", "OVN_Northbound", remote, NB_TABLES,
                      lambda *_: woken.set(), lock_name=NB_LOCK)
    runners: set[int] = set()
    idl_run = watcher.idl.run

    def recording_run():
        runners.add(threading.get_ident())
        return idl_run()
    watcher.idl.run = recording_run
    watcher.start()
    try:
        wait_until(lambda: watcher.has_lock, 20, 0.02, "the writer lock")
        # ovsdbapp's start() ran the IDL in this thread until the first contents came,
        # before its own thread existed: from here on, only that thread may.
        runners.clear()
        reader, writer = NbReader(watcher), NbWriter(watcher)
        nb, _changed = reader.read(everything=True)
        assert writer.reconcile(nb) == 1, writer.last_error
        assert runners == {watcher.connection.thread.ident}
        # And that thread still hears the server: a change made elsewhere arrives.
        woken.clear()
        subprocess.run([nbctl, f"--db={remote}", "set", "load_balancer", "lb1",
                        "external_ids:probe=1"], check=True, capture_output=True)
        wait_until(woken.is_set, 10, 0.02, "the change notice")
        with watcher.connection.lock:
            row = next(iter(watcher.idl.tables["Load_Balancer"].rows.values()))
            assert row.external_ids.get("probe") == "1"
    finally:
        watcher.stop()


def test_a_failed_build_leaves_the_idl_running(nb_server):
    """An exception while building a transaction reaches the caller, and the IDL (which
    refuses to run while a transaction is open) goes on hearing the server."""
    remote, nbctl = nb_server
    woken = threading.Event()
    watcher = Watcher("nb", "OVN_Northbound", remote, NB_TABLES, lambda *_: woken.set())
    watcher.start()
    try:
        def broken(_txn):
            raise ValueError("bad row")
        with pytest.raises(ValueError, match="bad row"):
            watcher.commit(broken)
        woken.clear()
        subprocess.run([nbctl, f"--db={remote}", "lb-add", "lb2", "10.0.0.20:80",
                        "10.0.1.2:8080"], check=True, capture_output=True)
        wait_until(woken.is_set, 10, 0.02, "the change notice")
        with watcher.connection.lock:
            assert [r.name for r in watcher.rows("Load_Balancer")] == ["lb2"]
    finally:
        watcher.stop()
