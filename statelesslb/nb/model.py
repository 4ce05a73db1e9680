"""Plain, immutable views of the NB, SB and local state the planner works from.

The watchers build these from ovsdbapp rows; the pure core (validate, buckets,
planner) sees nothing else, so it can be unit- and property-tested without I/O.
Values here are raw database strings: nothing in them is trusted until
`statelesslb.nb.validate` has parsed it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Keys statelesslb owns in NB Load_Balancer rows.
MODE_OPTION = "stateless_mode"          # options:stateless_mode=mac marks an LB
MODE_MAC = "mac"
EXT_PREFIX = "statelesslb:"
EXT_BUCKETS = EXT_PREFIX + "buckets"    # JSON {"10.0.0.11:8080": 1, ...}
EXT_VIP_IDS = EXT_PREFIX + "vip_ids"    # JSON {"172.16.0.100:80": 7, ...}
EXT_STATUS = EXT_PREFIX + "status"      # "ok" or "error: ..." / "pending: ..."
EXT_DRAIN = EXT_PREFIX + "drain"        # JSON ["10.0.0.11:8080", ...]
# The gateways' effective bucket set per VIP, and the one before the last change
# (with its time): the backends' chassis use it to give mid-stream packets a second
# chance at the backend that still holds their connection.
EXT_ACTIVE = EXT_PREFIX + "active"      # JSON {vip: {backend: [id, mac, lsp]}}
EXT_PREVIOUS = EXT_PREFIX + "previous"  # JSON {"since": t, "vips": {vip: {...}}}

# Per-LB persistence choice (options column) and its window.
PERSISTENCE_OPTION = "stateless_persistence"   # "hash" | "affinity" | "second-chance" | both
WINDOW_OPTION = "stateless_second_chance_window"  # seconds, default 240
# Where the backends' replies leave OVN: through the gateway holding the DGP (OVN's own
# way) or straight out of the backend's chassis onto the DGP's external network.
RETURN_OPTION = "stateless_return"              # "gateway" (default) | "direct"


@dataclass(frozen=True, slots=True)
class NbLoadBalancer:
    uuid: str
    name: str
    protocol: str | None
    vips: Mapping[str, str]
    options: Mapping[str, str] = field(default_factory=dict)
    external_ids: Mapping[str, str] = field(default_factory=dict)
    ip_port_mappings: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_stateless(self) -> bool:
        return self.options.get(MODE_OPTION) == MODE_MAC


@dataclass(frozen=True, slots=True)
class NbRouterPort:
    uuid: str
    name: str
    mac: str
    networks: tuple[str, ...]
    # True when the port has gateway_chassis or an ha_chassis_group: a DGP.
    is_gateway: bool = False
    # Chassis names that may host it (Gateway_Chassis / HA_Chassis rows): the agent
    # prepares the gateway flows on standbys too, so a failover finds them in place.
    gateway_chassis: tuple[str, ...] = ()


@dataclass(frozen=True)
class NbRouter:
    uuid: str
    name: str
    ports: tuple[str, ...]            # NbRouterPort names
    load_balancers: tuple[str, ...]   # NbLoadBalancer uuids


@dataclass(frozen=True, slots=True)
class NbSwitchPort:
    uuid: str
    name: str
    type: str
    addresses: tuple[str, ...]
    options: Mapping[str, str] = field(default_factory=dict)
    tag_request: object = None        # a localnet port's VLAN (raw; validated on use)


@dataclass(frozen=True)
class NbSwitch:
    uuid: str
    name: str
    ports: tuple[str, ...]            # NbSwitchPort names


@dataclass(frozen=True)
class NbView:
    """The NB tables the validator needs, keyed for lookup."""

    load_balancers: Mapping[str, NbLoadBalancer]   # by uuid
    routers: Mapping[str, NbRouter]                # by uuid
    router_ports: Mapping[str, NbRouterPort]       # by name
    switches: Mapping[str, NbSwitch]               # by uuid
    switch_ports: Mapping[str, NbSwitchPort]       # by name


@dataclass(frozen=True, slots=True)
class SbPortBinding:
    logical_port: str
    tunnel_key: int
    datapath_key: int
    chassis: str | None               # Chassis.name where bound, None if unbound


# SB Service_Monitor.status values that take a backend out of the gateways' groups.
UNHEALTHY = frozenset({"offline", "error"})


@dataclass(frozen=True)
class SbView:
    # NB Logical_Router / Logical_Switch uuid -> SB Datapath_Binding tunnel_key
    datapath_keys: Mapping[str, int]
    port_bindings: Mapping[str, SbPortBinding]     # by logical_port
    # OVN's health checks: (backend IP as ip_text() writes it, port, protocol) -> the
    # SB Service_Monitor status ovn-controller probed ("online", "offline", "error").
    service_monitors: Mapping[tuple[str, int, str], str] = field(default_factory=dict)


@dataclass(frozen=True)
class TableLayout:
    """OpenFlow tables of the running ovn-controller, derived at run time."""

    lr_in_intercept: int   # router ingress stage before DNAT (lr_in_defrag)
    ls_out_intercept: int  # first switch egress stage
    ls_out_next: int       # the egress stage after it
    ls_in_intercept: int   # first switch ingress stage after port security
    ls_in_next: int        # the ingress stage after it
    output: int            # where the logical `output;` action resubmits
    # Router ingress stage that sends a DGP's traffic to its gateway (lr_in_gw_redirect),
    # and the stage after it; None when the SB has no such stage.
    lr_in_gw_redirect: int | None = None
    lr_in_gw_redirect_next: int | None = None


@dataclass(frozen=True, slots=True)
class LocalChassis:
    """What this chassis' own OVS says about its reach onto physical networks."""

    # physical network -> its bridge (Open_vSwitch external_ids:ovn-bridge-mappings)
    bridges: Mapping[str, str] = field(default_factory=dict)
    # physical network -> this chassis' own MAC on it (ovn-chassis-mac-mappings), the
    # source MAC of what it sends there for a router (OVN does the same for distributed
    # routing on VLAN networks): never the router port's, which the gateway announces.
    chassis_macs: Mapping[str, str] = field(default_factory=dict)
    # physical network -> OpenFlow port on br-int of the agent's patch to its bridge
    uplinks: Mapping[str, int] = field(default_factory=dict)

    def uplink(self, network: str) -> tuple[str, int] | None:
        """(chassis MAC, br-int port) to send on `network` with, if this chassis can."""
        mac, port = self.chassis_macs.get(network), self.uplinks.get(network)
        return (mac, port) if mac is not None and port is not None else None


@dataclass(frozen=True)
class Snapshot:
    nb: NbView
    sb: SbView
    chassis: str           # this chassis' name (Open_vSwitch external_ids:system-id)
    tables: TableLayout
    local: LocalChassis = LocalChassis()
