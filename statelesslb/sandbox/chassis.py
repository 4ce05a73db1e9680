"""One sandbox chassis - its own ovsdb-server, ovs-vswitchd on the userspace dummy datapath
and ovn-controller, and the commands that read or drive them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from statelesslb.sandbox.core import Sandbox

import contextlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from statelesslb.sandbox import packets
from statelesslb.sandbox.processes import (
    CommandError,
    SandboxError,
    dir_env,
    parse_ctl_json,
    wait_until,
)

# --- chassis -------------------------------------------------------------------------


UNDERLAY_PREFIX = "192.168.0."


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
        # The MAC a hypervisor on the external segment sends with instead of a router
        # port's (OVN's ovn-chassis-mac-mappings); unique per chassis.
        self.chassis_mac = f"0a:00:ac:10:ff:{last:02x}"
        self._pcaps: dict[str, str] = {}
        self._underlay_routes: set[str] = set()

    # paths
    @property
    def env(self) -> dict[str, str]:
        return dir_env(self.rundir)

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
    def on_external(self) -> bool:
        """Does this chassis have a br-ext on the external segment?"""
        return self.is_gateway or self.sandbox.external_hypervisors

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
        if self.on_external:
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
            "on_external": self.on_external,
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

    def sent_to_external(self) -> int:
        """Packets this chassis sent onto the external segment: the tx counter of its
        br-ext uplink, a dummy port, so live (a patch port's counters are updated by
        the revalidators, later)."""
        if not self.on_external:
            raise SandboxError(f"{self.name} is not on the external segment")
        out = self.ofctl("dump-ports", "ext-net", bridge="br-ext")
        match = re.search(r"tx pkts=(\d+)", out)
        if match is None:
            raise SandboxError(f"{self.name}: no tx counter in dump-ports: {out.strip()}")
        return int(match.group(1))

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
        if self.on_external:
            args += [
                "--", "add-br", "br-ext",
                "--", "set", "Bridge", "br-ext", "datapath_type=dummy",
                "--", "add-port", "br-ext", "ext-net",
                "--", "set", "Interface", "ext-net", "type=dummy",
                f"options:stream=unix:{sbx.net_dir}/{self.name}-x.sock",
                "--", "set", "Open_vSwitch", ".",
                f"external_ids:ovn-bridge-mappings={sbx.physnet}:br-ext",
            ]
        if self.is_gateway:
            args += ["--", "set", "Open_vSwitch", ".",
                     "external_ids:ovn-cms-options=enable-chassis-as-gw"]
        elif self.on_external:
            args += ["--", "set", "Open_vSwitch", ".",
                     f"external_ids:ovn-chassis-mac-mappings={sbx.physnet}:{self.chassis_mac}"]
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
