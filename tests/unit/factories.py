"""Builders for NB/SB snapshots in unit tests (no OVS involved).

`basic_topo()` is the topology most tests start from:

    lr0 (datapath 3)
      lr0-public  DGP, key 1, MAC 00:00:00:00:ff:01, cr-lr0-public bound to gw1
      lr0-ls0     key 2, MAC 00:00:00:00:ff:02
    ls0 (datapath 1), attached to lr0 via ls0-lr0 (key 1)
      vm1  key 2, 50:54:00:00:00:01, 10.0.0.11 fd00::11, bound to hv1
      vm2  key 3, 50:54:00:00:00:02, 10.0.0.12 fd00::12, bound to hv2
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from statelesslb.nb.bucket_ids import reconcile_nb
from statelesslb.nb.model import (
    MODE_MAC,
    MODE_OPTION,
    PERSISTENCE_OPTION,
    LocalChassis,
    NbLoadBalancer,
    NbRouter,
    NbRouterPort,
    NbSwitch,
    NbSwitchPort,
    NbView,
    SbPortBinding,
    SbView,
    Snapshot,
    TableLayout,
)

TABLES = TableLayout(
    lr_in_intercept=13, ls_out_intercept=42, ls_out_next=43,
    ls_in_intercept=9, ls_in_next=10, output=37,
)
# Plain hashing unless a test asks for a persistence layer: most planner tests pin
# the layer-1 flows; test_persistence.py covers the other layers.
MARKED = {MODE_OPTION: MODE_MAC, PERSISTENCE_OPTION: "hash"}


@dataclass
class Topo:
    load_balancers: dict[str, NbLoadBalancer] = field(default_factory=dict)
    routers: dict[str, NbRouter] = field(default_factory=dict)
    router_ports: dict[str, NbRouterPort] = field(default_factory=dict)
    switches: dict[str, NbSwitch] = field(default_factory=dict)
    switch_ports: dict[str, NbSwitchPort] = field(default_factory=dict)
    datapath_keys: dict[str, int] = field(default_factory=dict)
    port_bindings: dict[str, SbPortBinding] = field(default_factory=dict)
    _next_port_key: dict[str, int] = field(default_factory=dict)
    clock: float = 1000.0     # assign_ids' NB writer time

    # -- NB/SB building ------------------------------------------------------

    def _port_key(self, datapath_uuid: str) -> int:
        key = self._next_port_key.get(datapath_uuid, 1)
        self._next_port_key[datapath_uuid] = key + 1
        return key

    def _bind(self, port: str, datapath_uuid: str, chassis: str | None) -> None:
        self.port_bindings[port] = SbPortBinding(
            port, self._port_key(datapath_uuid), self.datapath_keys[datapath_uuid], chassis)

    def router_uuid(self, name: str) -> str:
        return f"uuid-lr-{name}"

    def switch_uuid(self, name: str) -> str:
        return f"uuid-ls-{name}"

    def add_router(self, name: str, datapath_key: int, dgps: dict[str, str | None]) -> str:
        """A router with DGPs {name: chassis the cr- port is bound to}."""
        uuid = self.router_uuid(name)
        self.datapath_keys[uuid] = datapath_key
        self.routers[uuid] = NbRouter(uuid, name, (), ())
        for index, (dgp, chassis) in enumerate(sorted(dgps.items())):
            self._add_router_port(name, dgp, f"00:00:00:00:f{index}:01", is_gateway=True)
            self.port_bindings["cr-" + dgp] = SbPortBinding(
                "cr-" + dgp, self.port_bindings[dgp].tunnel_key, datapath_key, chassis)
        return uuid

    def _add_router_port(self, router: str, name: str, mac: str, is_gateway: bool) -> None:
        uuid = self.router_uuid(router)
        self.router_ports[name] = NbRouterPort(f"uuid-lrp-{name}", name, mac, (),
                                               is_gateway=is_gateway)
        current = self.routers[uuid]
        self.routers[uuid] = dataclasses.replace(current, ports=current.ports + (name,))
        self._bind(name, uuid, None)

    def add_switch(self, name: str, datapath_key: int, router: str | None = "lr0",
                   router_port_mac: str = "00:00:00:00:ff:02") -> str:
        uuid = self.switch_uuid(name)
        self.datapath_keys[uuid] = datapath_key
        self.switches[uuid] = NbSwitch(uuid, name, ())
        if router is not None:
            self.connect(name, router, router_port_mac)
        return uuid

    def connect(self, switch: str, router: str, router_port_mac: str) -> None:
        lrp = f"{router}-{switch}"
        self._add_router_port(router, lrp, router_port_mac, is_gateway=False)
        self._add_switch_port(switch, NbSwitchPort(
            f"uuid-lsp-{switch}-{router}", f"{switch}-{router}", "router", ("router",),
            {"router-port": lrp}), chassis=None)

    def _add_switch_port(self, switch: str, port: NbSwitchPort, chassis: str | None) -> None:
        uuid = self.switch_uuid(switch)
        self.switch_ports[port.name] = port
        current = self.switches[uuid]
        self.switches[uuid] = dataclasses.replace(current, ports=current.ports + (port.name,))
        self._bind(port.name, uuid, chassis)

    def add_external(self, switch: str, datapath_key: int, dgp: str,
                     network: str | None = "physnet1") -> None:
        """The DGP's switch, with a localnet port on `network` (none if None)."""
        self.add_switch(switch, datapath_key, router=None)
        self._add_switch_port(switch, NbSwitchPort(
            f"uuid-lsp-{switch}-{dgp}", f"{switch}-{dgp}", "router", ("router",),
            {"router-port": dgp}), chassis=None)
        if network is not None:
            self._add_switch_port(switch, NbSwitchPort(
                f"uuid-lsp-ln-{switch}", f"ln-{switch}", "localnet", ("unknown",),
                {"network_name": network}), chassis=None)

    def add_vif(self, switch: str, name: str, mac: str, ips: str,
                chassis: str | None = "hv1", *extra_addresses: str,
                port_type: str = "") -> None:
        addresses = (f"{mac} {ips}",) + extra_addresses
        self._add_switch_port(
            switch, NbSwitchPort(f"uuid-lsp-{name}", name, port_type, addresses), chassis)

    def add_lb(self, name: str, vips: dict[str, str], *, routers: tuple[str, ...] = ("lr0",),
               protocol: str | None = None, marked: bool = True,
               external_ids: dict[str, str] | None = None,
               ip_port_mappings: dict[str, str] | None = None) -> NbLoadBalancer:
        uuid = f"uuid-lb-{name}"
        lb = NbLoadBalancer(uuid, name, protocol, dict(vips),
                            dict(MARKED) if marked else {},
                            dict(external_ids or {}), dict(ip_port_mappings or {}))
        self.load_balancers[uuid] = lb
        for router in routers:
            router_uuid = self.router_uuid(router)
            current = self.routers[router_uuid]
            self.routers[router_uuid] = dataclasses.replace(
                current, load_balancers=current.load_balancers + (uuid,))
        return lb

    def update_lb(self, name: str, **changes: object) -> NbLoadBalancer:
        uuid = f"uuid-lb-{name}"
        self.load_balancers[uuid] = dataclasses.replace(self.load_balancers[uuid], **changes)
        return self.load_balancers[uuid]

    def lb(self, name: str) -> NbLoadBalancer:
        return self.load_balancers[f"uuid-lb-{name}"]

    # -- views ---------------------------------------------------------------

    def nb(self) -> NbView:
        return NbView(dict(self.load_balancers), dict(self.routers), dict(self.router_ports),
                      dict(self.switches), dict(self.switch_ports))

    def sb(self) -> SbView:
        return SbView(dict(self.datapath_keys), dict(self.port_bindings))

    def snapshot(self, chassis: str, tables: TableLayout = TABLES,
                 local: LocalChassis | None = None) -> Snapshot:
        return Snapshot(self.nb(), self.sb(), chassis, tables, local or LocalChassis())

    def write(self, changes: dict[str, dict[str, str | None]]) -> None:
        """Write reconcile_nb's result into the LB rows, as the NB writer does."""
        for uuid, delta in changes.items():
            lb = self.load_balancers[uuid]
            ext = {k: v for k, v in {**lb.external_ids, **delta}.items() if v is not None}
            self.load_balancers[uuid] = dataclasses.replace(lb, external_ids=ext)

    def writer_pass(self, now: float = 0.0) -> dict[str, dict[str, str | None]]:
        """One NB writer pass over every LB (reconcile_nb), written into the rows."""
        changes = reconcile_nb(self.load_balancers.values(), self.nb(), now)
        self.write(changes)
        return changes

    def assign_ids(self) -> None:
        """Play the NB writer until it has nothing left to write.

        Its clock moves on by 10 s a pass, past the settle time of phase 2.
        """
        for step in range(5):
            self.clock += 10.0 * (step + 1)
            if not self.writer_pass(self.clock):
                return
        raise AssertionError("reconcile_nb does not converge")


def basic_topo(with_lb: bool = True) -> Topo:
    topo = Topo()
    topo.add_router("lr0", 3, {"lr0-public": "gw1"})
    topo.add_switch("ls0", 1)
    topo.add_vif("ls0", "vm1", "50:54:00:00:00:01", "10.0.0.11 fd00::11", "hv1")
    topo.add_vif("ls0", "vm2", "50:54:00:00:00:02", "10.0.0.12 fd00::12", "hv2")
    if with_lb:
        topo.add_lb("lb0", {"172.16.0.100:80": "10.0.0.11:8080,10.0.0.12:8080"})
    return topo
