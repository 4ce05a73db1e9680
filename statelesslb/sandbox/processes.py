"""Finding the OVS and OVN binaries, starting their daemons in a run directory, and
stopping exactly the processes the sandbox started (by pid and start time).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

LOG = logging.getLogger(__name__)

INSTALL_HINT = (
    "run scripts/setup (as root) or "
    "`apt-get install openvswitch-switch ovn-central ovn-host`"
)
OVS_SCHEMA_DIRS = ("/usr/share/openvswitch", "/usr/local/share/openvswitch")
OVN_SCHEMA_DIRS = ("/usr/share/ovn", "/usr/local/share/ovn")
# Debian installs ovs-vswitchd outside PATH.
VSWITCHD_DIRS = ("/usr/lib/openvswitch-switch", "/usr/sbin", "/usr/local/sbin")
_TOOLS = (
    "ovsdb-tool", "ovsdb-server", "ovs-vsctl", "ovs-appctl", "ovs-ofctl",
    "ovn-northd", "ovn-controller", "ovn-nbctl", "ovn-sbctl", "ovn-appctl",
)
_DIR_VARS = (
    "OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR", "OVS_SYSCONFDIR",
    "OVN_RUNDIR", "OVN_LOGDIR", "OVN_DBDIR", "OVN_SYSCONFDIR",
)

T = TypeVar("T")


class SandboxError(RuntimeError):
    """Any failure of the sandbox; the message says what to do."""


class BinaryNotFoundError(SandboxError):
    pass


class RunDirInUseError(SandboxError):
    pass


class DaemonFailedError(SandboxError):
    pass


class CommandError(SandboxError):
    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"command failed (exit {returncode}): {' '.join(self.argv)}: {stderr.strip()}"
        )


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll predicate until it returns a truthy value and return that value.

    Exceptions listed in `ignore` count as "not yet"; the last one is quoted in the
    TimeoutError so a failure says why it never became true.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except ignore as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}{detail}")
        time.sleep(interval)


# --- binaries ------------------------------------------------------------------------


@dataclass(frozen=True)
class Binaries:
    tools: dict[str, str]
    vswitchd: str
    vswitch_schema: str
    nb_schema: str
    sb_schema: str

    def __getitem__(self, name: str) -> str:
        return self.vswitchd if name == "ovs-vswitchd" else self.tools[name]

    @classmethod
    def find(cls) -> Binaries:
        missing: list[str] = []
        tools: dict[str, str] = {}
        for tool in _TOOLS:
            path = shutil.which(tool) or _first_existing(
                f"{d}/{tool}" for d in ("/usr/sbin", "/usr/bin", "/usr/local/bin")
            )
            if path:
                tools[tool] = path
            else:
                missing.append(tool)
        vswitchd = find_vswitchd()
        if not vswitchd:
            missing.append("ovs-vswitchd")
        schemas = {
            "vswitch": _first_existing(f"{d}/vswitch.ovsschema" for d in OVS_SCHEMA_DIRS),
            "nb": _first_existing(f"{d}/ovn-nb.ovsschema" for d in OVN_SCHEMA_DIRS),
            "sb": _first_existing(f"{d}/ovn-sb.ovsschema" for d in OVN_SCHEMA_DIRS),
        }
        missing += [f"{k} schema" for k, v in schemas.items() if not v]
        if missing:
            raise BinaryNotFoundError(
                f"OVS/OVN not found: {', '.join(missing)}; {INSTALL_HINT}"
            )
        return cls(tools, vswitchd or "", schemas["vswitch"] or "", schemas["nb"] or "",
                   schemas["sb"] or "")


def _first_existing(paths: Iterable[str]) -> str | None:
    for p in paths:
        if os.access(p, os.X_OK) or (p.endswith(".ovsschema") and os.path.exists(p)):
            return p
    return None


def find_vswitchd() -> str | None:
    """$OVS_VSWITCHD, else ovs-vswitchd on PATH, else where Debian puts it (not on PATH)."""
    return os.environ.get("OVS_VSWITCHD") or shutil.which("ovs-vswitchd") or (
        _first_existing(f"{d}/ovs-vswitchd" for d in VSWITCHD_DIRS))


def binaries_available() -> tuple[bool, str]:
    """(True, "") when everything the sandbox runs is installed, else (False, why)."""
    try:
        Binaries.find()
    except BinaryNotFoundError as exc:
        return False, str(exc)
    return True, ""


# --- processes -----------------------------------------------------------------------


class ProcStat(NamedTuple):
    state: str          # "Z" (zombie) and "X" (dead) no longer run
    pgrp: int
    start_time: int     # clock ticks after boot: tells a reused pid apart


def proc_stat(pid: int) -> ProcStat | None:
    """A pid's /proc/PID/stat fields we use, or None when it does not exist."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(")") + 2:].split()
    return ProcStat(rest[0], int(rest[2]), int(rest[19]))


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """True when pid runs (not a zombie) and, if given, started at start_time."""
    stat = proc_stat(pid)
    if stat is None or stat.state in ("Z", "X"):
        return False
    return start_time is None or stat.start_time == start_time


def live_group_members(pgid: int) -> Iterator[int]:
    """Pids of the processes of group pgid that still run (zombies left out)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat.pgrp == pgid and stat.state not in ("Z", "X"):
                yield int(entry)


@dataclass
class ProcessRecord:
    """One process the sandbox started; `name` is "<component>/<program>"."""

    name: str
    pid: int
    start_time: int | None
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    pidfile: str | None = None
    log: str | None = None
    detach: bool = True
    cwd: str | None = None
    # detach=False processes lead a process group of their own: stopping one stops the
    # helpers it spawned too (e.g. an agent's `ovs-ofctl monitor`).
    pgid: int | None = None

    def alive(self) -> bool:
        return pid_alive(self.pid, self.start_time)

    def group_alive(self) -> bool:
        """Some process of its own group still runs (and the group is surely ours)."""
        if self.pgid is None:
            return False
        # A pid is never reused while a group with that id exists, so the group is ours if
        # its leader is ours or no process has that pid any more (the leader died).
        if not (self.alive() or proc_stat(self.pgid) is None):
            return False
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # killpg also reaches zombies, which a slow pid 1 may keep around for seconds
        # (an agent killed with -9 leaves its ovs-ofctl monitor as one): look closer.
        return next(live_group_members(self.pgid), None) is not None

    def running(self) -> bool:
        return self.alive() or self.group_alive()

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.group_alive():
                os.killpg(self.pgid, sig)  # type: ignore[arg-type]
            elif self.alive():
                os.kill(self.pid, sig)


def stop_records(recs: Sequence[ProcessRecord], timeout: float) -> list[str]:
    """SIGTERM those of recs that run, all at once; SIGKILL what is left after timeout.

    Returns the names of those that ran."""
    running = [r for r in recs if r.running()]
    for r in running:
        LOG.debug("stopping %s pid %d", r.name, r.pid)
        r.signal(signal.SIGTERM)

    def _all_dead() -> bool:
        for r in running:
            _reap(r.pid)
        return not any(r.running() for r in running)

    try:
        wait_until(_all_dead, timeout, 0.02, "processes to exit")
    except TimeoutError:
        for r in running:
            if r.running():
                LOG.warning("%s (pid %d) ignored SIGTERM, killing it", r.name, r.pid)
                r.signal(signal.SIGKILL)
        wait_until(_all_dead, 5.0, 0.02, "killed processes to exit")
    return [r.name for r in running]


def _reap(pid: int) -> None:
    # Only children started with detach=False can be reaped here; others belong to init.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def log_tail(path: str | None, lines: int = 20) -> str:
    if not path:
        return ""
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def dir_env(directory: Path) -> dict[str, str]:
    return {var: str(directory) for var in _DIR_VARS}


def ovs_daemon_argv(program: str, directory: Path, *args: str,
                    unixctl: bool = True, name: str | None = None) -> list[str]:
    """argv for an OVS/OVN daemon detaching itself, with every path in `directory`.

    Its pidfile, log and ctl are `<name>.pid|log|ctl` (name: the program's, by default).
    unixctl=False for daemons without --unixctl (ovn-controller 23.03): they create
    $OVN_RUNDIR/<name>.<pid>.ctl instead.
    """
    name = name or Path(program).name
    argv = [
        program, *args,
        "--detach", "--no-chdir",
        f"--pidfile={directory}/{name}.pid",
        f"--log-file={directory}/{name}.log",
        "-vconsole:off", "-vsyslog:off",
    ]
    if unixctl:
        argv.append(f"--unixctl={directory}/{name}.ctl")
    return argv


# --- ovsdb json output ---------------------------------------------------------------


def _ovsdb_value(value: Any) -> Any:
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
        kind, inner = value
        if kind == "set":
            return [_ovsdb_value(v) for v in inner]
        if kind == "map":
            return {_ovsdb_value(k): _ovsdb_value(v) for k, v in inner}
        if kind in ("uuid", "named-uuid"):
            return inner
    return value


def as_list(value: Any) -> list[Any]:
    """An optional/set column as a list (ctl JSON gives a bare value for one element)."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def parse_ctl_json(text: str) -> list[dict[str, Any]]:
    """Rows of `ovs-vsctl/ovn-sbctl --format=json list|find ...` as plain dicts.

    Maps come back as dicts, sets as lists, except that a set (or optional column) of
    exactly one element is the bare element: ["a", "b"], "a" or [].
    """
    doc = json.loads(text)
    heads = doc["headings"]
    return [{h: _ovsdb_value(v) for h, v in zip(heads, row, strict=True)} for row in doc["data"]]
