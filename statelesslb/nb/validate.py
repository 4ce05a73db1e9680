"""Turn a raw NB Load_Balancer into typed, checked values, or say why not.

Nothing read from the NB is trusted: every value that later reaches an
OpenFlow string leaves this module as an `ipaddress` object, an int or a
canonical MAC. Names (switch, port, router) are returned too, but only for
dictionary lookups and operator messages, never for flow text.

`validate_lb` never raises on bad input: malformed values of any type give an
`LbError` whose message names the VIP or backend and the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from statelesslb.nb.hashing import DEFAULT_HASH, HashClasses, HashOptionError, parse_hash
from statelesslb.nb.model import (
    PERSISTENCE_OPTION,
    RETURN_OPTION,
    WINDOW_OPTION,
    NbLoadBalancer,
    NbRouter,
    NbRouterPort,
    NbSwitch,
    NbSwitchPort,
    NbView,
)
from statelesslb.nb.parse import (
    NO_PORT,
    PORT,
    as_str,
    endpoint_key,
    is_marked,
    listing,
    parse_endpoint,
    parse_ip,
    parse_mac,
    show,
    str_map,
    str_tuple,
)
from statelesslb.nb.topology import (
    UNSET,
    TopologyIndex,
    index_topology,
    routers_of_lb,
    safe_topology_key,
)
from statelesslb.nb.weights import WEIGHTS_OPTION, WeightOptionError, parse_weights
from statelesslb.ofstrings import IpAddress

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
DEFAULT_PROTOCOL = "tcp"
# ovn-northd does not care, but a status message should stay readable.


@dataclass(frozen=True, slots=True)
class ValidBackend:
    ip: IpAddress
    port: int
    key: str                 # canonical "10.0.0.11:8080" / "[fd00::11]:8080"
    lsp_name: str            # the backend's logical switch port
    mac: str                 # its MAC, lowercase, unicast
    switch_uuid: str
    router_port_name: str    # the LRP facing the backend's switch
    router_port_mac: str


@dataclass(frozen=True, slots=True)
class ValidVip:
    ip: IpAddress
    port: int
    key: str                 # canonical "172.16.0.100:80" / "[fd00::100]:80"
    backends: tuple[ValidBackend, ...]


@dataclass(frozen=True, slots=True)
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
    # options:stateless_return=direct: replies leave the backends' chassis onto the
    # DGPs' external networks (each DGP with the physical networks of its switch's
    # localnet ports), where a chassis can.
    direct_return: bool = False
    dgp_networks: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()

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


@dataclass(frozen=True, slots=True)
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
    if not isinstance(raw_window, str) or not PORT.fullmatch(raw_window) or not (
            1 <= int(raw_window) <= MAX_WINDOW):
        raise _Invalid(f"options:{WINDOW_OPTION}={show(raw_window)} is not a number of "
                       f"seconds in 1..{MAX_WINDOW}")
    return "affinity" in layers, "second-chance" in layers, int(raw_window)


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


class ValidationMemo:
    """validate_lb results, reused while the topology and the LB's own row are unchanged.

    The NB writer and the planner validate every marked LB on every change; with
    this, a change to one LB re-validates that LB only. Unhashable (fuzzed) input
    bypasses the memo.
    """

    def __init__(self) -> None:
        self._topology: object = None
        # LB uuid -> its latest ((memo key, result), ...)
        self._results: dict[str, tuple[tuple[object, ValidLb | LbError], ...]] = {}

    def scope(self, nb: NbView, topology: object = UNSET) -> ValidationMemo:
        """Call once per pass over the LBs: compares the topology once, not per LB.

        `topology` is topology_key(nb) when the caller has it already (None: unusable).
        """
        if topology is UNSET:
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
        # The last two results per LB (the NB writer and the planner may look at two
        # versions of a row in turn): a churning LB must not pile up stale results.
        kept = self._results.get(lb.uuid, ())
        for old_key, result in kept:
            if old_key == key:
                return result
        result = validate_lb(lb, nb, index)
        if len(self._results) > 200_000:
            self._results.clear()
        self._results[lb.uuid] = ((key, result), *kept[:1])
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
# The validator


def validate_lb(
    lb: NbLoadBalancer, nb: NbView, index: TopologyIndex | None = None
) -> ValidLb | LbError:
    """Check `lb` against `nb`. Pass `index_topology(nb)` when validating many LBs."""
    uuid = as_str(getattr(lb, "uuid", ""))
    name = as_str(getattr(lb, "name", ""))
    try:
        return _validate(lb, nb, index or index_topology(nb), uuid, name)
    except _Invalid as invalid:
        return LbError(uuid, name, str(invalid))
    except Exception as exc:  # a fuzzer's wrong types must never crash the agent
        return LbError(uuid, name, f"cannot validate: unexpected {type(exc).__name__}")


@dataclass(frozen=True, slots=True)
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
        p for p in str_tuple(router.ports)
        if isinstance(router_ports.get(p), NbRouterPort) and router_ports[p].is_gateway is True
    ))
    router_name = as_str(router.name)
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
    direct = parse_return(lb.options)
    dgp_networks: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()
    if direct:
        if affinity:
            raise _Invalid(f"options:{RETURN_OPTION}=direct does not go with affinity: the "
                           "gateway's conntrack would see one direction only")
        dgp_networks = _dgp_networks(nb, index, as_str(router.uuid), dgps)
    return ValidLb(uuid, name, protocol, as_str(router.uuid), router_name, dgps, valid_vips,
                   affinity, second_chance, window, hash_classes, tuple(sorted(weights.items())),
                   direct, dgp_networks)


def parse_return(options: object) -> bool:
    """True for options:stateless_return=direct; raises _Invalid on a bad value."""
    opts = options if isinstance(options, Mapping) else {}
    raw = opts.get(RETURN_OPTION, "gateway")
    if raw not in ("gateway", "direct"):
        raise _Invalid(f"options:{RETURN_OPTION}={show(raw)} is not gateway or direct")
    return raw == "direct"


def _dgp_networks(
    nb: NbView, index: TopologyIndex, router_uuid: str, dgps: tuple[str, ...]
) -> tuple[tuple[str, tuple[tuple[str, int], ...]], ...]:
    """Each DGP with the (physical network, VLAN or 0) of the localnet ports on its
    switch."""
    switches = nb.switches if isinstance(nb.switches, Mapping) else {}
    switch_ports = nb.switch_ports if isinstance(nb.switch_ports, Mapping) else {}
    result = []
    for dgp in dgps:
        networks: set[tuple[str, int]] = set()
        for switch_uuid, lrps in index.attachments.get(router_uuid, {}).items():
            switch = switches.get(switch_uuid)
            if dgp not in lrps or not isinstance(switch, NbSwitch):
                continue
            for lsp_name in str_tuple(switch.ports):
                port = switch_ports.get(lsp_name)
                if not isinstance(port, NbSwitchPort) or port.type != "localnet":
                    continue
                options = port.options if isinstance(port.options, Mapping) else {}
                network = options.get("network_name")
                tag = port.tag_request if port.tag_request is not None else 0
                if not isinstance(tag, int) or isinstance(tag, bool) or not 0 <= tag <= 4095:
                    raise _Invalid(f"localnet port {show(lsp_name)} has VLAN {show(tag)}, "
                                   "not 0..4095")
                if isinstance(network, str) and network:
                    networks.add((network, tag))
        if not networks:
            raise _Invalid(f"options:{RETURN_OPTION}=direct needs a localnet port with "
                           f"options:network_name on the switch of gateway port {show(dgp)}")
        result.append((dgp, tuple(sorted(networks))))
    return tuple(result)


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
    vips = str_map(raw_vips)
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
        names = [as_str(r.name) for r in routers]
        raise _Invalid(
            f"attached to {len(routers)} logical routers ({listing(names)}): "
            "stateless_mode=mac supports exactly one router per load balancer"
        )
    return routers[0]


_NOT_MAPPED = object()    # no ip_port_mappings entry for the backend's IP
_RESOLVED_MAX = 200_000   # backends resolved per topology, kept at most


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
        self._router_name = as_str(router.name)
        self._router_ports = router_ports
        self._router_uuid = as_str(router.uuid)
        self._attached = index.attachments.get(self._router_uuid, {})
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
        # What a backend resolves to depends on the topology (this index's), the router,
        # the IP and this LB's mapping for it: the LBs sharing backends share the work
        # and the ValidBackend objects (memory at scale, docs/scale.md).
        mapped = self._mapped_lsp.get(ip, _NOT_MAPPED)
        try:
            memo_key = (self._router_uuid, ip, port, key, mapped)
            found = self._index.resolved.get(memo_key)
        except TypeError:     # a fuzzer's unhashable value
            return self._resolve_now(vip_key, ip, port, key)
        if found is None:
            found = self._resolve_now(vip_key, ip, port, key)
            if len(self._index.resolved) < _RESOLVED_MAX:
                self._index.resolved[memo_key] = found
        return found

    def _resolve_now(self, vip_key: str, ip: IpAddress, port: int, key: str) -> ValidBackend:
        where = f"backend {key} of VIP {vip_key}"
        if ip in self._mapped_lsp:
            lsp_name, mac, switch_uuid = self._from_mapping(where, ip, self._mapped_lsp[ip])
        else:
            lsp_name, mac, switch_uuid = self._from_addresses(where, ip)
        lrps = self._attached[switch_uuid]
        if len(lrps) != 1:
            raise _Invalid(
                f"{where}: switch of port {show(lsp_name)} is attached to router "
                f"{show(self._router_name)} through {len(lrps)} ports ({listing(sorted(lrps))})"
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
                f"{where} is ambiguous: {ip} is an address of ports {listing(ports)}; "
                "set ip_port_mappings to choose one"
            )
        macs = sorted({found.mac for _, found in matches})
        if len(macs) > 1:
            raise _Invalid(
                f"{where} is ambiguous: port {show(ports[0])} announces {ip} with MACs "
                f"{listing(macs)}"
            )
        switch_uuid = self._attached_switch_of(where, ports[0])
        return ports[0], macs[0], switch_uuid


def _parse_ip_port_mappings(raw: object) -> dict[IpAddress, str | None]:
    """Backend IP -> LSP name from OVN's "lsp:source_ip" values.

    A None value marks an IP whose entries are malformed or contradict each
    other (e.g. "fd00::11" and "[fd00::11]" naming different ports).
    """
    mappings = str_map(raw) or {}
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
