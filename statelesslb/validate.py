"""Turn a raw NB Load_Balancer into typed, checked values, or say why not.

Nothing read from the NB is trusted: every value that later reaches an
OpenFlow string leaves this module as an `ipaddress` object, an int or a
canonical MAC. Names (switch, port, router) are returned too, but only for
dictionary lookups and operator messages, never for flow text.

`validate_lb` never raises on bad input: malformed values of any type give an
`LbError` whose message names the VIP or backend and the reason.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from statelesslb.hashing import DEFAULT_HASH, HashClasses, HashOptionError, parse_hash
from statelesslb.model import (
    MODE_MAC,
    MODE_OPTION,
    PERSISTENCE_OPTION,
    WINDOW_OPTION,
    NbLoadBalancer,
    NbRouter,
    NbRouterPort,
    NbSwitch,
    NbSwitchPort,
    NbView,
)
from statelesslb.ofstrings import IpAddress, endpoint_text
from statelesslb.weights import WEIGHTS_OPTION, WeightOptionError, parse_weights

SUPPORTED_PROTOCOLS = ("tcp", "udp")
PERSISTENCE_LAYERS = frozenset({"hash", "affinity", "second-chance"})
# Second chance by default: it keeps sessions across backend changes and keeps the
# gateways stateless. Four minutes, as Beamer's daisy chaining does.
DEFAULT_PERSISTENCE = "second-chance"
DEFAULT_WINDOW = 240
# Measured on OVS 3.1: a select group of our buckets dumps fine up to 700 buckets and
# comes back empty from 800 on (its OFPST_GROUP_DESC entry passes 64 KiB).
MAX_BACKENDS_PER_VIP = 600
MAX_WINDOW = 86400
NO_PORT = "has no port"  # parse_endpoint's reason for a bare address
DEFAULT_PROTOCOL = "tcp"

# Strict shapes first, `ipaddress` second: `ipaddress` and `int` accept more
# than we want (zone ids, unicode digits, surrounding spaces, "+80").
_IPV4 = re.compile(r"[0-9.]{7,15}", re.ASCII)
_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}", re.ASCII)
_PORT = re.compile(r"[0-9]{1,5}", re.ASCII)
_MAC = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}", re.ASCII)
# NB names echoed bare in messages; anything else is shown with repr().
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.:/@+\[\]-]{1,80}", re.ASCII)
# Address keywords that carry no MAC/IP pair for us.
_ADDRESS_KEYWORDS = frozenset({"unknown", "router", "dynamic"})
# ovn-northd does not care, but a status message should stay readable.
_MAX_NAMES_LISTED = 5


@dataclass(frozen=True)
class ValidBackend:
    ip: IpAddress
    port: int
    key: str                 # canonical "10.0.0.11:8080" / "[fd00::11]:8080"
    lsp_name: str            # the backend's logical switch port
    mac: str                 # its MAC, lowercase, unicast
    switch_uuid: str
    router_port_name: str    # the LRP facing the backend's switch
    router_port_mac: str


@dataclass(frozen=True)
class ValidVip:
    ip: IpAddress
    port: int
    key: str                 # canonical "172.16.0.100:80" / "[fd00::100]:80"
    backends: tuple[ValidBackend, ...]


@dataclass(frozen=True)
class ValidLb:
    uuid: str
    name: str
    protocol: str            # "tcp" or "udp"
    router_uuid: str
    router_name: str
    dgps: tuple[str, ...]    # names of the router's distributed gateway ports
    vips: tuple[ValidVip, ...]
    # Persistence layers on top of hashing (docs/persistence.md).
    affinity: bool = False           # gateway conntrack remembers each flow's bucket
    second_chance: bool = True       # backends' chassis forward to the previous owner
    window: int = DEFAULT_WINDOW     # seconds the previous bucket set stays in force
    hash: HashClasses = DEFAULT_HASH  # which header bits the groups hash
    # (backend key, weight) of the backends not weighing 1 (options:stateless_weights),
    # sorted: a tuple keeps ValidLb hashable.
    weights: tuple[tuple[str, int], ...] = ()

    def weight(self, backend_key: str) -> int:
        for key, weight in self.weights:
            if key == backend_key:
                return weight
        return 1

    def group_fields(self, vip: ValidVip) -> str:
        """The `fields(...)` of the VIP's groups, gateways' and backends' alike."""
        return self.hash.fields(vip.ip.version, self.protocol)

    @property
    def vip_keys(self) -> tuple[str, ...]:
        return tuple(vip.key for vip in self.vips)

    @property
    def backend_keys(self) -> tuple[str, ...]:
        """Every backend key of every VIP, once, sorted."""
        return tuple(sorted({b.key for vip in self.vips for b in vip.backends}))


@dataclass(frozen=True)
class LbError:
    uuid: str
    name: str
    message: str


def parse_persistence(options: object) -> tuple[bool, bool, int]:
    """(affinity, second_chance, window) from an LB's options; raises _Invalid."""
    opts = options if isinstance(options, Mapping) else {}
    raw = opts.get(PERSISTENCE_OPTION, DEFAULT_PERSISTENCE)
    if not isinstance(raw, str):
        raise _Invalid(f"options:{PERSISTENCE_OPTION} is not a string")
    layers = {part.strip() for part in raw.split(",")}
    unknown = layers - PERSISTENCE_LAYERS
    if unknown or not layers or ("hash" in layers and len(layers) > 1):
        raise _Invalid(
            f"options:{PERSISTENCE_OPTION}={show(raw)} is not one of hash, affinity, "
            "second-chance or affinity,second-chance")
    raw_window = opts.get(WINDOW_OPTION, str(DEFAULT_WINDOW))
    if not isinstance(raw_window, str) or not _PORT.fullmatch(raw_window) or not (
            1 <= int(raw_window) <= MAX_WINDOW):
        raise _Invalid(f"options:{WINDOW_OPTION}={show(raw_window)} is not a number of "
                       f"seconds in 1..{MAX_WINDOW}")
    return "affinity" in layers, "second-chance" in layers, int(raw_window)


_UNSET = object()


def safe_topology_key(nb: NbView) -> object:
    """topology_key(nb), or None when the view holds something unhashable (a fuzzer's)."""
    try:
        key = topology_key(nb)
        hash(key)
    except Exception:
        return None
    return key


def same_objects(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    """Whether two tuples hold the very same objects, position by position."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


@dataclass(frozen=True)
class TopologyChanges:
    """What a topology change touched, in the terms of topology_deps()."""

    routers: frozenset[str]      # router rows, their ports, or what plugs into them
    ips: frozenset[object]       # IPs whose announcing ports changed, on any switch
    lsps: frozenset[str]         # switch ports changed, moved, or whose MACs changed

    def keys(self) -> set[tuple[str, object]]:
        return ({("router", r) for r in self.routers} | {("ip", i) for i in self.ips}
                | {("lsp", p) for p in self.lsps})


@dataclass(frozen=True)
class TopologyState:
    key: object                  # topology_key(nb), None when unusable (unhashable)
    index: TopologyIndex
    changed: bool                # the topology differs from the previous call's
    moved: frozenset[str]        # LBs attached to or detached from a router since then
    # When `changed`: what the change touched; None when that cannot be told (then
    # every LB must be validated again).
    changes: TopologyChanges | None = None


class TopologyCache:
    """topology_key() and index_topology() of the latest NB view, once per topology.

    The watchers' NbReader hands out the very same topology mappings until a
    topology row changes; recognising them by identity spares a pass over every
    router, port and switch on each LB change. Other views (tests build new
    mappings each time) are compared by value, so the answer is always right.
    Attaching an LB to a router is not a topology change: it names that LB in
    `moved`, so adding one LB does not re-plan the others. A topology change says
    what it touched (`changes`); with topology_deps() the callers find the LBs
    whose validation may differ.
    """

    def __init__(self) -> None:
        self._source: tuple[object, ...] = ()
        self._key: object = None
        self._index: TopologyIndex | None = None
        self._nb: NbView | None = None
        self._routers_of: dict[str, tuple[str, ...]] = {}

    def get(self, nb: NbView) -> TopologyState:
        source = (nb.routers, nb.router_ports, nb.switches, nb.switch_ports)
        if self._index is not None and same_objects(source, self._source):
            return TopologyState(self._key, self._index, False, frozenset())
        key = safe_topology_key(nb)
        changed = key is None or key != self._key or self._index is None
        index = index_topology(nb)
        routers_of = {lb: routers_of_lb(index, lb) for lb in index.routers_by_lb}
        moved = frozenset(u for u in routers_of.keys() | self._routers_of.keys()
                          if routers_of.get(u) != self._routers_of.get(u))
        changes = None
        if changed and key is not None and self._nb is not None and self._index is not None:
            changes = _topology_changes(self._nb, self._index, nb, index)
        self._source, self._key, self._index, self._routers_of = source, key, index, routers_of
        self._nb = nb
        return TopologyState(key, index, changed, moved, changes)


def topology_deps(valid: ValidLb) -> frozenset[tuple[str, object]]:
    """What a valid LB's validation read of the topology, as TopologyChanges keys.

    Its router (the router's ports, and the switches plugged into them, are the
    router's), each backend's IP (the ports announcing it on those switches) and
    each backend's port (the switches listing it, its MACs, its type).
    """
    deps: set[tuple[str, object]] = {("router", valid.router_uuid)}
    for vip in valid.vips:
        for backend in vip.backends:
            deps.add(("ip", backend.ip))
            deps.add(("lsp", backend.lsp_name))
    return frozenset(deps)


def changed_keys(before: Mapping, after: Mapping) -> set:
    """The keys whose values differ between two mappings (present in one only, too)."""
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def _topology_changes(old_nb: NbView, old: TopologyIndex,
                      new_nb: NbView, new: TopologyIndex) -> TopologyChanges | None:
    """What changed between two topologies, or None (a fuzzer's odd values)."""
    try:
        lrps = changed_keys(old_nb.router_ports, new_nb.router_ports)
        routers = {
            u for u in old_nb.routers.keys() | new_nb.routers.keys()
            if _router_shape(old_nb.routers.get(u)) != _router_shape(new_nb.routers.get(u))}
        for view in (old_nb, new_nb):
            for router in view.routers.values():
                if not lrps.isdisjoint(_str_tuple(router.ports)):
                    routers.add(_as_str(router.uuid))
        routers.update(changed_keys(old.attachments, new.attachments))
        ips: set[object] = set()
        for switch in old.addresses.keys() | new.addresses.keys():
            ips.update(changed_keys(old.addresses.get(switch, {}),
                                     new.addresses.get(switch, {})))
        lsps = (changed_keys(old_nb.switch_ports, new_nb.switch_ports)
                | changed_keys(old.switches_of_lsp, new.switches_of_lsp)
                | changed_keys(old.macs_of_lsp, new.macs_of_lsp))
        return TopologyChanges(frozenset(routers), frozenset(ips), frozenset(lsps))
    except Exception:    # a fuzzer's view: unhashable or odd values
        return None


def _router_shape(router: object) -> object:
    """A router as validation sees it: everything but its LB list."""
    if not isinstance(router, NbRouter):
        return router
    return (router.uuid, router.name, router.ports)


class Dependents:
    """Which LBs read which keys (topology or SB), kept in step LB by LB.

    An LB whose keys are unknown (None: an invalid LB, whose error may name
    anything) counts as reading every key.
    """

    def __init__(self) -> None:
        self._by_key: dict[object, set[str]] = {}
        self._keys: dict[str, frozenset[object]] = {}
        self._anything: set[str] = set()

    def set(self, uuid: str, keys: frozenset[object] | None) -> None:
        self.discard(uuid)
        if keys is None:
            self._anything.add(uuid)
            return
        self._keys[uuid] = keys
        for key in keys:
            self._by_key.setdefault(key, set()).add(uuid)

    def discard(self, uuid: str) -> None:
        self._anything.discard(uuid)
        for key in self._keys.pop(uuid, ()):
            readers = self._by_key[key]
            readers.discard(uuid)
            if not readers:
                del self._by_key[key]

    def of(self, keys: Iterable[object]) -> set[str]:
        """The LBs that read any of `keys`, and those that may read anything."""
        found = set(self._anything)
        for key in keys:
            found.update(self._by_key.get(key, ()))
        return found


def routers_of_lb(index: TopologyIndex, lb_uuid: object) -> tuple[str, ...]:
    """Uuids of the routers an LB is attached to."""
    return tuple(_as_str(r.uuid) for r in index.routers_by_lb.get(lb_uuid, ()))


def topology_key(nb: NbView) -> object:
    """Everything of the NB but the load balancers and their attachments, hashable."""
    return (
        frozenset((r.uuid, r.name, tuple(r.ports)) for r in nb.routers.values()),
        frozenset(nb.router_ports.values()),
        frozenset((s.uuid, s.name, tuple(s.ports)) for s in nb.switches.values()),
        frozenset((p.uuid, p.name, p.type, tuple(p.addresses), frozenset(p.options.items()))
                  for p in nb.switch_ports.values()),
    )


class ValidationMemo:
    """validate_lb results, reused while the topology and the LB's own row are unchanged.

    The NB writer and the planner validate every marked LB on every change; with
    this, a change to one LB re-validates that LB only. Unhashable (fuzzed) input
    bypasses the memo.
    """

    def __init__(self) -> None:
        self._topology: object = None
        self._results: dict[object, ValidLb | LbError] = {}

    def scope(self, nb: NbView, topology: object = _UNSET) -> ValidationMemo:
        """Call once per pass over the LBs: compares the topology once, not per LB.

        `topology` is topology_key(nb) when the caller has it already (None: unusable).
        """
        if topology is _UNSET:
            topology = safe_topology_key(nb)
        if topology is None or topology != self._topology:
            self._topology, self._results = topology, {}
        return self

    def validate(self, lb: NbLoadBalancer, nb: NbView,
                 index: TopologyIndex) -> ValidLb | LbError:
        """validate_lb(lb, nb, index) for the `nb` given to the last scope()."""
        if self._topology is None:
            return validate_lb(lb, nb, index)
        try:
            # The topology key leaves out which routers hold which LB: this LB's are here.
            key = (lb.uuid, lb.name, lb.protocol, frozenset(lb.vips.items()),
                   frozenset(lb.options.items()), frozenset(lb.ip_port_mappings.items()),
                   routers_of_lb(index, lb.uuid))
            hash(key)
        except Exception:
            return validate_lb(lb, nb, index)
        result = self._results.get(key)
        if result is None:
            result = validate_lb(lb, nb, index)
            if len(self._results) > 200_000:
                self._results.clear()
            self._results[key] = result
        return result


def parse_window(options: object) -> int | None:
    """The second-chance window of an LB's options, or None when they are invalid."""
    try:
        return parse_persistence(options)[2]
    except _Invalid:
        return None


class _Invalid(Exception):
    """Internal: carries an operator-readable reason out of nested checks."""


# ---------------------------------------------------------------------------
# Scalar parsers (public: buckets.py and the CLI reuse them)


def parse_ip(text: object) -> IpAddress | None:
    """A plain IPv4/IPv6 address, no brackets, zone, prefix or spaces."""
    if not isinstance(text, str):
        return None
    try:
        if _IPV4.fullmatch(text):
            return IPv4Address(text)
        if ":" in text and _IPV6.fullmatch(text):
            return IPv6Address(text)
    except ipaddress.AddressValueError:
        return None
    return None


def parse_port(text: str) -> int | None:
    if not _PORT.fullmatch(text):
        return None
    port = int(text)
    return port if 1 <= port <= 0xFFFF else None


def parse_mac(text: object) -> str | None:
    """Canonical lowercase MAC if `text` is a unicast, non-zero MAC."""
    if not isinstance(text, str) or not _MAC.fullmatch(text):
        return None
    mac = text.lower()
    if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        return None
    return mac


def _unusable_address_reason(ip: IpAddress) -> str | None:
    """Why `ip` cannot be a unicast VIP or backend, or None if it can."""
    if ip.is_unspecified:
        return "is unspecified"
    if ip.is_multicast:
        return "is multicast"
    if ip.is_loopback:
        return "is loopback"
    if isinstance(ip, IPv4Address) and ip.is_reserved:
        return "is reserved/broadcast"
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return "is IPv4-mapped (use the IPv4 address)"
    return None


def parse_endpoint(text: object) -> tuple[IpAddress, int] | str:
    """Parse `IPv4:port` or `[IPv6]:port`; a str result is the reason it failed."""
    if not isinstance(text, str):
        return "is not a string"
    if len(text) > 64:
        return "is too long to be IP:port"
    return _parse_endpoint_text(text)


@functools.lru_cache(maxsize=262144)
def _parse_endpoint_text(text: str) -> tuple[IpAddress, int] | str:
    # Pure and hot: a topology change re-validates every LB, whose backends are
    # mostly the same strings as before (ipaddress parsing dominated that cost).
    if parse_ip(text) is not None or (
        text.startswith("[") and text.endswith("]") and parse_ip(text[1:-1]) is not None
    ):
        return NO_PORT
    if text.startswith("["):
        address_text, sep, port_text = text[1:].partition("]:")
        ip = parse_ip(address_text) if sep else None
        if not isinstance(ip, IPv6Address):
            return "is not IP:port or [IPv6]:port"
    else:
        address_text, sep, port_text = text.rpartition(":")
        ip = parse_ip(address_text) if sep else None
        if not isinstance(ip, IPv4Address):
            return "is not IP:port or [IPv6]:port"
    port = parse_port(port_text)
    if port is None:
        return "has an invalid port (must be 1..65535)"
    reason = _unusable_address_reason(ip)
    if reason:
        return f"address {reason}"
    return ip, port


def endpoint_key(ip: IpAddress, port: int) -> str:
    """Canonical key: "172.16.0.100:80", "[fd00::100]:80"."""
    return endpoint_text(ip, port)


def canonical_endpoint_key(text: object) -> str | None:
    """The canonical form of an `IP:port` key, or None if it does not parse."""
    parsed = parse_endpoint(text)
    return None if isinstance(parsed, str) else endpoint_key(*parsed)


def vip_backend_keys(vips: Mapping[str, str]) -> list[tuple[str, list[str]]]:
    """(VIP key, its backends' keys) in NB key order: canonical where they parse, raw
    text otherwise, for showing an LB as the operator wrote it (ctl, ctlserver). A list,
    not a dict: two spellings of one VIP both stay visible."""
    result = []
    for raw_vip, text in sorted(vips.items()):
        backends = [b.strip(" \t") for b in text.split(",") if b.strip(" \t")]
        result.append((canonical_endpoint_key(raw_vip) or raw_vip,
                       [canonical_endpoint_key(b) or b for b in backends]))
    return result


def show(value: object) -> str:
    """An NB value for a message: bare if plain, else a short repr."""
    if isinstance(value, str) and _PLAIN_NAME.fullmatch(value):
        return value
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_str(value: object) -> str:
    return value if isinstance(value, str) else show(value)


def _listing(names: list[str]) -> str:
    shown = ", ".join(show(n) for n in names[:_MAX_NAMES_LISTED])
    more = len(names) - _MAX_NAMES_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _str_tuple(value: object) -> tuple[str, ...]:
    if isinstance(value, tuple | list | frozenset | set):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def _str_map(value: object) -> dict[str, str] | None:
    if not isinstance(value, Mapping):
        return None
    items = dict(value.items())
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in items.items()):
        return None
    return items


def is_marked(lb: object) -> bool:
    """`lb.is_stateless`, but False instead of raising on malformed rows."""
    options = getattr(lb, "options", None)
    return isinstance(options, Mapping) and options.get(MODE_OPTION) == MODE_MAC


# ---------------------------------------------------------------------------
# Topology index: built once per NbView, shared by every LB's validation.


@dataclass(frozen=True)
class _PortAddress:
    lsp_name: str
    mac: str


@dataclass
class TopologyIndex:
    """Lookups derived from an NbView. Build with `index_topology(nb)`."""

    routers_by_lb: dict[str, list[NbRouter]] = field(default_factory=dict)
    # LSP name -> uuids of the switches listing it (more than one is corrupt).
    switches_of_lsp: dict[str, list[str]] = field(default_factory=dict)
    # router uuid -> switch uuid -> names of the router's LRPs the switch plugs into
    attachments: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    # switch uuid -> IP -> (LSP, MAC) pairs of VIF ports announcing it
    addresses: dict[str, dict[IpAddress, list[_PortAddress]]] = field(default_factory=dict)
    # LSP name -> every MAC of its address entries
    macs_of_lsp: dict[str, set[str]] = field(default_factory=dict)


def _vif_addresses(port: NbSwitchPort) -> list[tuple[str, list[IpAddress]]]:
    """(MAC, IPs) of each "MAC IP [IP...]" entry; keywords and junk skipped."""
    entries = []
    for entry in _str_tuple(port.addresses):
        tokens = entry.split()
        if not tokens or tokens[0] in _ADDRESS_KEYWORDS:
            continue
        mac = parse_mac(tokens[0])
        if mac is None:
            continue
        ips = [ip for ip in (parse_ip(t) for t in tokens[1:]) if ip is not None]
        entries.append((mac, ips))
    return entries


def index_topology(nb: NbView) -> TopologyIndex:
    index = TopologyIndex()
    routers = [r for r in _rows(nb.routers) if isinstance(r, NbRouter)]
    router_of_lrp: dict[str, list[str]] = {}
    for router in sorted(routers, key=lambda r: (_as_str(r.name), _as_str(r.uuid))):
        for lb_uuid in _str_tuple(router.load_balancers):
            index.routers_by_lb.setdefault(lb_uuid, []).append(router)
        for lrp in _str_tuple(router.ports):
            router_of_lrp.setdefault(lrp, []).append(_as_str(router.uuid))

    switch_ports = nb.switch_ports if isinstance(nb.switch_ports, Mapping) else {}
    switches = [s for s in _rows(nb.switches) if isinstance(s, NbSwitch)]
    for switch in sorted(switches, key=lambda s: _as_str(s.uuid)):
        switch_uuid = _as_str(switch.uuid)
        by_ip = index.addresses.setdefault(switch_uuid, {})
        for lsp_name in _str_tuple(switch.ports):
            index.switches_of_lsp.setdefault(lsp_name, []).append(switch_uuid)
            port = switch_ports.get(lsp_name)
            if not isinstance(port, NbSwitchPort):
                continue
            if port.type == "router":
                options = port.options if isinstance(port.options, Mapping) else {}
                lrp = options.get("router-port")
                if isinstance(lrp, str):
                    for router_uuid in router_of_lrp.get(lrp, []):
                        index.attachments.setdefault(router_uuid, {}).setdefault(
                            switch_uuid, []).append(lrp)
            elif port.type == "":
                for mac, ips in _vif_addresses(port):
                    index.macs_of_lsp.setdefault(lsp_name, set()).add(mac)
                    for ip in ips:
                        by_ip.setdefault(ip, []).append(_PortAddress(lsp_name, mac))
    return index


def _rows(table: object) -> list[object]:
    return list(table.values()) if isinstance(table, Mapping) else []


# ---------------------------------------------------------------------------
# The validator


def validate_lb(
    lb: NbLoadBalancer, nb: NbView, index: TopologyIndex | None = None
) -> ValidLb | LbError:
    """Check `lb` against `nb`. Pass `index_topology(nb)` when validating many LBs."""
    uuid = _as_str(getattr(lb, "uuid", ""))
    name = _as_str(getattr(lb, "name", ""))
    try:
        return _validate(lb, nb, index or index_topology(nb), uuid, name)
    except _Invalid as invalid:
        return LbError(uuid, name, str(invalid))
    except Exception as exc:  # a fuzzer's wrong types must never crash the agent
        return LbError(uuid, name, f"cannot validate: unexpected {type(exc).__name__}")


@dataclass(frozen=True)
class _ParsedVip:
    ip: IpAddress
    port: int
    key: str
    backends: tuple[tuple[IpAddress, int, str], ...]


def _validate(
    lb: NbLoadBalancer, nb: NbView, index: TopologyIndex, uuid: str, name: str
) -> ValidLb:
    if not is_marked(lb):
        raise _Invalid("options:stateless_mode is not \"mac\"")
    protocol = _check_protocol(lb.protocol)
    vips = _parse_vips(lb.vips)
    router = _single_router(index, uuid)
    router_ports = nb.router_ports if isinstance(nb.router_ports, Mapping) else {}
    dgps = tuple(sorted(
        p for p in _str_tuple(router.ports)
        if isinstance(router_ports.get(p), NbRouterPort) and router_ports[p].is_gateway is True
    ))
    router_name = _as_str(router.name)
    if not dgps:
        raise _Invalid(f"router {show(router_name)} has no distributed gateway port")
    resolver = _BackendResolver(lb, nb, index, router, router_ports)
    valid_vips = tuple(
        ValidVip(vip.ip, vip.port, vip.key, resolver.resolve_vip(vip)) for vip in vips
    )
    affinity, second_chance, window = parse_persistence(lb.options)
    try:
        hash_classes = parse_hash(lb.options)
        weights = parse_weights(lb.options, _weight_key)
    except (HashOptionError, WeightOptionError) as exc:
        raise _Invalid(str(exc)) from None
    _check_weights(weights, valid_vips)
    return ValidLb(uuid, name, protocol, _as_str(router.uuid), router_name, dgps, valid_vips,
                   affinity, second_chance, window, hash_classes, tuple(sorted(weights.items())))


def _weight_key(text: str) -> str:
    parsed = parse_endpoint(text)
    if isinstance(parsed, str):
        raise ValueError(f"{show(text)} {parsed}")
    return endpoint_key(*parsed)


def _check_weights(weights: Mapping[str, int], vips: Iterable[ValidVip]) -> None:
    """Every weighted backend is one of the LB's; no VIP needs more buckets than fit."""
    keys = {b.key for vip in vips for b in vip.backends}
    unknown = sorted(set(weights) - keys)
    if unknown:
        raise _Invalid(f"options:{WEIGHTS_OPTION} names {', '.join(unknown[:3])}, not a "
                       "backend of this load balancer")
    for vip in vips:
        slots = sum(weights.get(b.key, 1) for b in vip.backends)
        if slots > MAX_BACKENDS_PER_VIP:
            raise _Invalid(f"VIP {vip.key}: weights add up to {slots} buckets; at most "
                           f"{MAX_BACKENDS_PER_VIP} fit in one group")


def _check_protocol(protocol: object) -> str:
    if protocol is None:
        return DEFAULT_PROTOCOL
    if isinstance(protocol, str) and protocol in SUPPORTED_PROTOCOLS:
        return protocol
    raise _Invalid(
        f"protocol {show(protocol)} is not supported by stateless_mode=mac (only tcp and udp)"
    )


def _parse_vips(raw_vips: object) -> list[_ParsedVip]:
    vips = _str_map(raw_vips)
    if vips is None:
        raise _Invalid("vips is not a map of strings to strings")
    parsed: dict[str, _ParsedVip] = {}
    for raw_key in sorted(vips):
        endpoint = parse_endpoint(raw_key)
        if endpoint == NO_PORT:
            raise _Invalid(
                f"stateless_mode=mac needs a port on VIP {show(raw_key)} "
                "(write IPv4:port or [IPv6]:port)"
            )
        if isinstance(endpoint, str):
            raise _Invalid(f"VIP {show(raw_key)} {endpoint}")
        ip, port = endpoint
        key = endpoint_key(ip, port)
        if key in parsed:
            raise _Invalid(f"VIP {key} is listed twice (in different spellings)")
        parsed[key] = _ParsedVip(ip, port, key, _parse_backends(key, ip, vips[raw_key]))
    return [parsed[key] for key in sorted(parsed)]


def _parse_backends(
    vip_key: str, vip_ip: IpAddress, text: str
) -> tuple[tuple[IpAddress, int, str], ...]:
    if not text.strip(" \t"):
        raise _Invalid(f"VIP {vip_key} has no backends")
    count = text.count(",") + 1
    if count > MAX_BACKENDS_PER_VIP:
        raise _Invalid(
            f"VIP {vip_key} has {count} backends; stateless_mode=mac allows at most "
            f"{MAX_BACKENDS_PER_VIP}: OVS 3.1 cannot read back a group description over "
            "64 KiB (about 750 of our buckets), so larger groups could not be verified")
    backends: dict[str, tuple[IpAddress, int, str]] = {}
    for raw in text.split(","):
        raw = raw.strip(" \t")
        if not raw:
            raise _Invalid(f"VIP {vip_key} has an empty backend entry (stray comma)")
        endpoint = parse_endpoint(raw)
        if endpoint == NO_PORT:
            raise _Invalid(
                f"backend {show(raw)} of VIP {vip_key} has no port: "
                "stateless_mode=mac needs IP:port backends"
            )
        if isinstance(endpoint, str):
            raise _Invalid(f"backend {show(raw)} of VIP {vip_key} {endpoint}")
        ip, port = endpoint
        if ip.version != vip_ip.version:
            raise _Invalid(
                f"backend {show(raw)} of VIP {vip_key} is IPv{ip.version}, "
                f"the VIP is IPv{vip_ip.version}"
            )
        key = endpoint_key(ip, port)
        if key in backends:
            raise _Invalid(f"backend {key} is listed twice in VIP {vip_key}")
        backends[key] = (ip, port, key)
    return tuple(backends[key] for key in sorted(backends))


def _single_router(index: TopologyIndex, lb_uuid: str) -> NbRouter:
    routers = index.routers_by_lb.get(lb_uuid, [])
    if not routers:
        raise _Invalid("not attached to any logical router")
    if len(routers) > 1:
        names = [_as_str(r.name) for r in routers]
        raise _Invalid(
            f"attached to {len(routers)} logical routers ({_listing(names)}): "
            "stateless_mode=mac supports exactly one router per load balancer"
        )
    return routers[0]


class _BackendResolver:
    """Finds each backend's switch port, MAC and facing router port."""

    def __init__(
        self,
        lb: NbLoadBalancer,
        nb: NbView,
        index: TopologyIndex,
        router: NbRouter,
        router_ports: Mapping[str, NbRouterPort],
    ) -> None:
        self._nb = nb
        self._index = index
        self._router_name = _as_str(router.name)
        self._router_ports = router_ports
        self._attached = index.attachments.get(_as_str(router.uuid), {})
        self._mapped_lsp = _parse_ip_port_mappings(lb.ip_port_mappings)

    def resolve_vip(self, vip: _ParsedVip) -> tuple[ValidBackend, ...]:
        resolved = [self._resolve(vip.key, ip, port, key) for ip, port, key in vip.backends]
        by_port: dict[str, str] = {}
        by_destination: dict[tuple[str, str], str] = {}
        for backend in resolved:
            # The gateway can only steer by MAC: one VIP cannot reach two
            # backends behind one port (the backend chassis could not tell
            # which one to DNAT to).
            other = by_port.get(backend.lsp_name) or by_destination.get(
                (backend.switch_uuid, backend.mac))
            if other:
                raise _Invalid(
                    f"backends {other} and {backend.key} of VIP {vip.key} are behind the "
                    f"same port {show(backend.lsp_name)} (MAC {backend.mac}): "
                    "stateless_mode=mac picks backends by MAC"
                )
            by_port[backend.lsp_name] = backend.key
            by_destination[(backend.switch_uuid, backend.mac)] = backend.key
        return tuple(resolved)

    def _resolve(self, vip_key: str, ip: IpAddress, port: int, key: str) -> ValidBackend:
        where = f"backend {key} of VIP {vip_key}"
        if ip in self._mapped_lsp:
            lsp_name, mac, switch_uuid = self._from_mapping(where, ip, self._mapped_lsp[ip])
        else:
            lsp_name, mac, switch_uuid = self._from_addresses(where, ip)
        lrps = self._attached[switch_uuid]
        if len(lrps) != 1:
            raise _Invalid(
                f"{where}: switch of port {show(lsp_name)} is attached to router "
                f"{show(self._router_name)} through {len(lrps)} ports ({_listing(sorted(lrps))})"
            )
        lrp_name = lrps[0]
        lrp = self._router_ports.get(lrp_name)
        lrp_mac = parse_mac(lrp.mac) if isinstance(lrp, NbRouterPort) else None
        if lrp_mac is None:
            raise _Invalid(
                f"{where}: router port {show(lrp_name)} facing its switch has no valid "
                "unicast MAC"
            )
        return ValidBackend(ip, port, key, lsp_name, mac, switch_uuid, lrp_name, lrp_mac)

    def _from_mapping(
        self, where: str, ip: IpAddress, lsp_name: str | None
    ) -> tuple[str, str, str]:
        if lsp_name is None:
            raise _Invalid(f"{where}: ip_port_mappings entry for {ip} is malformed or repeated")
        port = self._nb.switch_ports.get(lsp_name) if isinstance(
            self._nb.switch_ports, Mapping) else None
        if not isinstance(port, NbSwitchPort):
            raise _Invalid(
                f"{where}: ip_port_mappings names port {show(lsp_name)}, which does not exist"
            )
        if port.type != "":
            raise _Invalid(
                f"{where}: ip_port_mappings names port {show(lsp_name)} of type "
                f"{show(port.type)}; only VIF ports (type \"\") can be backends"
            )
        switch_uuid = self._attached_switch_of(where, lsp_name)
        announcing = {
            a.mac for a in self._index.addresses.get(switch_uuid, {}).get(ip, [])
            if a.lsp_name == lsp_name
        }
        macs = announcing or self._index.macs_of_lsp.get(lsp_name, set())
        if len(macs) != 1:
            raise _Invalid(
                f"{where}: cannot tell the MAC of port {show(lsp_name)} "
                f"({len(macs)} candidates in its addresses)"
            )
        return lsp_name, next(iter(macs)), switch_uuid

    def _attached_switch_of(self, where: str, lsp_name: str) -> str:
        switches = self._index.switches_of_lsp.get(lsp_name, [])
        if len(switches) != 1:
            raise _Invalid(f"{where}: port {show(lsp_name)} is on {len(switches)} switches")
        if switches[0] not in self._attached:
            raise _Invalid(
                f"{where}: port {show(lsp_name)} is on a switch not attached to router "
                f"{show(self._router_name)}"
            )
        return switches[0]

    def _from_addresses(self, where: str, ip: IpAddress) -> tuple[str, str, str]:
        matches = [
            (switch_uuid, found)
            for switch_uuid in sorted(self._attached)
            for found in self._index.addresses.get(switch_uuid, {}).get(ip, [])
        ]
        ports = sorted({found.lsp_name for _, found in matches})
        if not ports:
            raise _Invalid(
                f"{where} matches no logical switch port on a switch attached to router "
                f"{show(self._router_name)}"
            )
        if len(ports) > 1:
            raise _Invalid(
                f"{where} is ambiguous: {ip} is an address of ports {_listing(ports)}; "
                "set ip_port_mappings to choose one"
            )
        macs = sorted({found.mac for _, found in matches})
        if len(macs) > 1:
            raise _Invalid(
                f"{where} is ambiguous: port {show(ports[0])} announces {ip} with MACs "
                f"{_listing(macs)}"
            )
        switch_uuid = self._attached_switch_of(where, ports[0])
        return ports[0], macs[0], switch_uuid


def _parse_ip_port_mappings(raw: object) -> dict[IpAddress, str | None]:
    """Backend IP -> LSP name from OVN's "lsp:source_ip" values.

    A None value marks an IP whose entries are malformed or contradict each
    other (e.g. "fd00::11" and "[fd00::11]" naming different ports).
    """
    mappings = _str_map(raw) or {}
    result: dict[IpAddress, str | None] = {}
    for raw_key in sorted(mappings):
        key = raw_key[1:-1] if raw_key.startswith("[") and raw_key.endswith("]") else raw_key
        ip = parse_ip(key)
        if ip is None:
            continue  # not about any backend we could name
        lsp_name, sep, _source_ip = mappings[raw_key].partition(":")
        value = lsp_name if sep and lsp_name else None
        if ip in result and result[ip] != value:
            value = None
        result[ip] = value
    return result
