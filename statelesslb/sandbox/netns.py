"""Netns mode: the external client and the backend VMs as Linux network namespaces.

The OVN sandbox (core.py) runs unchanged except that every ovs-vswitchd starts with plain
`--enable-dummy` instead of `--enable-dummy=system` (Sandbox(enable_dummy="")): with
`=system` a port of type "" is a dummy port whatever the bridge's datapath_type, while
plain `--enable-dummy` keeps type "" a real Linux netdev (netdev-linux, AF_PACKET) and
still provides the dummy datapath and dummy ports (type=dummy). So the bridges keep
datapath_type=dummy (the userspace dpif-netdev), the chassis keep their Geneve tunnels
over the dummy underlay, and a veth end becomes an ordinary OVS port:

- the client namespace's veth is a port of the external segment bridge `ext` in the
  network's ovs-vswitchd, next to the gateways' uplinks (like the dummy client port);
- each VM namespace's veth is a port of its hypervisor's br-int with
  external_ids:iface-id=<vm>.

Each namespace gets the topology's MAC and IP (so OVN's addresses match), MTU 1400 (room
for Geneve), IPv6 off, a permanent neighbor entry for its router (the DGP for the client,
lr0-sw0 for the VMs) and a default route through it. TX checksum and segmentation
offloads are off on both veth ends: OVS 3.1's userspace datapath neither completes
partial checksums nor segments, and its conntrack drops a bad checksum.

Names are unique per run: namespaces `slb-<run-id>-client`, `slb-<run-id>-vm1`..., host
veth ends `sl<run-id>c`, `sl<run-id>v1`.... They are recorded in the sandbox manifest
(key "netns") BEFORE they are created, and Sandbox.down() calls cleanup() below, which
removes exactly the recorded ones (also from `Sandbox.load(dir).down()` after a crash).
Long-lived programs in namespaces run through Sandbox.start_process (`ip netns exec`),
so they are in the manifest and stopped by down() too.

    sb = real_sandbox(run_dir, gateways=2, hypervisors=2).up()
    topo, lab = build_real_topology(sb, vms=3)
    lab.start_http_servers()            # python3 -m http.server 8080 in each VM
    lab.curl("http://172.16.0.100/who") # from the client namespace
    sb.down()                           # processes, then namespaces and veths
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from statelesslb.sandbox.core import EXTERNAL_BRIDGE, Sandbox
from statelesslb.sandbox.namespaces import ETC_NETNS, LINK_PREFIX, NS_PREFIX
from statelesslb.sandbox.processes import (
    CommandError,
    ProcessRecord,
    SandboxError,
    parse_ctl_json,
    wait_until,
)
from statelesslb.sandbox.topology import Topology, Vm, build_lb_topology

LOG = logging.getLogger(__name__)
MTU = 1400
HTTP_PORT = 8080
ECHO_PORT = 7007
TCPAPPS = str(Path(__file__).with_name("tcpapps.py"))
# Offloads OVS 3.1's userspace datapath cannot finish for a packet it forwards.
_OFFLOADS_OFF = ("tx-checksum-ipv4", "tx-checksum-ip-generic", "tx-checksum-ipv6",
                 "tx-checksum-sctp", "tx-tcp-segmentation", "tx-tcp-ecn-segmentation",
                 "tx-tcp-mangleid-segmentation", "tx-tcp6-segmentation",
                 "tx-udp-segmentation", "tx-generic-segmentation",
                 "generic-receive-offload", "rx-gro-list", "rx-udp-gro-forwarding")


class NetnsUnavailableError(SandboxError):
    """This machine cannot run the netns mode (not root, no netns or veth support)."""


@dataclass(frozen=True)
class Host:
    """A namespace standing for the external client or a VM."""

    name: str  # "client", "vm1", ...
    netns: str  # slb-<run-id>-<name>
    link: str  # the veth end in the root namespace, an OVS port
    mac: str
    ip: str
    prefixlen: int
    router_ip: str
    router_mac: str
    attach_to: str  # "net" (the external segment) or the chassis name


def _ip_binary() -> str:
    ip = shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip") if os.access(p, os.X_OK)), None)
    if not ip:
        raise NetnsUnavailableError("`ip` (iproute2) not found; apt-get install iproute2")
    return ip


def python3() -> str:
    """The system's python3 for programs in namespaces (the venv's as a fallback)."""
    return shutil.which("python3", path="/usr/bin:/bin") or sys.executable


def netns_available() -> tuple[bool, str]:
    """(True, "") when namespaces and veth pairs can be made here, else (False, why).

    Probes by creating and removing a namespace and a veth pair of a throwaway name.
    """
    if os.geteuid() != 0:
        return False, "the netns mode needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    try:
        _ip_binary()
        from pyroute2 import IPRoute, netns
    except (ImportError, NetnsUnavailableError) as exc:
        return False, str(exc)
    probe = f"{NS_PREFIX}probe-{secrets.token_hex(3)}"
    link = f"{LINK_PREFIX}p{secrets.token_hex(3)}"
    try:
        netns.create(probe)
        with IPRoute() as ipr:
            ipr.link("add", ifname=link, kind="veth", peer={"ifname": f"{link}p"})
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot"
        return False, f"cannot create a network namespace and a veth pair: {exc}"
    finally:
        with contextlib.suppress(Exception):
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=link)
                if idx:
                    ipr.link("del", index=idx[0])
        with contextlib.suppress(Exception):
            netns.remove(probe)
    return True, ""


def real_sandbox(run_dir: Path | str, **kwargs: Any) -> Sandbox:
    """A Sandbox whose ovs-vswitchds can open Linux netdevs (not started yet)."""
    return Sandbox(run_dir, enable_dummy="", **kwargs)


class NetnsLab:
    """The namespaces of one sandbox run; its records live in `sandbox.netns`."""

    def __init__(self, sandbox: Sandbox):
        if sandbox.enable_dummy != "":
            raise SandboxError(
                "the netns mode needs a sandbox whose ovs-vswitchds run with plain "
                "--enable-dummy (use real_sandbox() or Sandbox(..., enable_dummy=''))")
        self.sb = sandbox
        if not sandbox.netns:
            sandbox.netns = {"run_id": _new_run_id(), "namespaces": [], "links": [],
                             "hosts": {}}
            sandbox.save()
        self.run_id: str = sandbox.netns["run_id"]
        self.dir = sandbox.run_dir / "netns"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ip = _ip_binary()

    # names
    @property
    def hosts(self) -> dict[str, Host]:
        return {n: Host(**h) for n, h in self.sb.netns.get("hosts", {}).items()}

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise SandboxError(f"no namespace host {name!r}") from None

    def ns_name(self, host: str) -> str:
        return f"{NS_PREFIX}{self.run_id}-{host}"

    def link_name(self, host: str) -> str:
        suffix = "c" if host == "client" else re.sub(r"^vm", "v", host)
        name = f"{LINK_PREFIX}{self.run_id}{suffix}"
        if len(name) > 14:  # IFNAMSIZ 16 with NUL, and one more for the temporary "p" peer
            raise SandboxError(f"interface name {name} for host {host} is too long")
        return name

    # creation
    def _record(self, host: Host) -> None:
        rec = self.sb.netns
        if host.netns not in rec["namespaces"]:
            rec["namespaces"].append(host.netns)
        if host.link not in rec["links"]:
            rec["links"].append(host.link)
        rec["hosts"][host.name] = asdict(host)
        self.sb.save()

    def _create(self, host: Host) -> None:
        from pyroute2 import IPRoute, NetNS, netns
        from pyroute2.ethtool import Ethtool

        self._record(host)  # first: a failure below still leaves it for cleanup()
        if host.netns in netns.listnetns():
            raise SandboxError(f"namespace {host.netns} exists already")
        # `ip netns exec` bind-mounts /etc/netns/<ns>/* over /etc/*: no resolver, so
        # that lookups (http.server's getfqdn) fail at once instead of timing out
        # through OVN, and a hosts file naming the host.
        etc = ETC_NETNS / host.netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("# statelesslb netns mode: no DNS\n")
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{host.ip} {host.name}\n")
        netns.create(host.netns)
        self.run(host.name, ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                             "net.ipv6.conf.default.disable_ipv6=1"])
        peer = f"{host.link}p"
        with IPRoute() as ipr:
            ipr.link("add", ifname=host.link, kind="veth", peer={"ifname": peer})
            with Ethtool() as ethtool:
                for ifname in (host.link, peer):
                    features = ethtool.get_features(ifname)
                    for name in _OFFLOADS_OFF:
                        feature = features.features.get(name)
                        if feature is not None and feature.available:
                            feature.enable = False
                    ethtool.set_features(ifname, features)
            with contextlib.suppress(OSError):
                Path(f"/proc/sys/net/ipv6/conf/{host.link}/disable_ipv6").write_text("1\n")
            (link_idx,) = ipr.link_lookup(ifname=host.link)
            (peer_idx,) = ipr.link_lookup(ifname=peer)
            ipr.link("set", index=link_idx, mtu=MTU, state="up")
            ipr.link("set", index=peer_idx, net_ns_fd=host.netns)
        with NetNS(host.netns) as ns:
            (idx,) = ns.link_lookup(ifname=peer)
            ns.link("set", index=idx, ifname="eth0", address=host.mac, mtu=MTU)
            ns.link("set", index=idx, state="up")
            (lo,) = ns.link_lookup(ifname="lo")
            ns.link("set", index=lo, state="up")
            ns.addr("add", index=idx, address=host.ip, prefixlen=host.prefixlen)
            if host.prefixlen == 32:
                ns.route("add", dst=f"{host.router_ip}/32", oif=idx, scope=253)  # link
            # NUD_PERMANENT: no ARP towards OVN needed, and none to go stale on failover.
            ns.neigh("add", dst=host.router_ip, lladdr=host.router_mac, ifindex=idx,
                     state=0x80)
            ns.route("add", dst="0.0.0.0/0", gateway=host.router_ip, oif=idx)

    def _attach(self, host: Host, lsp: str | None) -> None:
        if host.attach_to == "net":
            self.sb.net_vsctl("add-port", EXTERNAL_BRIDGE, host.link)
            vsctl: Callable[..., str] = self.sb.net_vsctl
        else:
            chassis = self.sb.chassis[host.attach_to]
            chassis.vsctl("add-port", "br-int", host.link,
                          "--", "set", "Interface", host.link,
                          f"external_ids:iface-id={lsp}")
            vsctl = chassis.vsctl

        def opened() -> bool:
            out = vsctl("--format=json", "--columns=ofport,error", "list", "Interface",
                        host.link)
            row = parse_ctl_json(out)[0]
            ofport, error = row["ofport"], row["error"]
            if isinstance(error, str) and error:
                raise SandboxError(f"OVS cannot open {host.link}: {error}")
            return isinstance(ofport, int) and ofport > 0
        wait_until(opened, 10, 0.05, f"OVS port {host.link} opened", ignore=(CommandError,))
        self.sb.restore_underlay()  # the new veth may have flushed OVS 3.5's routes

    def add_client(self, topo: Topology) -> Host:
        host = Host("client", self.ns_name("client"), self.link_name("client"),
                    topo.client_mac, topo.client_ip, 32, topo.dgp_ip, topo.dgp_mac, "net")
        self._create(host)
        self._attach(host, None)
        return host

    def add_vm(self, topo: Topology, vm: Vm) -> Host:
        prefixlen = int(topo.backend_cidr.split("/")[1])
        host = Host(vm.name, self.ns_name(vm.name), self.link_name(vm.name), vm.mac, vm.ip,
                    prefixlen, topo.router_port_ip, topo.router_port_mac, vm.chassis)
        self._create(host)
        self._attach(host, vm.name)
        return host

    def add_client_sources(self, topo: Topology, cidr: str) -> None:
        """Let the client send from every address of `cidr` (many clients, as on the
        internet): a local route makes the kernel own them all (bind() works without
        an address each), and a route on the router sends replies back to the client."""
        net = ipaddress.ip_network(cidr)
        if net.version != 4 or net.overlaps(ipaddress.ip_network(topo.public_cidr)):
            raise SandboxError(f"client sources {cidr}: an IPv4 range off the external "
                               "segment is needed")
        self.run("client", [self.ip, "route", "add", "local", str(net), "dev", "lo"])
        self.sb.nbctl("lr-route-add", topo.router, str(net), topo.client_ip)

    # commands and processes in namespaces
    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        return [self.ip, "netns", "exec", self.ns_name(host), *argv]

    def run(self, host: str, argv: Sequence[str], timeout: float = 30.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a short command in `host`'s namespace and wait for it."""
        full = self.argv(host, argv)
        try:
            proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            raise CommandError(full, -1, "", f"timed out after {timeout}s") from exc
        if check and proc.returncode != 0:
            raise CommandError(full, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def process_name(self, host: str, label: str) -> str:
        return f"netns/{host}/{label}"

    def log_path(self, host: str, label: str) -> Path:
        return self.dir / f"{host}-{label}.log"

    def start(self, host: str, label: str, argv: Sequence[str], *,
              ready_line: str | None = None, timeout: float = 15.0) -> ProcessRecord:
        """Start a long-lived program in `host`'s namespace, recorded in the manifest
        as netns/<host>/<label> (stopped by Sandbox.down()); ready once its log holds
        `ready_line`, if given."""
        log = self.log_path(host, label)
        with contextlib.suppress(FileNotFoundError):
            log.unlink()
        ready = None
        if ready_line is not None:
            def ready() -> bool:
                try:
                    return ready_line in log.read_text(errors="replace")
                except FileNotFoundError:
                    return False
        return self.sb.start_process(self.process_name(host, label), self.argv(host, argv),
                                     log=str(log), detach=False, cwd=str(self.dir),
                                     ready=ready, timeout=timeout)

    def stop(self, host: str, label: str) -> bool:
        return self.sb.stop_process(self.process_name(host, label))

    # the programs
    def start_http_servers(self, port: int = HTTP_PORT,
                           vms: Sequence[str] | None = None) -> None:
        """`python3 -m http.server PORT --bind <vm ip>` in each VM namespace, serving a
        directory with the file `who` holding the VM's name."""
        for name in vms or [h for h in self.hosts if h != "client"]:
            host = self.host(name)
            www = self.dir / f"www-{name}"
            www.mkdir(exist_ok=True)
            (www / "who").write_text(f"{name}\n")
            self.start(name, f"http-{port}",
                       [python3(), "-u", "-m", "http.server", str(port), "--bind", host.ip,
                        "--directory", str(www)],
                       ready_line=f"Serving HTTP on {host.ip} port {port}")

    def start_echo_servers(self, port: int = ECHO_PORT,
                           vms: Sequence[str] | None = None) -> None:
        """An echo server (tcpapps.py) on each VM: it answers "<vm> <line>"."""
        for name in vms or [h for h in self.hosts if h != "client"]:
            host = self.host(name)
            self.start(name, f"echo-{port}",
                       [python3(), "-u", TCPAPPS, "echo-server", "--bind", host.ip,
                        "--port", str(port), "--name", name],
                       ready_line="listening")

    def curl(self, url: str, *, local_port: int | None = None,
             timeout: float = 5.0) -> tuple[int, str]:
        """curl from the client namespace: (curl's exit code, body)."""
        argv = ["curl", "-s", "--max-time", str(timeout)]
        if local_port is not None:
            argv += ["--local-port", str(local_port)]
        proc = self.run("client", [*argv, url], timeout=timeout + 5, check=False)
        return proc.returncode, proc.stdout

    def echo_client(self, label: str, vip: str, port: int, sports: Sequence[int], *,
                    interval: float = 0.1, duration: float = 60.0,
                    timeout: float = 10.0) -> EchoRun:
        """Start tcpapps.py echo-client in the client namespace (one connection per
        source port); see EchoRun."""
        out, stop_file = self._fresh_outputs(label)
        self.start("client", label,
                   [python3(), "-u", TCPAPPS, "echo-client", "--vip", vip, "--port", str(port),
                    "--src", self.host("client").ip, "--sports", ",".join(map(str, sports)),
                    "--interval", str(interval), "--duration", str(duration),
                    "--timeout", str(timeout), "--out", str(out),
                    "--stop-file", str(stop_file)])
        return EchoRun(self, label, out, stop_file, duration)

    def _fresh_outputs(self, label: str) -> tuple[Path, Path]:
        """A tcpapps run's report and stop files, with a previous run's removed."""
        out, stop_file = self.dir / f"{label}.json", self.dir / f"{label}.stop"
        for p in (out, stop_file):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        return out, stop_file

    def sniff(self, label: str, low: int, high: int, duration: float = 300.0) -> SniffRun:
        """Start tcpapps.py sniff in the client namespace: counts of the TCP packets
        arriving for client ports low..high by source address and port (SniffRun)."""
        out, stop_file = self._fresh_outputs(label)
        self.start("client", label,
                   [python3(), "-u", TCPAPPS, "sniff", "--iface", "eth0",
                    "--ports", f"{low}-{high}", "--duration", str(duration),
                    "--out", str(out), "--stop-file", str(stop_file)],
                   ready_line="sniffing")
        return SniffRun(self, label, out, stop_file)


class EchoRun:
    """A running echo client: status() while it runs, finish() to stop and get results."""

    def __init__(self, lab: NetnsLab, label: str, out: Path, stop_file: Path,
                 duration: float):
        self.lab, self.label, self.out, self.stop_file = lab, label, out, stop_file
        self.duration = duration

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.out.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def conns(self) -> dict[int, dict[str, Any]]:
        doc = self.status() or {"conns": []}
        return {c["sport"]: c for c in doc["conns"]}

    def wait_established(self, exchanges: int = 3, timeout: float = 15.0) -> dict[int, Any]:
        """Wait until every connection has `exchanges` echoes (or failed): {sport: conn}."""
        def ready() -> dict[int, Any] | None:
            conns = self.conns()
            if conns and all(c["ok"] >= exchanges or c["error"] for c in conns.values()):
                return conns
            return None
        return wait_until(ready, timeout, 0.1, f"echo client {self.label} exchanging")

    def finish(self, timeout: float = 20.0) -> dict[int, dict[str, Any]]:
        self.stop_file.touch()
        name = self.lab.process_name("client", self.label)
        wait_until(lambda: not self.lab.sb.is_running(name), timeout, 0.05,
                   f"echo client {self.label} to exit")
        doc = self.status()
        if not doc or not doc.get("done"):
            raise SandboxError(f"echo client {self.label} left no final report in {self.out}"
                               f"; log: {self.lab.log_path('client', self.label)}")
        return {c["sport"]: c for c in doc["conns"]}


class SniffRun:
    """A running sniffer: counts() while it runs, finish() to stop it."""

    def __init__(self, lab: NetnsLab, label: str, out: Path, stop_file: Path):
        self.lab, self.label, self.out, self.stop_file = lab, label, out, stop_file

    def counts(self) -> dict[tuple[str, int, int], int]:
        """{(source address, source port, client port): packets} so far."""
        try:
            doc = json.loads(self.out.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        result = {}
        for key, n in doc["counts"].items():
            src, _, dport = key.partition(">")
            addr, _, sport = src.rpartition(":")
            result[(addr, int(sport), int(dport))] = n
        return result

    def finish(self, timeout: float = 10.0) -> dict[tuple[str, int, int], int]:
        self.stop_file.touch()
        name = self.lab.process_name("client", self.label)
        wait_until(lambda: not self.lab.sb.is_running(name), timeout, 0.05,
                   f"sniffer {self.label} to exit")
        return self.counts()


def _new_run_id() -> str:
    from pyroute2 import netns

    taken = set(netns.listnetns())
    for _ in range(100):
        run_id = secrets.token_hex(3)
        if not any(n.startswith(f"{NS_PREFIX}{run_id}-") for n in taken):
            return run_id
    raise SandboxError("cannot find a free netns run id")


def build_real_topology(sb: Sandbox, vms: int = 3, **kwargs: Any) -> tuple[Topology, NetnsLab]:
    """build_lb_topology() with the client and the VMs as namespaces.

    The client namespace is attached first (to the external segment), then each VM's
    namespace as its VIF. Returns once the topology is settled, like build_lb_topology.
    """
    lab = NetnsLab(sb)
    client_ip = kwargs.pop("client_ip", "172.16.0.50")
    # The addressing build_lb_topology uses (Topology's defaults), known before it returns.
    plan = Topology(physnet=sb.physnet, client_mac=sb.client_mac, client_ip=client_ip)
    lab.add_client(plan)
    topo = build_lb_topology(sb, vms, client_ip=client_ip,
                             bind_vm=lambda vm: lab.add_vm(plan, vm), **kwargs)
    return topo, lab
