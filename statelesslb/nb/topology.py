"""The NB topology indexed once per NB view (ports by address, routers of each LB), and
what tells which LBs a topology change reaches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from statelesslb.nb.model import (
    NbRouter,
    NbSwitch,
    NbSwitchPort,
    NbView,
)
from statelesslb.nb.parse import ADDRESS_KEYWORDS, as_str, parse_ip, parse_mac, str_tuple
from statelesslb.ofstrings import IpAddress

UNSET = object()


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

    One cache may serve several readers (the agent's NB writer and planner share
    one: one index in memory, built once per change): each passes a `reader` of its
    own and is told what changed since its own last call.
    """

    # How many topology versions back a reader may be told what changed (further
    # back: "changed, reach unknown", which re-validates every LB).
    HISTORY = 8

    def __init__(self) -> None:
        self._source: tuple[object, ...] = ()
        self._key: object = None
        self._index: TopologyIndex | None = None
        self._nb: NbView | None = None
        self._router_lbs: dict[object, tuple[str, ...]] | None = None
        self._version = 0
        # Per version since the previous one: (changed, moved, changes).
        self._history: dict[int, tuple[bool, frozenset[str], TopologyChanges | None]] = {}
        self._seen: dict[object, int] = {}      # reader -> the version it saw last

    def latest(self) -> tuple[NbView, object, TopologyIndex] | None:
        """(the view indexed last, its topology key, its index), if any."""
        if self._nb is None or self._index is None:
            return None
        return self._nb, self._key, self._index

    def get(self, nb: NbView, reader: object = None) -> TopologyState:
        source = (nb.routers, nb.router_ports, nb.switches, nb.switch_ports)
        if self._index is None or not same_objects(source, self._source):
            self._advance(nb, source)
        assert self._index is not None
        seen = self._seen.get(reader)
        self._seen[reader] = self._version
        if seen == self._version:
            return TopologyState(self._key, self._index, False, frozenset())
        steps = [] if seen is None else [
            self._history.get(v) for v in range(self._version, seen, -1)]
        if not steps or any(step is None for step in steps):
            # A new reader, or one too far behind: everything may differ.
            return TopologyState(self._key, self._index, True, frozenset(), None)
        changed = any(step[0] for step in steps)
        moved = frozenset().union(*(step[1] for step in steps))
        changes = None
        if changed and self._key is not None:
            changes = _union_changes([step[2] for step in steps if step[0]])
        return TopologyState(self._key, self._index, changed, moved, changes)

    def _advance(self, nb: NbView, source: tuple[object, ...]) -> None:
        key = safe_topology_key(nb)
        changed = key is None or key != self._key or self._index is None
        index = index_topology(nb)
        old_nb, old_index = self._nb, self._index
        changes = None
        if changed and key is not None and old_nb is not None and old_index is not None:
            changes = _topology_changes(old_nb, old_index, nb, index)
        router_lbs = _router_lbs(nb)
        moved = _moved_lbs(self._router_lbs, router_lbs) if old_nb is not None else None
        self._source, self._key, self._index, self._nb = source, key, index, nb
        self._router_lbs = router_lbs
        self._version += 1
        if moved is None:
            self._history.clear()   # no previous view: every reader starts afresh
        else:
            self._history[self._version] = (changed, moved, changes)
            self._history.pop(self._version - self.HISTORY, None)


def _moved_lbs(before: dict[object, tuple[str, ...]] | None,
               after: dict[object, tuple[str, ...]] | None) -> frozenset[str] | None:
    """LBs attached to or detached from a router between two views (None: cannot tell):
    those in one router's list before or after but not both. Not a pass over every LB:
    only the routers whose lists differ (a C-speed tuple comparison for the others)."""
    if before is None or after is None:
        return None
    moved: set[str] = set()
    for router in before.keys() | after.keys():
        a, b = before.get(router, ()), after.get(router, ())
        if a != b:
            moved.update(set(a).symmetric_difference(b))
    return frozenset(moved)


def _router_lbs(nb: NbView) -> dict[object, tuple[str, ...]] | None:
    """(Router key, uuid) -> the LBs it holds, as index_topology reads them (None: a
    fuzzer's odd view)."""
    try:
        if not isinstance(nb.routers, Mapping):
            return {}
        return {(k, as_str(r.uuid)): str_tuple(r.load_balancers)
                for k, r in nb.routers.items() if isinstance(r, NbRouter)}
    except Exception:
        return None


def _union_changes(steps: list[TopologyChanges | None]) -> TopologyChanges | None:
    """What a run of topology changes touched in all (None when one cannot be told)."""
    if any(step is None for step in steps):
        return None
    if len(steps) == 1:
        return steps[0]
    return TopologyChanges(frozenset().union(*(s.routers for s in steps)),
                           frozenset().union(*(s.ips for s in steps)),
                           frozenset().union(*(s.lsps for s in steps)))


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
                if not lrps.isdisjoint(str_tuple(router.ports)):
                    routers.add(as_str(router.uuid))
        routers.update(changed_keys(old.attachments, new.attachments))
        ips: set[object] = set()
        for switch in old.addresses.keys() | new.addresses.keys():
            ips.update(changed_keys(old.addresses.get(switch, {}),
                                     new.addresses.get(switch, {})))
        lsps = (changed_keys(old_nb.switch_ports, new_nb.switch_ports)
                | changed_keys(old.switches_of_lsp, new.switches_of_lsp)
                | changed_keys(old.macs_of_lsp, new.macs_of_lsp))
        routers.update(_routers_of_changed_localnets(lsps, (old_nb, old), (new_nb, new)))
        return TopologyChanges(frozenset(routers), frozenset(ips), frozenset(lsps))
    except Exception:    # a fuzzer's view: unhashable or odd values
        return None


def _routers_of_changed_localnets(
    lsps: set, *views: tuple[NbView, TopologyIndex]
) -> set[str]:
    """Routers plugged into a switch whose localnet port changed: what direct return
    reads of a DGP's switch (rare changes; a VIF next to the backends costs nothing)."""
    routers: set[str] = set()
    for name in lsps:
        if not any(isinstance(p := nb.switch_ports.get(name), NbSwitchPort)
                   and p.type == "localnet" for nb, _ in views):
            continue
        for _, index in views:
            for switch_uuid in index.switches_of_lsp.get(name, []):
                routers.update(r for r, attached in index.attachments.items()
                               if switch_uuid in attached)
    return routers


def _router_shape(router: object) -> object:
    """A router as validation sees it: everything but its LB list."""
    if not isinstance(router, NbRouter):
        return router
    return (router.uuid, router.name, router.ports)


class Dependents:
    """Which LBs read which keys (topology or SB), kept in step LB by LB.

    An LB whose keys are unknown (None: an invalid LB, whose error may name
    anything) counts as reading every key.

    Kept small, as there are tens of keys per LB (docs/scale.md): LBs that read the
    same keys share one entry (their "signature", the keys as a tuple), equal keys
    are stored once, and where one reader is indexed it is kept without a set.
    """

    def __init__(self) -> None:
        # key -> (the key object kept, the signature(s) holding it)
        self._by_key: dict[object, tuple[object, OneOrMore]] = {}
        # signature -> (the signature object kept, its reader(s))
        self._readers: dict[tuple[object, ...], tuple[tuple[object, ...], OneOrMore]] = {}
        self._keys: dict[str, tuple[object, ...]] = {}             # uuid -> its signature
        self._anything: set[str] = set()

    def set(self, uuid: str, keys: Iterable[object] | None) -> None:
        self.discard(uuid)
        if keys is None:
            self._anything.add(uuid)
            return
        # Ordered by hash: equal key sets give equal tuples (unequal keys of equal
        # hash may come in either order: such sets then only fail to share an entry).
        signature = tuple(sorted(set(keys), key=hash))
        entry = self._readers.get(signature)
        if entry is not None:
            kept, readers = entry
            self._readers[kept] = (kept, add_member(readers, uuid))
            self._keys[uuid] = kept    # the signature object already indexed
            return
        shared = []
        for key in signature:
            entry = self._by_key.get(key)
            shared.append(entry[0] if entry is not None else key)
        signature = tuple(shared)
        for key in signature:
            entry = self._by_key.get(key)
            self._by_key[key] = (key, signature) if entry is None else (
                entry[0], add_member(entry[1], signature))
        self._readers[signature] = (signature, uuid)
        self._keys[uuid] = signature

    def discard(self, uuid: str) -> None:
        self._anything.discard(uuid)
        signature = self._keys.pop(uuid, None)
        if signature is None:
            return
        left = remove_member(self._readers[signature][1], uuid)
        if left is not None:
            self._readers[signature] = (signature, left)
            return
        del self._readers[signature]
        for key in signature:
            kept, sigs = self._by_key[key]
            left = remove_member(sigs, signature)
            if left is None:
                del self._by_key[key]
            else:
                self._by_key[key] = (kept, left)

    def of(self, keys: Iterable[object]) -> set[str]:
        """The LBs that read any of `keys`, and those that may read anything."""
        found = set(self._anything)
        for key in keys:
            entry = self._by_key.get(key)
            if entry is None:
                continue
            for signature in members(entry[1]):
                found.update(members(self._readers[signature][1]))
        return found


# One item, or a set of several (a set of one costs ~200 bytes). Items are never sets.
OneOrMore = object


def members(items: OneOrMore) -> Iterable:
    return items if isinstance(items, set) else (items,)


def add_member(items: OneOrMore, item: object) -> OneOrMore:
    """`items` (one item or a set of several) with `item` too."""
    if isinstance(items, set):
        items.add(item)
        return items
    return items if items == item else {items, item}


def remove_member(items: OneOrMore, item: object) -> OneOrMore | None:
    """What is left of `items` (one item or a set of several) without `item` (None:
    nothing)."""
    if not isinstance(items, set):
        return None if items == item else items
    items.discard(item)
    if len(items) == 1:
        return next(iter(items))
    return items or None


def routers_of_lb(index: TopologyIndex, lb_uuid: object) -> tuple[str, ...]:
    """Uuids of the routers an LB is attached to."""
    return tuple(as_str(r.uuid) for r in index.routers_by_lb.get(lb_uuid, ()))


def topology_key(nb: NbView) -> object:
    """Everything of the NB but the load balancers and their attachments, hashable."""
    return (
        frozenset((r.uuid, r.name, tuple(r.ports)) for r in nb.routers.values()),
        frozenset(nb.router_ports.values()),
        frozenset((s.uuid, s.name, tuple(s.ports)) for s in nb.switches.values()),
        frozenset((p.uuid, p.name, p.type, tuple(p.addresses), frozenset(p.options.items()))
                  for p in nb.switch_ports.values()),
    )


# ---------------------------------------------------------------------------
# Topology index: built once per NbView, shared by every LB's validation.


@dataclass(frozen=True, slots=True)
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
    # Backends validation resolved against this topology (statelesslb.nb.validate):
    # (router uuid, IP, port, key, the LB's mapping for the IP) -> its ValidBackend.
    resolved: dict[tuple[object, ...], object] = field(default_factory=dict, compare=False,
                                                       repr=False)


def _vif_addresses(port: NbSwitchPort) -> list[tuple[str, list[IpAddress]]]:
    """(MAC, IPs) of each "MAC IP [IP...]" entry; keywords and junk skipped."""
    entries = []
    for entry in str_tuple(port.addresses):
        tokens = entry.split()
        if not tokens or tokens[0] in ADDRESS_KEYWORDS:
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
    for router in sorted(routers, key=lambda r: (as_str(r.name), as_str(r.uuid))):
        for lb_uuid in str_tuple(router.load_balancers):
            index.routers_by_lb.setdefault(lb_uuid, []).append(router)
        for lrp in str_tuple(router.ports):
            router_of_lrp.setdefault(lrp, []).append(as_str(router.uuid))

    switch_ports = nb.switch_ports if isinstance(nb.switch_ports, Mapping) else {}
    switches = [s for s in _rows(nb.switches) if isinstance(s, NbSwitch)]
    for switch in sorted(switches, key=lambda s: as_str(s.uuid)):
        switch_uuid = as_str(switch.uuid)
        by_ip = index.addresses.setdefault(switch_uuid, {})
        for lsp_name in str_tuple(switch.ports):
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
