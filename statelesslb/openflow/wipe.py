"""Notice when ovn-controller wipes the bridge.

ovn-controller deletes every flow, group and meter on br-int whenever its
OpenFlow connection (re)starts: its own restart, or an ovs-vswitchd restart.
We keep a sentinel flow in a table OVN never uses and watch it with an OpenFlow
flow monitor: its deletion, or the monitor losing the switch, means "reinstall".
"""

from __future__ import annotations

import ctypes
import logging
import os
import pty
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable

LOG = logging.getLogger(__name__)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the agent dies, even by SIGKILL (no orphans)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


_DIR_PREFIX = "statelesslb-monitor."
_SOCKET = "monitor.ctl"


def _private_dir(run_dir: str | None) -> str:
    """A 0700 directory for ovs-ofctl's control socket, which accepts `ofctl/send`
    (any OpenFlow message to the bridge): only we may reach it.

    In the agent's run directory it is named by our pid, and the directories of
    agents that died without cleaning up (SIGKILL) are removed here.
    """
    if run_dir is None:
        return tempfile.mkdtemp(prefix="slb-mon-")
    for name in _listdir(run_dir):
        pid = name.removeprefix(_DIR_PREFIX)
        if name.startswith(_DIR_PREFIX) and pid.isdigit() and not _alive(int(pid)):
            _remove_dir(os.path.join(run_dir, name))
    path = os.path.join(run_dir, f"{_DIR_PREFIX}{os.getpid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (dead, not yet reaped by its parent) does not."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _remove_dir(path: str) -> None:
    for name in _listdir(path):
        try:
            os.unlink(os.path.join(path, name))
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError:
        pass


class WipeMonitor:
    def __init__(
        self,
        target: str,
        table: int,
        on_wipe: Callable[[str], None],
        binary: str = "ovs-ofctl",
        run_dir: str | None = None,
    ):
        """`run_dir`: where ovs-ofctl's control socket goes (the agent's own run
        directory); without one, a private temporary directory."""
        self.target = target
        self.table = table
        self.on_wipe = on_wipe
        self.binary = binary
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._run, name="wipe-monitor", daemon=True)
        self._ctl_dir = _private_dir(run_dir)
        self.restarts = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        proc = self._proc
        if proc and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._thread.join(5)
        _remove_dir(self._ctl_dir)

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            started = time.monotonic()
            self._watch_once()
            if self._stop.is_set():
                return
            # The monitor lost the switch: whatever we installed may be gone.
            self.restarts += 1
            self.on_wipe("flow monitor lost the bridge")
            backoff = 0.1 if time.monotonic() - started > 5 else min(backoff * 2, 2.0)
            self._stop.wait(backoff)

    def _watch_once(self) -> None:
        argv = [
            self.binary,
            "monitor",
            self.target,
            f"watch:!initial,!add,!modify,table={self.table}",
            f"--unixctl={self._ctl_dir}/{_SOCKET}",
        ]
        # ovs-ofctl block-buffers a pipe: a pseudo-terminal makes it line-buffered,
        # so a deletion is seen the moment it happens. Checked on OVS 3.1: with
        # stderr on /dev/null the deletion events never reached stdout, so both
        # streams go to the pty.
        master, slave = pty.openpty()
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            LOG.error("cannot start the flow monitor: %s", exc)
            os.close(master)
            return
        finally:
            os.close(slave)
        registered = False
        pending = b""
        try:
            while True:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break  # EIO: the monitor exited and the pty closed
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if not registered and b"NXST_FLOW_MONITOR reply" in line:
                        # Armed: any deletion from now on is reported.
                        registered = True
                        self.on_wipe("flow monitor (re)connected")
                    elif b"event=DELETED" in line:
                        LOG.warning("sentinel flow deleted (ovn-controller wiped the bridge?)")
                        self.on_wipe("sentinel flow deleted")
        finally:
            os.close(master)
        self._proc.wait()
