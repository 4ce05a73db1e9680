"""The standard load-balancer test topology on a running Sandbox.

::

    external client (172.16.0.50, on the external segment)
          |  localnet ln-public (network_name=<physnet>)
    [public] 172.16.0.0/24
          |  lr0-public 00:00:00:00:ff:01 172.16.0.1/24  (DGP: gw1 prio 20, gw2 10, ...)
        (lr0)
          |  lr0-sw0    00:00:00:00:ff:02 10.0.0.1/24
    [sw0] 10.0.0.0/24
      vm1 50:54:00:00:00:01 10.0.0.11 on hv1, vm2 ... on hv2, vm3 on hv1, ...
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from statelesslb.sandbox.core import Sandbox
from statelesslb.sandbox.processes import CommandError, SandboxError, wait_until


@dataclass(frozen=True)
class Vm:
    name: str  # logical switch port name, also the dummy interface name on br-int
    mac: str
    ip: str
    chassis: str
    # The MAC of the router port on the VM's switch ("" = the topology's router_port_mac):
    # the VM's replies go there.
    router_mac: str = ""


@dataclass
class Topology:
    router: str = "lr0"
    public_switch: str = "public"
    backend_switch: str = "sw0"
    dgp: str = "lr0-public"
    dgp_mac: str = "00:00:00:00:ff:01"
    dgp_ip: str = "172.16.0.1"
    public_cidr: str = "172.16.0.0/24"
    router_port: str = "lr0-sw0"  # the router's port on the backend switch
    router_port_mac: str = "00:00:00:00:ff:02"
    router_port_ip: str = "10.0.0.1"
    backend_cidr: str = "10.0.0.0/24"
    localnet: str = "ln-public"
    physnet: str = "physnet1"
    client_mac: str = "f0:00:00:00:00:01"
    client_ip: str = "172.16.0.50"
    # Gateway chassis by falling priority: the first is where the DGP should be resident.
    gateways: list[str] = field(default_factory=list)
    vms: list[Vm] = field(default_factory=list)
    # SB tunnel keys, filled once everything is bound.
    datapath_keys: dict[str, int] = field(default_factory=dict)
    port_keys: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def cr_port(self) -> str:
        return f"cr-{self.dgp}"

    @property
    def localnet_patch(self) -> str:
        """br-int's end of the localnet patch on a gateway (the external in_port)."""
        return f"patch-br-int-to-{self.localnet}"

    def vm(self, name: str) -> Vm:
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise KeyError(name)

    def vm_by_ip(self, ip: str) -> Vm:
        for vm in self.vms:
            if vm.ip == ip:
                return vm
        raise KeyError(ip)

    def gateway_mac(self, vm: Vm) -> str:
        """The MAC `vm` sends its replies to: the router port on its own switch."""
        return vm.router_mac or self.router_port_mac

    def dp_key(self, datapath: str) -> int:
        return self.datapath_keys[datapath]

    def port_key(self, port: str) -> int:
        return self.port_keys[port]


def _router_port(sb: Sandbox, switch: str, name: str, router_port: str) -> None:
    sb.nbctl("lsp-add", switch, name,
             "--", "lsp-set-type", name, "router",
             "--", "lsp-set-addresses", name, "router",
             "--", "lsp-set-options", name, f"router-port={router_port}")


def _localnet_port(sb: Sandbox, switch: str, name: str, physnet: str) -> None:
    sb.nbctl("lsp-add", switch, name,
             "--", "lsp-set-type", name, "localnet",
             "--", "lsp-set-addresses", name, "unknown",
             "--", "lsp-set-options", name, f"network_name={physnet}")


def build_lb_topology(sb: Sandbox, vms: int = 2, *, client_ip: str = "172.16.0.50",
                      static_client_mac: bool = True, wait_flows: bool = True,
                      timeout: float = 60.0,
                      bind_vm: Callable[[Vm], None] | None = None) -> Topology:
    """Create the topology above and wait until it is realized.

    Returns once cr-lr0-public is bound to the first gateway, every VM port is bound and
    up, and (wait_flows) every ovn-controller installed the flows. static_client_mac
    pre-seeds the router's MAC binding for the client (OVN does not learn it from IP
    traffic and would ARP instead). bind_vm(vm), if given, attaches each VM's interface
    to its chassis' br-int (with external_ids:iface-id=vm.name) instead of a dummy port
    named after the VM: the netns mode (statelesslb.sandbox.netns) attaches a veth.
    """
    gws = [c.name for c in sb.gateway_chassis]
    hvs = [c.name for c in sb.hypervisor_chassis]
    if not gws or not hvs:
        raise SandboxError("the LB topology needs at least one gateway and one hypervisor")
    if not 1 <= vms <= 200:
        raise SandboxError("vms must be between 1 and 200")
    topo = Topology(physnet=sb.physnet, client_mac=sb.client_mac, client_ip=client_ip,
                    gateways=gws)
    topo.vms = [Vm(f"vm{i}", f"50:54:00:00:00:{i:02x}", f"10.0.0.{10 + i}",
                   hvs[(i - 1) % len(hvs)]) for i in range(1, vms + 1)]
    t0 = time.monotonic()
    t = topo
    sb.nbctl("lr-add", t.router,
             "--", "lrp-add", t.router, t.dgp, t.dgp_mac, f"{t.dgp_ip}/24",
             "--", "lrp-add", t.router, t.router_port, t.router_port_mac,
             f"{t.router_port_ip}/24",
             "--", "ls-add", t.public_switch,
             "--", "ls-add", t.backend_switch)
    for i, gw in enumerate(gws):
        # 2 gateways: gw1 20, gw2 10; more: 10 apart, highest first.
        sb.nbctl("lrp-set-gateway-chassis", t.dgp, gw, str(10 * (len(gws) - i)))
    _router_port(sb, t.public_switch, f"{t.public_switch}-{t.router}", t.dgp)
    _localnet_port(sb, t.public_switch, t.localnet, t.physnet)
    _router_port(sb, t.backend_switch, f"{t.backend_switch}-{t.router}", t.router_port)
    for vm in t.vms:
        sb.nbctl("lsp-add", t.backend_switch, vm.name,
                 "--", "lsp-set-addresses", vm.name, f"{vm.mac} {vm.ip}")
    if static_client_mac:
        sb.nbctl("static-mac-binding-add", t.dgp, client_ip, t.client_mac)
    for vm in t.vms:
        if bind_vm is not None:
            bind_vm(vm)
        else:
            sb.chassis[vm.chassis].bind_vif(vm.name, vm.name)
    t.timings["configured"] = time.monotonic() - t0

    wait_bound(sb, t, timeout)
    t.timings["cr_port_bound"] = time.monotonic() - t0
    names = {vm.name for vm in t.vms}

    def vms_up() -> bool:
        rows = sb.sb_rows("Port_Binding", "type=\"\"", columns=["logical_port", "chassis", "up"])
        ok = {r["logical_port"] for r in rows if r["chassis"] and r["up"] is True}
        return names <= ok

    wait_until(vms_up, timeout, 0.05, f"VM ports {', '.join(sorted(names))} bound and up",
               ignore=(CommandError,))
    t.timings["vms_up"] = time.monotonic() - t0
    _fill_keys(sb, t)
    if wait_flows:
        # BFD towards the gateways must be up too, or hypervisors drop DGP-bound traffic.
        sb.wait_settled(timeout)
        t.timings["settled"] = time.monotonic() - t0
    return t


def wait_bound(sb: Sandbox, topo: Topology, timeout: float = 60.0,
               chassis: str | None = None, port: str | None = None) -> None:
    """Wait until a chassisredirect port (default: the DGP's) is resident on `chassis`
    (default: the first gateway)."""
    want = chassis or topo.gateways[0]
    cr_port = port or topo.cr_port

    def bound() -> bool:
        ch = sb.sb_rows("Chassis", f"name={want}", columns=["_uuid"])
        pb = sb.sb_rows("Port_Binding", f"logical_port={cr_port}", columns=["chassis"])
        return bool(ch and pb and pb[0]["chassis"] == ch[0]["_uuid"])

    wait_until(bound, timeout, 0.05, f"{cr_port} bound to {want}", ignore=(CommandError,))


def _fill_keys(sb: Sandbox, topo: Topology) -> None:
    for row in sb.sb_rows("Datapath_Binding", columns=["tunnel_key", "external_ids"]):
        name = row["external_ids"].get("name")
        if name:
            topo.datapath_keys[name] = row["tunnel_key"]
    for row in sb.sb_rows("Port_Binding", columns=["logical_port", "tunnel_key"]):
        topo.port_keys[row["logical_port"]] = row["tunnel_key"]


@dataclass(frozen=True)
class SecondDgp:
    name: str = "lr0-public2"
    mac: str = "00:00:00:00:ff:03"
    ip: str = "172.16.1.1"
    switch: str = "public2"
    localnet: str = "ln-public2"

    @property
    def cr_port(self) -> str:
        return f"cr-{self.name}"


def add_second_dgp(sb: Sandbox, topo: Topology, gateway: str | None = None,
                   timeout: float = 60.0) -> SecondDgp:
    """A second distributed gateway port on lr0, resident on another gateway.

    Its switch `public2` reaches the same physnet, so the external client can
    send to either DGP's MAC: two gateways serve the same VIP at once (OVN 23.03's
    northd itself builds LB flows for the first DGP only). Replies to the client
    still route out of lr0-public, the client's subnet: the asymmetric case.
    """
    if len(topo.gateways) < 2:
        raise SandboxError("a second DGP needs a second gateway chassis")
    gw = gateway or topo.gateways[1]
    d = SecondDgp()
    sb.nbctl("lrp-add", topo.router, d.name, d.mac, f"{d.ip}/24",
             "--", "ls-add", d.switch)
    others = [g for g in topo.gateways if g != gw]
    sb.nbctl("lrp-set-gateway-chassis", d.name, gw, "30")
    for i, other in enumerate(others):
        sb.nbctl("lrp-set-gateway-chassis", d.name, other, str(10 - i))
    _router_port(sb, d.switch, f"{d.switch}-{topo.router}", d.name)
    _localnet_port(sb, d.switch, d.localnet, topo.physnet)
    wait_bound(sb, topo, timeout, chassis=gw, port=d.cr_port)
    sb.wait_settled(timeout)
    _fill_keys(sb, topo)
    return d


def add_backend_switch(sb: Sandbox, topo: Topology, vms: int = 2, *, switch: str = "sw1",
                       subnet: int = 1, router_port_mac: str = "00:00:00:00:ff:04",
                       timeout: float = 60.0) -> list[Vm]:
    """A second backend switch on lr0 (10.0.<subnet>.0/24) with `vms` VMs of its own.

    Its VMs (vm<n+1>.., 10.0.<subnet>.<10+i>, MACs 50:54:00:00:<subnet>:<i>) go on the
    hypervisors in turn and join `topo.vms`. Returns them.
    """
    hvs = [c.name for c in sb.hypervisor_chassis]
    lrp = f"{topo.router}-{switch}"
    sb.nbctl("lrp-add", topo.router, lrp, router_port_mac, f"10.0.{subnet}.1/24",
             "--", "ls-add", switch)
    _router_port(sb, switch, f"{switch}-{topo.router}", lrp)
    first = len(topo.vms) + 1
    new = [Vm(f"vm{first + i}", f"50:54:00:00:{subnet:02x}:{i + 1:02x}",
              f"10.0.{subnet}.{11 + i}", hvs[i % len(hvs)], router_port_mac)
           for i in range(vms)]
    for vm in new:
        sb.nbctl("lsp-add", switch, vm.name,
                 "--", "lsp-set-addresses", vm.name, f"{vm.mac} {vm.ip}")
        sb.chassis[vm.chassis].bind_vif(vm.name, vm.name)
    names = {vm.name for vm in new}

    def up() -> bool:
        rows = sb.sb_rows("Port_Binding", "type=\"\"", columns=["logical_port", "chassis", "up"])
        return names <= {r["logical_port"] for r in rows if r["chassis"] and r["up"] is True}

    wait_until(up, timeout, 0.05, f"VM ports {', '.join(sorted(names))} bound and up",
               ignore=(CommandError,))
    topo.vms.extend(new)
    _fill_keys(sb, topo)
    sb.wait_settled(timeout)
    return new
