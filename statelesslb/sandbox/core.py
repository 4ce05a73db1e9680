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
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from statelesslb.sandbox import namespaces, packets
from statelesslb.sandbox.chassis import UNDERLAY_PREFIX, Chassis
from statelesslb.sandbox.processes import (
    INSTALL_HINT,
    Binaries,
    BinaryNotFoundError,
    CommandError,
    DaemonFailedError,
    ProcessRecord,
    RunDirInUseError,
    SandboxError,
    as_list,
    dir_env,
    log_tail,
    ovs_daemon_argv,
    parse_ctl_json,
    proc_stat,
    stop_records,
    wait_until,
)

LOG = logging.getLogger(__name__)

MANIFEST = "sandbox.json"
MANIFEST_VERSION = 1
# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
CLIENT_MAC = "f0:00:00:00:00:01"
CLIENT_PORT = "client"
UNDERLAY_BRIDGE = "net0"
EXTERNAL_BRIDGE = "ext"


# --- sandbox -------------------------------------------------------------------------


class Sandbox:
    """A real OVN (NB, SB, northd, gateways, hypervisors) on the dummy datapath.

    Use as a context manager (up() on entry, down() on exit), e.g.
    `with Sandbox(Path("/tmp/slb-x"), gateways=2, hypervisors=2) as sb: sb.nbctl("show")`.
    """

    def __init__(self, run_dir: Path | str, gateways: int = 2, hypervisors: int = 2,
                 physnet: str = "physnet1", *, client_mac: str = CLIENT_MAC,
                 timeout: float = 60.0, enable_dummy: str = "system",
                 clustered: bool = False, external_hypervisors: bool = False):
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
        # Hypervisors on the external segment too (a br-ext with the physnet's bridge
        # mapping and a chassis MAC of their own), as where replies may leave a backend's
        # chassis directly (options:stateless_return=direct).
        self.external_hypervisors = external_hypervisors
        # clustered: NB and SB each a 3-member RAFT cluster (statelesslb.sandbox.cluster).
        self.clusters: dict[str, Any] = {}
        if clustered:
            from statelesslb.sandbox.cluster import Cluster

            self.clusters = {db: Cluster(self, db) for db in ("nb", "sb")}
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
    def clustered(self) -> bool:
        return bool(self.clusters)

    @property
    def nb(self) -> str:
        """The NB remote: with clusters, every member comma separated."""
        if self.clusters:
            return self.clusters["nb"].remote
        return f"unix:{self.run_dir}/nb/nb.sock"

    @property
    def sb(self) -> str:
        if self.clusters:
            return self.clusters["sb"].remote
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
        if self.clusters:
            central = [p for c in self.clusters.values() for p in c.socket_paths()]
        else:
            central = [self.nb[5:], self.sb[5:], f"{run}/nb/ovsdb-server.ctl",
                       f"{run}/sb/ovsdb-server.ctl"]
        paths = [*central, self.northd_ctl,
                 self.net_db[5:], f"{net}/ovsdb-server.ctl", self.net_ctl,
                 f"{net}/{UNDERLAY_BRIDGE}.snoop", f"{net}/{EXTERNAL_BRIDGE}.mgmt"]
        for c in self.chassis.values():
            paths += c.socket_paths()
            paths.append(f"{self.net_dir}/{c.name}.sock")
            if c.on_external:
                paths.append(f"{self.net_dir}/{c.name}-x.sock")
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
        return self.db_ctl("ovs-vsctl", self.net_db, *args, env=dir_env(self.net_dir))

    def net_appctl(self, *args: str) -> str:
        return self.run([self.bin["ovs-appctl"], "-t", self.net_ctl, *args])

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
                members = [ha[u] for u in as_list(groups.get(pb["ha_chassis_group"]))
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

    def recompute_gateways(self) -> None:
        """Every gateway's ovn-controller recomputes its flows from scratch.

        After a gateway priority change, OVN 23.03's ovn-controller on the gateway that
        lost the distributed gateway port sometimes keeps its is_chassis_resident()
        flows (incremental processing misses the change): its public switch and router
        go on admitting and routing the port's traffic, so a frame the external segment
        floods to both gateways reaches the backends twice, through OVN's pipeline on
        the old gateway too (1 run in 5-20 of test_switches' gateway move; a recompute
        made `ofproto/trace` there drop it). Call after moving a port when a test
        counts arrivals exactly.
        """
        for chassis in self.gateway_chassis:
            chassis.controller_appctl("recompute")

    def flush_external_fdb(self) -> None:
        """Forget the MACs learned on the external segment and every gateway's br-ext.

        While gateways claim a chassisredirect port in turn, their GARPs teach the
        segment (and the other gateways' br-ext, on its uplink port) the router MAC at
        the wrong place; NORMAL then drops the client's frames until the next GARP.
        """
        if not self.gateway_chassis:
            return
        self.net_appctl("fdb/flush", EXTERNAL_BRIDGE)
        for c in self.chassis.values():
            if c.on_external:
                c.appctl("fdb/flush", "br-ext")

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
            env=dir_env(directory), pidfile=f"{directory}/{daemon}.pid",
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
        stat = proc_stat(pid)
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
        tail = log_tail(log)
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
            "external_hypervisors": self.external_hypervisors,
            "netns": self.netns,
            "clusters": {db: c.manifest() for db, c in self.clusters.items()},
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
                  enable_dummy=doc.get("enable_dummy", "system"),
                  clustered=bool(doc.get("clusters")),
                  external_hypervisors=bool(doc.get("external_hypervisors")))
        for db, cluster in sbx.clusters.items():
            for member, rec in zip(cluster.members, doc["clusters"][db]["members"],
                                   strict=True):
                member.raft = rec["raft"]
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
                 env=dir_env(directory))
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
        schemas = {"nb": self.bin.nb_schema, "sb": self.bin.sb_schema}
        if self.clusters:
            for db, cluster in self.clusters.items():
                cluster.create(schemas[db])
            for cluster in self.clusters.values():
                cluster.wait_healthy(self.timeout)
        else:
            for db, schema in schemas.items():
                self._start_ovsdb(f"{db}/ovsdb-server", self.run_dir / db, f"{db}.db",
                                  schema, f"{db}.sock")
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
            if c.on_external:
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
            # The netns mode's namespaces and veths, now that the processes running in
            # them are stopped; cleanup() logs failures instead of raising.
            namespaces.cleanup(self.netns)
        if self.manifest_path.exists() or stopped:
            self.save()
        if stopped:
            LOG.info("sandbox %s down: stopped %d processes", self.run_dir, len(stopped))
        return stopped

    def status(self) -> dict[str, Any]:
        """Each recorded process alive or not, and each chassis' SB registration."""
        procs = {n: {"pid": r.pid, "alive": r.running()} for n, r in self.processes.items()}
        registered: set[str] = set()
        sb_alive = any(p["alive"] for n, p in procs.items() if n.startswith("sb/ovsdb-server"))
        if sb_alive:
            with contextlib.suppress(SandboxError):
                registered = self.registered_chassis()
        chassis = {}
        for name, c in self.chassis.items():
            own = {k: v for k, v in procs.items() if k.startswith(f"{name}/")}
            chassis[name] = {"role": c.role, "registered": name in registered,
                             "alive": bool(own) and all(p["alive"] for p in own.values())}
        clusters = {}
        for db, cluster in self.clusters.items():
            leader = cluster.leader() if any(
                procs.get(m.name, {}).get("alive") for m in cluster.members) else None
            clusters[db] = {"leader": leader.name if leader else None,
                            "members": [m.name for m in cluster.members]}
        return {
            "run_dir": str(self.run_dir),
            "running": bool(procs) and all(p["alive"] for p in procs.values())
            and all(c["registered"] for c in chassis.values()),
            "processes": procs,
            "chassis": chassis,
            "nb": self.nb,
            "sb": self.sb,
            "clusters": clusters,
        }

    def __enter__(self) -> Sandbox:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def __repr__(self) -> str:
        return (f"Sandbox({str(self.run_dir)!r}, gateways={self.gateways}, "
                f"hypervisors={self.hypervisors})")
