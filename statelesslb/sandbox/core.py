"""A real multi-chassis OVN in user space (dummy datapath), in a run directory of its own.

Layout of a run directory (short names: unix socket paths are limited to 107 bytes)::

    sandbox.json            manifest (see docs/sandbox.md)
    nb/  sb/                ovsdb-server + nb.db/nb.sock, sb.db/sb.sock
    northd/                 ovn-northd
    net/                    underlay + external segment: ovsdb-server, ovs-vswitchd,
                            the punix sockets chassis links connect to, client tx pcap
    gw1/ ... hv1/ ...       one chassis each: ovsdb-server, ovs-vswitchd, ovn-controller,
                            br-int.mgmt, VIF pcaps

Every daemon gets explicit --remote/--unixctl/--pidfile/--log-file paths and OVS_*/OVN_*
directory variables pointing into its own directory, so nothing touches the system's
OVS/OVN or /var/run. Every pid is recorded (with its /proc start time, so a recycled pid
is never signalled) and down() stops exactly those.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from statelesslb.sandbox import packets

LOG = logging.getLogger(__name__)

MANIFEST = "sandbox.json"
MANIFEST_VERSION = 1
# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
CLIENT_MAC = "f0:00:00:00:00:01"
CLIENT_PORT = "client"
UNDERLAY_BRIDGE = "net0"
EXTERNAL_BRIDGE = "ext"
UNDERLAY_PREFIX = "192.168.0."
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


def _proc_stat(pid: int) -> ProcStat | None:
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
    stat = _proc_stat(pid)
    if stat is None or stat.state in ("Z", "X"):
        return False
    return start_time is None or stat.start_time == start_time


def live_group_members(pgid: int) -> Iterator[int]:
    """Pids of the processes of group pgid that still run (zombies left out)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
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
        if not (self.alive() or _proc_stat(self.pgid) is None):
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


def _log_tail(path: str | None, lines: int = 20) -> str:
    if not path:
        return ""
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _dir_env(directory: Path) -> dict[str, str]:
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


def _as_list(value: Any) -> list[Any]:
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


# --- chassis -------------------------------------------------------------------------


class Chassis:
    """One simulated hypervisor or gateway: ovsdb-server, ovs-vswitchd, ovn-controller."""

    def __init__(self, sandbox: Sandbox, name: str, role: str, index: int, encap_ip: str):
        self.sandbox = sandbox
        self.name = name
        self.role = role
        self.index = index
        self.encap_ip = encap_ip
        self.rundir = sandbox.run_dir / name
        # A fixed br-phys MAC survives vswitchd restarts, so peers' neighbor entries do too.
        last = int(encap_ip.rsplit(".", 1)[1])
        self.phys_mac = f"0a:00:c0:a8:00:{last:02x}"
        self._pcaps: dict[str, str] = {}
        self._underlay_routes: set[str] = set()

    # paths
    @property
    def env(self) -> dict[str, str]:
        return _dir_env(self.rundir)

    @property
    def ovs_db(self) -> str:
        return f"unix:{self.rundir}/db.sock"

    @property
    def vswitchd_ctl(self) -> str:
        return f"{self.rundir}/ovs-vswitchd.ctl"

    @property
    def ovn_controller_ctl(self) -> str:
        return f"{self.rundir}/ovn-controller.ctl"

    def mgmt(self, bridge: str = "br-int") -> str:
        return f"unix:{self.rundir}/{bridge}.mgmt"

    @property
    def br_int(self) -> str:
        return self.mgmt("br-int")

    @property
    def is_gateway(self) -> bool:
        return self.role == "gateway"

    @property
    def pids(self) -> dict[str, int]:
        prefix = f"{self.name}/"
        return {k[len(prefix):]: r.pid for k, r in self.sandbox.processes.items()
                if k.startswith(prefix)}

    def pid_of(self, name: str) -> int:
        """Pid of this chassis' process `name` ("ovs-vswitchd", "ovn-controller", ...)."""
        try:
            return self.sandbox.processes[f"{self.name}/{name}"].pid
        except KeyError:
            raise SandboxError(f"{self.name}: no process {name!r}") from None

    def socket_paths(self) -> list[str]:
        names = ["db.sock", "ovsdb-server.ctl", "ovs-vswitchd.ctl", "ovn-controller.4194304.ctl",
                 "br-int.mgmt", "br-int.snoop", "br-phys.mgmt", "br-phys.snoop"]
        if self.is_gateway:
            names += ["br-ext.mgmt", "br-ext.snoop"]
        return [f"{self.rundir}/{n}" for n in names]

    def manifest(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "index": self.index,
            "ovs_db": self.ovs_db,
            "vswitchd_ctl": self.vswitchd_ctl,
            "br_int": self.br_int,
            "ovn_controller_ctl": self.ovn_controller_ctl,
            "encap_ip": self.encap_ip,
            "phys_mac": self.phys_mac,
            "pids": self.pids,
            "rundir": str(self.rundir),
            "env": self.env,
        }

    # commands
    def run(self, argv: Sequence[str], timeout: float = 30.0, check: bool = True) -> str:
        return self.sandbox.run(argv, env=self.env, timeout=timeout, check=check)

    def vsctl(self, *args: str, timeout: float = 30.0) -> str:
        return self.sandbox.db_ctl("ovs-vsctl", self.ovs_db, *args, timeout=timeout,
                                   env=self.env)

    def ofctl(self, command: str, *args: str, bridge: str = "br-int",
              protocol: str = "OpenFlow15", opts: Sequence[str] = ()) -> str:
        """`ovs-ofctl -O <protocol> [opts] COMMAND unix:<rundir>/<bridge>.mgmt ARGS...`"""
        return self.run([self.sandbox.bin["ovs-ofctl"], "-O", protocol, *opts, command,
                         self.mgmt(bridge), *args])

    def appctl(self, *args: str) -> str:
        """ovs-appctl against this chassis' ovs-vswitchd."""
        return self.run([self.sandbox.bin["ovs-appctl"], "-t", self.vswitchd_ctl, *args])

    def controller_appctl(self, *args: str) -> str:
        return self.run([self.sandbox.bin["ovn-appctl"], "-t", self.ovn_controller_ctl, *args])

    def trace(self, flow: str, packet: Any = None, bridge: str = "br-int") -> str:
        """`ofproto/trace BRIDGE FLOW [PACKET]`; a packet (scapy or hex) is traced as data."""
        args = ["ofproto/trace", bridge, flow]
        if packet is not None:
            args.append(packets.to_hex(packet))
        return self.appctl(*args)

    def conntrack(self) -> str:
        return self.appctl("dpctl/dump-conntrack")

    def dump_groups(self, bridge: str = "br-int") -> str:
        return self.ofctl("dump-groups", bridge=bridge)

    def dump_flows(self, *args: str, bridge: str = "br-int") -> str:
        return self.ofctl("dump-flows", *args, bridge=bridge)

    def dump_dp_flows(self) -> str:
        return self.appctl("dpctl/dump-flows")

    # ports and packets
    def bind_vif(self, iface: str, lsp_name: str, tx_pcap: bool = True,
                 bridge: str = "br-int") -> str | None:
        """Add dummy port `iface` on br-int bound to logical port `lsp_name`.

        Returns the path of its tx pcap (what OVN delivers to the VIF), if any.
        """
        args = ["--", "add-port", bridge, iface,
                "--", "set", "Interface", iface, "type=dummy",
                f"external_ids:iface-id={lsp_name}"]
        pcap = None
        if tx_pcap:
            pcap = f"{self.rundir}/{iface}-tx.pcap"
            args.append(f"options:tx_pcap={pcap}")
            self._pcaps[iface] = pcap
        self.vsctl(*args)
        return pcap

    def inject(self, port: str, packet: Any) -> None:
        """Make `packet` (scapy packet, bytes or hex) arrive on dummy port `port`."""
        self.appctl("netdev-dummy/receive", port, packets.to_hex(packet))

    def pcap_path(self, port: str) -> str | None:
        if port not in self._pcaps:
            out = self.vsctl("--if-exists", "get", "Interface", port, "options:tx_pcap")
            value = out.strip().strip('"')
            if not value:
                return None
            self._pcaps[port] = value
        return self._pcaps[port]

    def sent(self, port: str) -> list[Any]:
        """Packets the switch sent out of `port` so far (parsed from its tx pcap)."""
        path = self.pcap_path(port)
        return packets.read_pcap(path) if path else []

    # lifecycle
    def _configure_runtime(self) -> None:
        """State ovs-vswitchd keeps in memory only: re-applied after every (re)start."""
        self.appctl("netdev-dummy/ip4addr", "br-phys", f"{self.encap_ip}/24")
        routes = self.appctl("ovs/route/show")
        if f"{UNDERLAY_PREFIX}0/24 dev br-phys" not in routes:
            self.appctl("ovs/route/add", f"{UNDERLAY_PREFIX}0/24", "br-phys")
        for peer in self.sandbox.chassis.values():
            if peer is not self:
                self.appctl("tnl/neigh/set", "br-phys", peer.encap_ip, peer.phys_mac)
        self._underlay_routes = self._br_phys_routes()

    def _br_phys_routes(self) -> set[str]:
        return {line.split(":", 1)[-1].strip()
                for line in self.appctl("ovs/route/show").splitlines()
                if "dev br-phys" in line}

    def underlay_intact(self) -> bool:
        """Are the underlay routes that _configure_runtime() left still there?

        OVS 3.5's `netdev-dummy/ip4addr` adds a route marked "local" that no command can
        add back, and a tunnel whose local_ip (set by OVN 25.03) has no local route sends
        nothing. ovs-vswitchd flushes such routes whenever a Linux link changes on the
        machine (the netns mode's veths): then BFD stays down for good. (OVS 3.1 makes no
        such route and needs none: nothing to lose there.)
        """
        return self._underlay_routes <= self._br_phys_routes()

    def _db_setup_args(self) -> list[str]:
        sbx = self.sandbox
        args = [
            "--", "add-br", "br-phys",
            "--", "set", "Bridge", "br-phys", "datapath_type=dummy",
            f"other_config:hwaddr={self.phys_mac}",
            "--", "add-port", "br-phys", "phys-net",
            "--", "set", "Interface", "phys-net", "type=dummy",
            f"options:stream=unix:{sbx.net_dir}/{self.name}.sock",
            "--", "add-br", "br-int",
            "--", "set", "Bridge", "br-int", "datapath_type=dummy", "fail-mode=secure",
            "other_config:disable-in-band=true",
            "--", "set", "Open_vSwitch", ".",
            f"external_ids:system-id={self.name}",
            f"external_ids:hostname={self.name}",
            f"external_ids:ovn-remote={sbx.sb}",
            "external_ids:ovn-encap-type=geneve",
            f"external_ids:ovn-encap-ip={self.encap_ip}",
            "external_ids:ovn-bridge=br-int",
        ]
        if self.is_gateway:
            args += [
                "--", "add-br", "br-ext",
                "--", "set", "Bridge", "br-ext", "datapath_type=dummy",
                "--", "add-port", "br-ext", "ext-net",
                "--", "set", "Interface", "ext-net", "type=dummy",
                f"options:stream=unix:{sbx.net_dir}/{self.name}-x.sock",
                "--", "set", "Open_vSwitch", ".",
                f"external_ids:ovn-bridge-mappings={sbx.physnet}:br-ext",
                "external_ids:ovn-cms-options=enable-chassis-as-gw",
            ]
        return args

    def _start(self) -> None:
        sbx = self.sandbox
        self.rundir.mkdir(parents=True, exist_ok=True)
        sbx._start_ovsdb(f"{self.name}/ovsdb-server", self.rundir, "conf.db",
                         sbx.bin.vswitch_schema, "db.sock")
        # Configure the database before ovs-vswitchd starts: its --detach returns only
        # once it applied this first configuration, so every bridge then exists.
        self.vsctl("--no-wait", "init", *self._db_setup_args())
        self._start_vswitchd()
        self._start_controller()

    def _start_vswitchd(self) -> None:
        self.sandbox.start_daemon(f"{self.name}/ovs-vswitchd", self.sandbox.bin.vswitchd,
                                  self.rundir, self.ovs_db, self.sandbox.enable_dummy_arg,
                                  "-vvconn:warn")
        # The database's mac_in_use can lag for seconds after a restart: ask the switch.
        wait_until(lambda: f"LOCAL(br-phys): addr:{self.phys_mac}"
                   in self.ofctl("show", bridge="br-phys"), 10.0, 0.05,
                   f"{self.name}: br-phys to take MAC {self.phys_mac}", ignore=(CommandError,))
        self._configure_runtime()

    def _start_controller(self) -> None:
        rec = self.sandbox.start_daemon(f"{self.name}/ovn-controller",
                                        self.sandbox.bin["ovn-controller"], self.rundir,
                                        self.ovs_db, unixctl=False)
        # 23.03 has no --unixctl: give its per-pid socket a stable name for tools.
        link = Path(self.ovn_controller_ctl)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(f"ovn-controller.{rec.pid}.ctl")

    def wait_controller_connected(self, timeout: float = 30.0) -> None:
        wait_until(lambda: self.controller_appctl("connection-status").strip() == "connected",
                   timeout, 0.05, f"{self.name}: ovn-controller connected to the SB",
                   ignore=(CommandError,))

    def restart_ovn_controller(self, timeout: float = 30.0) -> None:
        """Stop ovn-controller (SIGTERM keeps its Chassis row) and start it again.

        Returns once it is connected and the sandbox settled (see Sandbox.wait_settled).
        """
        self.sandbox.stop_process(f"{self.name}/ovn-controller")
        self._start_controller()
        self.wait_controller_connected(timeout)
        self.sandbox.wait_settled(timeout)

    def restart_vswitchd(self, timeout: float = 30.0) -> None:
        """Stop ovs-vswitchd and start it on the same database.

        Re-applies the in-memory state (underlay address, route, tunnel neighbors) and
        returns once ovn-controller reinstalled its flows, BFD is up again everywhere
        and gateway ports are back on their preferred chassis.
        """
        self.sandbox.stop_process(f"{self.name}/ovs-vswitchd")
        self._start_vswitchd()
        # ovn-controller reconnects with a backoff; br-int has no flows until it does.
        wait_until(lambda: "actions=" in self.dump_flows("table=0"), timeout, 0.1,
                   f"{self.name}: ovn-controller reinstalling flows on br-int",
                   ignore=(CommandError,))
        self.sandbox.wait_settled(timeout)

    def tunnels(self) -> list[dict[str, Any]]:
        """br-int tunnel interfaces: name, type, remote_ip, status."""
        out = self.vsctl("--format=json", "--columns=name,type,options,status",
                         "find", "Interface", "type=geneve")
        return [{"name": r["name"], "type": r["type"],
                 "remote_ip": r["options"].get("remote_ip"), "status": r["status"]}
                for r in parse_ctl_json(out)]

    def bfd_sessions(self) -> dict[str, dict[str, str]]:
        """Live BFD sessions from `bfd/show`: {iface: {"state", "forwarding", "remote_state"}}.

        The database's bfd_status lags (and is stale right after a restart); this does not.
        """
        sessions: dict[str, dict[str, str]] = {}
        cur: dict[str, str] = {}
        for line in self.appctl("bfd/show").splitlines():
            line = line.strip()
            if line.startswith("----"):
                cur = sessions.setdefault(line.strip("- "), {})
            elif line.startswith("Forwarding:"):
                cur["forwarding"] = line.split(":", 1)[1].strip()
            elif line.startswith("Local Session State:"):
                cur["state"] = line.split(":", 1)[1].strip()
            elif line.startswith("Remote Session State:"):
                cur["remote_state"] = line.split(":", 1)[1].strip()
        return sessions

    def bfd_up(self) -> bool:
        """Every BFD session (OVN enables them towards gateways) is up and forwarding,
        both live and in the database's bfd_status, which is what ovn-controller reads."""
        live = self.bfd_sessions()
        if not all(s.get("state") == "up" and s.get("forwarding") == "true"
                   for s in live.values()):
            return False
        out = self.vsctl("--format=json", "--columns=name,bfd,bfd_status",
                         "find", "Interface", "type=geneve")
        db = {r["name"]: r["bfd_status"] for r in parse_ctl_json(out)
              if r["bfd"].get("enable") == "true"}
        return set(db) == set(live) and all(
            s.get("state") == "up" and s.get("forwarding") == "true" for s in db.values())

    def tunnels_up(self) -> bool:
        """Tunnels to every peer exist and route out of a br-phys that has carrier."""
        peers = {c.encap_ip for c in self.sandbox.chassis.values() if c is not self}
        up = {t["remote_ip"] for t in self.tunnels()
              if t["status"].get("tunnel_egress_iface") == "br-phys"
              and t["status"].get("tunnel_egress_iface_carrier") == "up"}
        return peers <= up

    def __repr__(self) -> str:
        return f"Chassis({self.name!r}, role={self.role!r}, encap_ip={self.encap_ip!r})"


# --- sandbox -------------------------------------------------------------------------


class Sandbox:
    """A real OVN (NB, SB, northd, gateways, hypervisors) on the dummy datapath.

    Use as a context manager (up() on entry, down() on exit), e.g.
    `with Sandbox(Path("/tmp/slb-x"), gateways=2, hypervisors=2) as sb: sb.nbctl("show")`.
    """

    def __init__(self, run_dir: Path | str, gateways: int = 2, hypervisors: int = 2,
                 physnet: str = "physnet1", *, client_mac: str = CLIENT_MAC,
                 timeout: float = 60.0, enable_dummy: str = "system"):
        if enable_dummy not in ("system", ""):
            raise SandboxError(f"enable_dummy must be 'system' or '', not {enable_dummy!r}")
        if gateways < 0 or hypervisors < 0 or gateways + hypervisors == 0:
            raise SandboxError("a sandbox needs at least one chassis")
        if gateways > 89 or hypervisors > 150:
            raise SandboxError("at most 89 gateways and 150 hypervisors")
        self.run_dir = Path(run_dir).absolute()
        self.gateways = gateways
        self.hypervisors = hypervisors
        self.physnet = physnet
        self.client_mac = client_mac
        self.timeout = timeout
        # ovs-vswitchd's dummy level. "system" (--enable-dummy=system) turns ports of type
        # "" into dummy ports; "" (plain --enable-dummy) keeps type "" a real Linux netdev,
        # which the netns mode (statelesslb.sandbox.netns) needs to attach veths. Either
        # way the bridges use datapath_type=dummy and the sandbox's own dummy ports say
        # type=dummy explicitly.
        self.enable_dummy = enable_dummy
        self.timings: dict[str, float] = {}
        self.processes: dict[str, ProcessRecord] = {}
        # Reserved for the lead's statelesslb-agent bookkeeping (written verbatim).
        self.agents: dict[str, Any] = {}
        # Reserved for statelesslb.sandbox.netns: the namespaces and links it created
        # (written verbatim); down() has that module remove them.
        self.netns: dict[str, Any] = {}
        self._bin: Binaries | None = None
        self._lock = threading.RLock()
        self.chassis: dict[str, Chassis] = {}
        for i in range(1, gateways + 1):
            self.chassis[f"gw{i}"] = Chassis(self, f"gw{i}", "gateway", i,
                                             f"{UNDERLAY_PREFIX}{10 + i}")
        for i in range(1, hypervisors + 1):
            self.chassis[f"hv{i}"] = Chassis(self, f"hv{i}", "hypervisor", i,
                                             f"{UNDERLAY_PREFIX}{100 + i}")

    # paths
    @property
    def bin(self) -> Binaries:
        if self._bin is None:
            self._bin = Binaries.find()
        return self._bin

    @property
    def enable_dummy_arg(self) -> str:
        return f"--enable-dummy={self.enable_dummy}" if self.enable_dummy else "--enable-dummy"

    @property
    def manifest_path(self) -> Path:
        return self.run_dir / MANIFEST

    @property
    def net_dir(self) -> Path:
        return self.run_dir / "net"

    @property
    def nb(self) -> str:
        return f"unix:{self.run_dir}/nb/nb.sock"

    @property
    def sb(self) -> str:
        return f"unix:{self.run_dir}/sb/sb.sock"

    @property
    def net_ctl(self) -> str:
        return f"{self.net_dir}/ovs-vswitchd.ctl"

    @property
    def net_db(self) -> str:
        return f"unix:{self.net_dir}/db.sock"

    @property
    def northd_ctl(self) -> str:
        return f"{self.run_dir}/northd/ovn-northd.ctl"

    @property
    def client_pcap(self) -> str:
        return f"{self.net_dir}/{CLIENT_PORT}-tx.pcap"

    @property
    def gateway_chassis(self) -> list[Chassis]:
        return [c for c in self.chassis.values() if c.is_gateway]

    @property
    def hypervisor_chassis(self) -> list[Chassis]:
        return [c for c in self.chassis.values() if not c.is_gateway]

    @property
    def pids(self) -> dict[str, int]:
        return {k: r.pid for k, r in self.processes.items()}

    def socket_paths(self) -> list[str]:
        net, run = self.net_dir, self.run_dir
        paths = [self.nb[5:], self.sb[5:], f"{run}/nb/ovsdb-server.ctl",
                 f"{run}/sb/ovsdb-server.ctl", self.northd_ctl,
                 self.net_db[5:], f"{net}/ovsdb-server.ctl", self.net_ctl,
                 f"{net}/{UNDERLAY_BRIDGE}.snoop", f"{net}/{EXTERNAL_BRIDGE}.mgmt"]
        for c in self.chassis.values():
            paths += c.socket_paths()
            paths.append(f"{self.net_dir}/{c.name}{'-x' if c.is_gateway else ''}.sock")
        return paths

    def check_paths(self) -> None:
        longest = max(self.socket_paths(), key=len)
        if len(longest.encode()) > MAX_SOCKET_PATH:
            room = MAX_SOCKET_PATH - (len(longest.encode()) - len(str(self.run_dir).encode()))
            raise SandboxError(
                f"run dir {self.run_dir} is too long for unix sockets: {longest} is "
                f"{len(longest.encode())} bytes (max {MAX_SOCKET_PATH}); use a run dir of "
                f"at most {room} bytes, e.g. under /tmp")

    # commands
    def run(self, argv: Sequence[str], env: dict[str, str] | None = None,
            timeout: float = 30.0, check: bool = True) -> str:
        full_env = dict(os.environ)
        full_env.update(env or {})
        LOG.debug("run %s", argv)
        try:
            proc = subprocess.run(list(argv), env=full_env, capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise CommandError(argv, -1, "", f"timed out after {timeout}s") from exc
        except FileNotFoundError as exc:
            raise BinaryNotFoundError(f"{argv[0]} not found; {INSTALL_HINT}") from exc
        if check and proc.returncode != 0:
            raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout

    def db_ctl(self, tool: str, db: str, *args: str, timeout: float = 30.0,
               env: dict[str, str] | None = None) -> str:
        """`TOOL --db=DB --timeout=T ARGS` (ovs-vsctl, ovn-nbctl, ovn-sbctl); the process
        gets 5 s more, so the tool's own timeout error is the one reported."""
        return self.run([self.bin[tool], f"--db={db}", f"--timeout={max(1, int(timeout))}",
                         *args], env=env, timeout=timeout + 5)

    def nbctl(self, *args: str, timeout: float = 30.0) -> str:
        return self.db_ctl("ovn-nbctl", self.nb, *args, timeout=timeout)

    def sbctl(self, *args: str, timeout: float = 30.0) -> str:
        return self.db_ctl("ovn-sbctl", self.sb, *args, timeout=timeout)

    def net_vsctl(self, *args: str) -> str:
        """ovs-vsctl on the underlay/external network's database."""
        return self.db_ctl("ovs-vsctl", self.net_db, *args, env=_dir_env(self.net_dir))

    def net_appctl(self, *args: str) -> str:
        return self.run([self.bin["ovs-appctl"], "-t", self.net_ctl, *args])

    def northd_appctl(self, *args: str) -> str:
        return self.run([self.bin["ovn-appctl"], "-t", self.northd_ctl, *args])

    def sb_rows(self, table: str, *conditions: str,
                columns: Sequence[str] = ()) -> list[dict[str, Any]]:
        """SB rows (optionally `find` conditions such as "name=gw1") as dicts."""
        args = ["--format=json"]
        if columns:
            args.append(f"--columns={','.join(columns)}")
        args += ["find", table, *conditions]
        return parse_ctl_json(self.sbctl(*args))

    def registered_chassis(self) -> set[str]:
        return {r["name"] for r in self.sb_rows("Chassis", columns=["name"])}

    def wait_flows_installed(self, timeout: float = 30.0) -> float:
        """Block until every ovn-controller installed the current NB state (hv_cfg).

        Returns the seconds it took.
        """
        t0 = time.monotonic()
        self.nbctl("--wait=hv", "sync", timeout=timeout)
        return time.monotonic() - t0

    def wait_bfd_up(self, timeout: float = 30.0) -> None:
        """Wait until every chassis' BFD sessions are up.

        Until then ovn-controller's active_backup bundle towards the gateways drops
        traffic (no live member). A restarted side is up only after its peers cycled
        through down and back up, so checking everyone after a restart is race free.
        """
        for c in self.chassis.values():
            try:
                wait_until(c.bfd_up, timeout, 0.05, f"{c.name}: BFD sessions up",
                           ignore=(CommandError,))
            except TimeoutError as exc:
                lost = [x.name for x in self.chassis.values() if not x.underlay_intact()]
                if lost:
                    raise TimeoutError(
                        f"{exc}; underlay routes flushed on {', '.join(lost)} (a Linux "
                        "link changed: Sandbox.restore_underlay(), docs/sandbox.md)"
                    ) from exc
                raise

    def wait_gateways_settled(self, timeout: float = 30.0) -> None:
        """Wait until every chassisredirect port is bound to the highest-priority
        chassis of its HA chassis group (where it goes when every chassis is alive)."""

        def settled() -> bool:
            chassis = {r["_uuid"]: r["name"] for r in
                       self.sb_rows("Chassis", columns=["_uuid", "name"])}
            ha = {r["_uuid"]: (r["priority"], r["chassis"]) for r in
                  self.sb_rows("HA_Chassis", columns=["_uuid", "priority", "chassis"])}
            groups = {r["_uuid"]: r["ha_chassis"] for r in
                      self.sb_rows("HA_Chassis_Group", columns=["_uuid", "ha_chassis"])}
            for pb in self.sb_rows("Port_Binding", "type=chassisredirect",
                                   columns=["logical_port", "chassis", "ha_chassis_group"]):
                members = [ha[u] for u in _as_list(groups.get(pb["ha_chassis_group"]))
                           if u in ha and ha[u][1] in chassis]
                if members and pb["chassis"] != max(members, key=lambda m: m[0])[1]:
                    return False
            return True

        wait_until(settled, timeout, 0.05, "gateway ports bound to their preferred chassis",
                   ignore=(CommandError,))

    def wait_settled(self, timeout: float = 30.0) -> None:
        """Flows installed everywhere, BFD up, gateway ports on their preferred chassis.

        While BFD sessions come up (start, vswitchd restart) gateways claim and release
        chassisredirect ports back and forth; this returns once that is over.
        """
        self.wait_flows_installed(timeout)
        self.wait_bfd_up(timeout)
        self.wait_gateways_settled(timeout)
        # A barrier: every ovn-controller has processed the final BFD state, so no
        # stale claim is in flight when we look again.
        self.wait_flows_installed(timeout)
        self.wait_gateways_settled(timeout)
        self.flush_external_fdb()

    def flush_external_fdb(self) -> None:
        """Forget the MACs learned on the external segment and every gateway's br-ext.

        While gateways claim a chassisredirect port in turn, their GARPs teach the
        segment (and the other gateways' br-ext, on its uplink port) the router MAC at
        the wrong place; NORMAL then drops the client's frames until the next GARP.
        """
        if not self.gateway_chassis:
            return
        self.net_appctl("fdb/flush", EXTERNAL_BRIDGE)
        for gw in self.gateway_chassis:
            gw.appctl("fdb/flush", "br-ext")

    # external client
    def client_inject(self, packet: Any) -> None:
        """Send `packet` from the external client (onto the external segment)."""
        self.net_appctl("netdev-dummy/receive", CLIENT_PORT, packets.to_hex(packet))

    def client_received(self) -> list[Any]:
        """Packets the external client received so far."""
        return packets.read_pcap(self.client_pcap)

    # processes
    def start_daemon(self, name: str, program: str, directory: Path, *args: str,
                     unixctl: bool = True) -> ProcessRecord:
        """Start the OVS/OVN daemon `name` ("<component>/<daemon>"), which detaches, with
        its environment, pidfile, log (and ctl) in `directory`, named after <daemon>."""
        daemon = name.rsplit("/", 1)[-1]
        return self.start_process(
            name, ovs_daemon_argv(program, directory, *args, unixctl=unixctl, name=daemon),
            env=_dir_env(directory), pidfile=f"{directory}/{daemon}.pid",
            log=f"{directory}/{daemon}.log", cwd=str(directory))

    def start_process(self, name: str, argv: Sequence[str], *,
                      env: dict[str, str] | None = None, pidfile: str | None = None,
                      log: str | None = None, detach: bool = True, cwd: str | None = None,
                      ready: Callable[[], bool] | None = None,
                      timeout: float = 30.0) -> ProcessRecord:
        """Start a process and record it in the manifest under `name` ("gw1/my-agent").

        detach=True: `argv` daemonizes itself and writes `pidfile` (OVS style --detach);
        the call returns when the launcher exits and records the daemon's pid.
        detach=False: the process is spawned in a session of its own with stdout and
        stderr appended to `log`; it survives this Python process.
        `ready`, if given, is polled until true (the process dying first is an error).
        Failures raise DaemonFailedError with the tail of `log`.
        """
        with self._lock:
            if name in self.processes and self.processes[name].running():
                raise SandboxError(f"process {name} already runs (pid {self.processes[name].pid})")
        if detach and not pidfile:
            raise SandboxError(f"{name}: detach=True needs a pidfile")
        full_env = dict(os.environ)
        full_env.update(env or {})
        LOG.debug("starting %s: %s", name, argv)
        if detach:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pidfile)  # type: ignore[arg-type]
            try:
                proc = subprocess.run(list(argv), env=full_env, cwd=cwd, capture_output=True,
                                      text=True, timeout=timeout, check=False)
            except subprocess.TimeoutExpired as exc:
                raise DaemonFailedError(self._failure(name, f"did not detach in {timeout}s",
                                                      log)) from exc
            except FileNotFoundError as exc:
                raise BinaryNotFoundError(f"{argv[0]} not found; {INSTALL_HINT}") from exc
            if proc.returncode != 0:
                raise DaemonFailedError(self._failure(
                    name, f"exit {proc.returncode}: {proc.stderr.strip()}", log))
            try:
                pid = int(Path(pidfile).read_text().split()[0])  # type: ignore[arg-type]
            except (OSError, ValueError, IndexError) as exc:
                raise DaemonFailedError(self._failure(name, f"no pid in {pidfile}", log)) from exc
        else:
            logf = open(log or os.devnull, "ab")  # noqa: SIM115 - handed to the child
            try:
                popen = subprocess.Popen(list(argv), env=full_env, cwd=cwd,
                                         stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                         start_new_session=True)
            except FileNotFoundError as exc:
                raise BinaryNotFoundError(f"{argv[0]} not found; {INSTALL_HINT}") from exc
            finally:
                logf.close()
            pid = popen.pid
            if pidfile:
                Path(pidfile).write_text(f"{pid}\n")
        stat = _proc_stat(pid)
        rec = ProcessRecord(name=name, pid=pid, start_time=stat.start_time if stat else None,
                            argv=list(argv), env=dict(env or {}), pidfile=pidfile, log=log,
                            detach=detach, cwd=cwd, pgid=None if detach else pid)
        with self._lock:
            self.processes[name] = rec
            self.save()
        if not rec.alive():
            raise DaemonFailedError(self._failure(name, f"pid {pid} died right away", log))
        if ready is not None:
            def _ready() -> bool:
                if not rec.alive():
                    raise DaemonFailedError(self._failure(name, "died while starting", log))
                return ready()
            wait_until(_ready, timeout, 0.05, f"{name} to be ready")
        LOG.debug("started %s pid %d", name, pid)
        return rec

    def _failure(self, name: str, why: str, log: str | None) -> str:
        tail = _log_tail(log)
        msg = f"{name} failed to start: {why}"
        if tail:
            msg += f"\n--- last lines of {log} ---\n{tail}"
        return msg

    def start_again(self, name: str, extra_args: Sequence[str] = ()) -> ProcessRecord:
        """Start the stopped process `name` as it was recorded, `extra_args` appended."""
        rec = self.processes.get(name)
        if rec is None:
            raise SandboxError(f"no process named {name}")
        return self.start_process(name, [*rec.argv, *extra_args], env=rec.env,
                                  pidfile=rec.pidfile, log=rec.log, detach=rec.detach,
                                  cwd=rec.cwd)

    def stop_process(self, name: str, timeout: float = 5.0) -> bool:
        """Stop the recorded process `name` (SIGTERM, then SIGKILL after `timeout`).

        Returns True when it was running. The record stays (for the manifest's history).
        """
        rec = self.processes.get(name)
        if rec is None:
            raise SandboxError(f"no process named {name}")
        return bool(stop_records([rec], timeout))

    def is_running(self, name: str) -> bool:
        rec = self.processes.get(name)
        return bool(rec and rec.running())

    # manifest
    def manifest(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "run_dir": str(self.run_dir),
            "nb": self.nb,
            "sb": self.sb,
            "northd_ctl": self.northd_ctl,
            "physnet": self.physnet,
            "gateways": self.gateways,
            "hypervisors": self.hypervisors,
            "underlay": {
                "ovs_db": self.net_db,
                "vswitchd_ctl": self.net_ctl,
                "bridge": UNDERLAY_BRIDGE,
                "cidr": f"{UNDERLAY_PREFIX}0/24",
            },
            "chassis": {n: c.manifest() for n, c in self.chassis.items()},
            "external": {
                "physnet": self.physnet,
                "bridge": EXTERNAL_BRIDGE,
                "client": {
                    "vswitchd_ctl": self.net_ctl,
                    "port": CLIENT_PORT,
                    "tx_pcap": self.client_pcap,
                    "mac": self.client_mac,
                },
            },
            "pids": self.pids,
            "processes": {n: asdict(r) for n, r in self.processes.items()},
            "agents": self.agents,
            "enable_dummy": self.enable_dummy,
            "netns": self.netns,
            "timings": self.timings,
        }

    def save(self) -> None:
        """Write the manifest atomically (readers never see half a file)."""
        with self._lock:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.manifest_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.manifest(), indent=2) + "\n")
            tmp.replace(self.manifest_path)

    @classmethod
    def stop_dir(cls, run_dir: Path | str) -> list[str]:
        """Stop what the sandbox in `run_dir` left running (nothing if it holds none)."""
        if not (Path(run_dir) / MANIFEST).exists():
            return []
        return cls.load(run_dir).down()

    @classmethod
    def load(cls, run_dir: Path | str) -> Sandbox:
        """Rebuild a Sandbox from the manifest in `run_dir` (its processes may be dead)."""
        path = Path(run_dir).absolute() / MANIFEST
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise SandboxError(f"no sandbox in {run_dir} ({MANIFEST} not found)") from None
        except (OSError, ValueError) as exc:
            raise SandboxError(f"cannot read {path}: {exc}") from exc
        if doc.get("version") != MANIFEST_VERSION:
            raise SandboxError(f"{path}: unsupported manifest version {doc.get('version')}")
        sbx = cls(doc["run_dir"], doc["gateways"], doc["hypervisors"], doc["physnet"],
                  client_mac=doc["external"]["client"]["mac"],
                  enable_dummy=doc.get("enable_dummy", "system"))
        sbx.processes = {n: ProcessRecord(**r) for n, r in doc.get("processes", {}).items()}
        sbx.agents = doc.get("agents", {})
        sbx.netns = doc.get("netns", {})
        sbx.timings = doc.get("timings", {})
        return sbx

    # lifecycle
    def _start_ovsdb(self, name: str, directory: Path, db: str, schema: str,
                     sock: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.run([self.bin["ovsdb-tool"], "create", f"{directory}/{db}", schema],
                 env=_dir_env(directory))
        self.start_daemon(name, self.bin["ovsdb-server"], directory, f"{directory}/{db}",
                          f"--remote=punix:{directory}/{sock}")

    def _check_run_dir(self) -> None:
        if self.manifest_path.exists():
            try:
                old = Sandbox.load(self.run_dir)
            except SandboxError:
                old = None
            if old is not None:
                alive = [n for n, r in old.processes.items() if r.running()]
                if alive:
                    more = f" and {len(alive) - 3} more" if len(alive) > 3 else ""
                    raise RunDirInUseError(
                        f"run dir {self.run_dir} is in use: {', '.join(alive[:3])}{more} "
                        f"still run; stop them with `statelesslb-sandbox down --dir "
                        f"{self.run_dir}` first")
            # A stopped sandbox: start afresh (its databases would clash).
            for sub in ("nb", "sb", "northd", "net", *(p.name for p in self.run_dir.iterdir()
                                                        if p.is_dir() and p.name[:2] in
                                                        ("gw", "hv"))):
                shutil.rmtree(self.run_dir / sub, ignore_errors=True)
            self.manifest_path.unlink()
        elif self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise SandboxError(
                f"run dir {self.run_dir} is not empty and holds no {MANIFEST}: "
                "use an empty or new directory")

    def up(self) -> Sandbox:
        """Start everything; return once every chassis is registered in the SB."""
        self.bin  # noqa: B018 - fail early, before touching the run dir
        self.check_paths()
        self._check_run_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        self.timings = {}
        try:
            self._up(t0)
        except BaseException:
            LOG.error("sandbox start failed, stopping what was started")
            with contextlib.suppress(Exception):
                self.down()
            raise
        return self

    def _up(self, t0: float) -> None:
        # Central and network parts are independent: start them side by side.
        with ThreadPoolExecutor(max_workers=4) as pool:
            futs = [pool.submit(self._start_central), pool.submit(self._start_network)]
            for f in futs:
                f.result()
        self.timings["central"] = time.monotonic() - t0
        with ThreadPoolExecutor(max_workers=max(1, len(self.chassis))) as pool:
            for f in [pool.submit(c._start) for c in self.chassis.values()]:
                f.result()
        self.timings["processes"] = time.monotonic() - t0
        wait_until(lambda: set(self.chassis) <= self.registered_chassis(), self.timeout, 0.05,
                   f"chassis {', '.join(self.chassis)} to register in the SB",
                   ignore=(CommandError,))
        self.timings["registered"] = time.monotonic() - t0
        for c in self.chassis.values():
            wait_until(c.tunnels_up, self.timeout, 0.05,
                       f"{c.name}: geneve tunnels to every peer", ignore=(CommandError,))
        self.timings["tunnels"] = time.monotonic() - t0
        self.save()
        LOG.info("sandbox %s up: %d chassis registered in %.2fs", self.run_dir,
                 len(self.chassis), self.timings["registered"])

    def _start_central(self) -> None:
        for db, schema in (("nb", self.bin.nb_schema), ("sb", self.bin.sb_schema)):
            self._start_ovsdb(f"{db}/ovsdb-server", self.run_dir / db, f"{db}.db", schema,
                              f"{db}.sock")
        self.nbctl("--no-wait", "init")
        self.sbctl("init")
        northd = self.run_dir / "northd"
        northd.mkdir(exist_ok=True)
        self.start_daemon("northd/ovn-northd", self.bin["ovn-northd"], northd,
                          f"--ovnnb-db={self.nb}", f"--ovnsb-db={self.sb}")

    def _start_network(self) -> None:
        net = self.net_dir
        self._start_ovsdb("net/ovsdb-server", net, "conf.db", self.bin.vswitch_schema,
                          "db.sock")
        args = ["--no-wait", "init",
                "--", "add-br", UNDERLAY_BRIDGE,
                "--", "set", "Bridge", UNDERLAY_BRIDGE, "datapath_type=dummy",
                "--", "add-br", EXTERNAL_BRIDGE,
                "--", "set", "Bridge", EXTERNAL_BRIDGE, "datapath_type=dummy",
                "--", "add-port", EXTERNAL_BRIDGE, CLIENT_PORT,
                "--", "set", "Interface", CLIENT_PORT, "type=dummy",
                f"options:tx_pcap={self.client_pcap}"]
        for c in self.chassis.values():
            ports = [(UNDERLAY_BRIDGE, c.name)]
            if c.is_gateway:
                ports.append((EXTERNAL_BRIDGE, f"{c.name}-x"))
            for bridge, port in ports:
                args += ["--", "add-port", bridge, port,
                         "--", "set", "Interface", port, "type=dummy",
                         f"options:pstream=punix:{net}/{port}.sock"]
        self.net_vsctl(*args)
        self.start_daemon("net/ovs-vswitchd", self.bin.vswitchd, net, self.net_db,
                          self.enable_dummy_arg, "-vvconn:warn")

    def restore_underlay(self, quiet: float = 0.3, timeout: float = 10.0) -> None:
        """After a Linux link change (a veth of the netns mode): re-apply the underlay
        state ovs-vswitchd flushed (Chassis.underlay_intact); returns once every chassis'
        stayed intact for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            time.sleep(quiet)  # ovs-vswitchd handles link notifications in its main loop
            broken = [c for c in self.chassis.values() if not c.underlay_intact()]
            if not broken:
                return
            if time.monotonic() > deadline:
                raise SandboxError("underlay routes keep disappearing on "
                                   + ", ".join(c.name for c in broken))
            for c in broken:
                LOG.info("%s: underlay routes flushed by ovs-vswitchd, re-applying", c.name)
                c._configure_runtime()

    def down(self, timeout: float = 5.0) -> list[str]:
        """Stop every recorded process that still runs; return their names.

        All get SIGTERM at once (they do not depend on each other to exit), stragglers
        SIGKILL after `timeout`. The run directory (logs, databases, pcaps) stays.
        """
        with self._lock:
            recs = list(self.processes.values())
        stopped = stop_records(recs, timeout)
        if self.netns:
            # Hook for the netns mode: remove the namespaces and veths it recorded, now
            # that the processes running in them are stopped. Imported here so that core
            # needs no pyroute2; cleanup() logs failures instead of raising.
            from statelesslb.sandbox.netns import cleanup

            cleanup(self)
        if self.manifest_path.exists() or stopped:
            self.save()
        if stopped:
            LOG.info("sandbox %s down: stopped %d processes", self.run_dir, len(stopped))
        return stopped

    def status(self) -> dict[str, Any]:
        """Each recorded process alive or not, and each chassis' SB registration."""
        procs = {n: {"pid": r.pid, "alive": r.running()} for n, r in self.processes.items()}
        registered: set[str] = set()
        sb_alive = procs.get("sb/ovsdb-server", {}).get("alive", False)
        if sb_alive:
            with contextlib.suppress(SandboxError):
                registered = self.registered_chassis()
        chassis = {}
        for name, c in self.chassis.items():
            own = {k: v for k, v in procs.items() if k.startswith(f"{name}/")}
            chassis[name] = {"role": c.role, "registered": name in registered,
                             "alive": bool(own) and all(p["alive"] for p in own.values())}
        return {
            "run_dir": str(self.run_dir),
            "running": bool(procs) and all(p["alive"] for p in procs.values())
            and all(c["registered"] for c in chassis.values()),
            "processes": procs,
            "chassis": chassis,
            "nb": self.nb,
            "sb": self.sb,
        }

    def __enter__(self) -> Sandbox:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def __repr__(self) -> str:
        return (f"Sandbox({str(self.run_dir)!r}, gateways={self.gateways}, "
                f"hypervisors={self.hypervisors})")
