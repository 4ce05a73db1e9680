"""Stable bucket and VIP ids, persisted in NB Load_Balancer external_ids.

OVS hashes `selection_method=hash` groups by bucket id, so a backend must keep
its bucket id for as long as it exists, and every gateway must read the same
ids: they live in the NB, written by one NB writer using `reconcile_nb`.

Id spaces:
- bucket ids: one space per LB, keyed by backend "IP:port" (a backend shared
  by two VIPs of one LB has one id, so it wins the same hashes in both groups);
- VIP ids: one space across all marked LBs; group id = base + VIP id.

Everything here is pure: no I/O.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from types import MappingProxyType

from statelesslb.nb.acks import DEFAULT_ACK_TIMEOUT, AckState, ack_state, join
from statelesslb.nb.model import (
    EXT_ACTIVE,
    EXT_BUCKETS,
    EXT_DRAIN,
    EXT_PREVIOUS,
    EXT_STATUS,
    EXT_VIP_IDS,
    NbLoadBalancer,
    NbView,
    SbView,
)
from statelesslb.nb.parse import is_marked, show
from statelesslb.nb.stored import (
    MAX_BUCKET_ID,
    MAX_VIP_ID,
    ActiveSet,
    dump_id_map,
    parse_active,
    parse_drain_checked,
    parse_id_map,
    parse_previous,
    stored_ids,
)
from statelesslb.nb.topology import (
    Dependents,
    OneOrMore,
    TopologyCache,
    TopologyIndex,
    add_member,
    index_topology,
    members,
    remove_member,
)
from statelesslb.nb.validate import LbError, ValidationMemo, ValidLb, topology_deps
from statelesslb.ofstrings import is_plain_int

# reconcile_nb (the from-scratch path: tests, bench/core_scale.py) sees every LB on each
# call: across calls, it validates an LB again only when its row or the topology changed.
_VALIDATION = ValidationMemo()
# external_ids keys the NB writer owns; statelesslb:drain is the operator's.
WRITER_KEYS = (EXT_BUCKETS, EXT_VIP_IDS, EXT_STATUS, EXT_ACTIVE, EXT_PREVIOUS)
STATUS_OK = "ok"
ERROR_PREFIX = "error: "
_MAX_STATUS_LEN = 1000


class IdSpaceExhausted(ValueError):
    """No free id is left under the maximum (needs ~4 billion keys)."""


def allocate_ids(
    existing: Mapping[str, int],
    keys: Iterable[str],
    *,
    reserved: Set[int] = frozenset(),
    max_id: int = MAX_BUCKET_ID,
    start: int = 1,
) -> dict[str, int]:
    """Ids for `keys`: surviving keys keep theirs, new keys get the smallest free id.

    `start`: every id below it is in `reserved` (so the search for a free id may begin
    there: with thousands of LBs, the NB writer's VIP ids are allocated in O(N), not
    O(N^2)).

    Ids of keys no longer present are freed. New keys are numbered in sorted
    order (deterministic) from 1, skipping ids in use and `reserved` (ids that
    must not be handed out right now, e.g. another LB's). An existing id that
    is out of range or duplicated is treated as missing (the first key in
    sorted order keeps a duplicated id).
    """
    wanted = sorted(set(keys))
    result: dict[str, int] = {}
    taken: set[int] = set()
    for key in wanted:
        old = existing.get(key)
        if is_plain_int(old) and 1 <= old <= max_id and old not in taken:
            result[key] = old
            taken.add(old)
    candidate = max(1, start)
    for key in wanted:
        if key in result:
            continue
        while candidate in taken or candidate in reserved:
            candidate += 1
        if candidate > max_id:
            raise IdSpaceExhausted(f"no free id left in 1..{max_id}")
        result[key] = candidate
        taken.add(candidate)
    return dict(sorted(result.items()))


# ---------------------------------------------------------------------------
# The NB writer's logic


@dataclass(frozen=True)
class _ClaimedVipIds:
    """Persisted VIP ids after resolving clashes between LBs."""

    kept: dict[str, dict[str, int]]        # LB uuid -> VIP key -> id it keeps
    notes: dict[str, list[str]]            # LB uuid -> why some ids were dropped
    in_use: set[int]                       # every persisted id: not reusable this pass


def _external_ids(lb: NbLoadBalancer) -> Mapping[str, str]:
    ext = getattr(lb, "external_ids", None)
    return ext if isinstance(ext, Mapping) else {}


def _lb_order(lb: NbLoadBalancer) -> tuple[str, str]:
    name, uuid = getattr(lb, "name", ""), getattr(lb, "uuid", "")
    return (name if isinstance(name, str) else "", uuid if isinstance(uuid, str) else "")


def _claim_vip_ids(lbs: list[NbLoadBalancer]) -> _ClaimedVipIds:
    """Walk LBs in (name, uuid) order; an id already claimed is dropped from later LBs."""
    owner: dict[int, NbLoadBalancer] = {}
    kept: dict[str, dict[str, int]] = {}
    notes: dict[str, list[str]] = {}
    in_use: set[int] = set()
    for lb in sorted(lbs, key=_lb_order):
        valid_ids = _stored_vip_ids(_external_ids(lb).get(EXT_VIP_IDS))
        # Ids an unmarked LB is about to release stay blocked for this pass
        # too, so a gateway never sees one group id change VIPs in one step.
        in_use.update(valid_ids.values())
        if not is_marked(lb):
            continue
        mine: dict[str, int] = {}
        for key in sorted(valid_ids):
            vip_id = valid_ids[key]
            holder = owner.get(vip_id)
            if holder is None:
                owner[vip_id] = lb
                mine[key] = vip_id
            else:
                where = "this load balancer" if holder is lb else (
                    f"load balancer {show(holder.name)}")
                notes.setdefault(lb.uuid, []).append(
                    f"VIP id {vip_id} of {key} re-allocated: also used by {where}")
        kept[lb.uuid] = mine
    return _ClaimedVipIds(kept, notes, in_use)


class _ClaimIndex:
    """_claim_vip_ids(every LB) kept LB by LB: a change to a few LBs re-claims only the
    LBs that list one of the ids those LBs listed before or list now.

    An id goes to the first marked LB in (name, uuid) order that lists it, as in
    _claim_vip_ids; `kept`, `notes` and `in_use` are the same as its result.
    """

    def __init__(self) -> None:
        self.kept: dict[str, dict[str, int]] = {}
        self.notes: dict[str, list[str]] = {}
        self.in_use: set[int] = set()
        # uuid -> (order, marked, its usable stored ids, its name); the LBs listing each id.
        self._entries: dict[str, tuple[tuple[str, str], bool, Mapping[str, int], object]] = {}
        self._holders: dict[int, OneOrMore] = {}

    def claims(self) -> _ClaimedVipIds:
        return _ClaimedVipIds(self.kept, self.notes, self.in_use)

    def update(self, lbs: Mapping[str, NbLoadBalancer], uuids: Iterable[str]) -> set[str]:
        """Take in the LBs `uuids` as they are in `lbs` now (absent: gone); returns the
        marked LBs whose kept ids or notes changed. Raises ValueError for an LB whose
        uuid is not its key (a fuzzer's): the caller claims from scratch then."""
        touched_ids: set[int] = set()
        uuids = set(uuids)
        for uuid in uuids:
            old = self._entries.pop(uuid, None)
            if old is not None:
                for vip_id in old[2].values():
                    left = remove_member(self._holders[vip_id], uuid)
                    if left is None:
                        del self._holders[vip_id]
                        self.in_use.discard(vip_id)
                    else:
                        self._holders[vip_id] = left
                    touched_ids.add(vip_id)
            lb = lbs.get(uuid)
            if lb is None:
                continue
            if getattr(lb, "uuid", None) != uuid:
                raise ValueError("LB keyed by another uuid")
            ids = _stored_vip_ids(_external_ids(lb).get(EXT_VIP_IDS))
            self._entries[uuid] = (_lb_order(lb), is_marked(lb), ids, getattr(lb, "name", ""))
            for vip_id in ids.values():
                holders = self._holders.get(vip_id)
                self._holders[vip_id] = uuid if holders is None else add_member(holders, uuid)
                self.in_use.add(vip_id)
                touched_ids.add(vip_id)
        affected = set(uuids)
        for vip_id in touched_ids:
            holders = self._holders.get(vip_id)
            if holders is not None:
                affected.update(members(holders))
        moved = set()
        for uuid in affected:
            before = (self.kept.get(uuid), self.notes.get(uuid))
            self._claim(uuid)
            if (self.kept.get(uuid), self.notes.get(uuid)) != before:
                moved.add(uuid)
        return moved

    def _claim(self, uuid: str) -> None:
        self.kept.pop(uuid, None)
        self.notes.pop(uuid, None)
        entry = self._entries.get(uuid)
        if entry is None or not entry[1]:
            return
        ids = entry[2]
        mine: dict[str, int] = {}
        for key in sorted(ids):
            vip_id = ids[key]
            owner = self._owner(vip_id)
            if owner == uuid and vip_id not in mine.values():
                mine[key] = vip_id
                continue
            where = "this load balancer" if owner == uuid else (
                f"load balancer {show(self._name(owner))}")
            self.notes.setdefault(uuid, []).append(
                f"VIP id {vip_id} of {key} re-allocated: also used by {where}")
        self.kept[uuid] = mine

    def _owner(self, vip_id: int) -> str:
        """The first marked LB in (name, uuid) order listing `vip_id`."""
        holders = self._holders[vip_id]
        if not isinstance(holders, set):
            return holders
        marked = [u for u in holders if self._entries[u][1]]
        return min(marked, key=lambda u: self._entries[u][0])

    def _name(self, uuid: str) -> object:
        return self._entries[uuid][3]


def _stored_vip_ids(text: object) -> Mapping[str, int]:
    """The usable ids of a stored `statelesslb:vip_ids` ({} when malformed)."""
    return _parsed_vip_ids(text) if isinstance(text, str) else {}


@functools.lru_cache(maxsize=65536)
def _parsed_vip_ids(text: str) -> Mapping[str, int]:
    # Parsed once per distinct text: every writer pass that re-claims ids walks every
    # LB's map. Read-only, as it is shared.
    stored = parse_id_map(text) or {}
    return MappingProxyType({k: v for k, v in stored.items() if v <= MAX_VIP_ID})


class _Blocked(Set[int]):
    """VIP ids no LB may take in this pass: the persisted ones plus those handed out.

    A view over the (shared, large) persisted set instead of a copy of it: a pass
    over one changed LB must not cost a pass over every id.
    """

    def __init__(self, persisted: Set[int]):
        self._persisted = persisted
        self._new: set[int] = set()
        self._floor = 1     # every id below it is blocked

    def floor(self) -> int:
        """The smallest id not blocked (every one below it is)."""
        while self._floor in self:
            self._floor += 1
        return self._floor

    def __contains__(self, vip_id: object) -> bool:
        return vip_id in self._new or vip_id in self._persisted

    def __iter__(self):
        yield from self._persisted
        yield from self._new - self._persisted

    def __len__(self) -> int:
        return len(self._persisted) + len(self._new - self._persisted)

    def update(self, vip_ids: Iterable[int]) -> None:
        self._new.update(vip_ids)


def _format_status(notes: list[str]) -> str:
    status = STATUS_OK + (f" ({'; '.join(notes)})" if notes else "")
    return status if len(status) <= _MAX_STATUS_LEN else status[:_MAX_STATUS_LEN - 3] + "..."


def _error_status(message: str) -> str:
    status = ERROR_PREFIX + message
    return status if len(status) <= _MAX_STATUS_LEN else status[:_MAX_STATUS_LEN - 3] + "..."


def reconcile_nb(
    lbs: Iterable[NbLoadBalancer], nb: NbView, now: float = 0.0,
    sb: SbView | None = None, installed: Mapping[str, str] | None = None,
    ack_timeout: float = DEFAULT_ACK_TIMEOUT,
) -> dict[str, dict[str, str | None]]:
    """external_ids changes the NB writer must make: {LB uuid: {key: value}}.

    A value of None means "remove this key" (an LB that is no longer marked
    loses the keys the writer owns; the operator's statelesslb:drain stays).
    Only LBs and keys whose value changes are returned, so applying the
    result and calling again returns {}.

    `lbs` are the LBs to update (usually all of `nb.load_balancers`); VIP ids
    held by every LB in `nb` are respected.

    Valid LBs get their ids completed and freed; an invalid LB keeps its stored
    maps untouched (a typo must not cost backends their bucket ids) and only its
    status changes to "error: ...".

    With second chance, `statelesslb:active` records, per VIP, the buckets the
    gateways use (drained backends left out); without it there is no such key, and
    the gateways use the LB's backends as they are. A change takes two passes: the first
    publishes the gateways' current set as `statelesslb:previous` stamped with
    `now`; a later one moves `active` once every chassis where a backend of either
    set is bound (per `sb`) acknowledged that previous set in `installed` ({chassis
    name: its `statelesslb:installed` text}, see statelesslb.nb.acks), or once
    `ack_timeout` seconds (at most half the LB's window) have passed.
    """
    to_update = {lb.uuid: lb for lb in lbs}
    everyone = dict(nb.load_balancers) | to_update
    claims = _claim_vip_ids(list(everyone.values()))
    return _reconcile(to_update.values(), nb, index_topology(nb), _VALIDATION.scope(nb),
                      claims, now, _Phases(sb, installed, ack_timeout))


@dataclass(frozen=True)
class _Phases:
    """What the move from phase 1 to phase 2 waits for."""

    sb: SbView | None
    installed: Mapping[str, str] | None
    ack_timeout: float


@dataclass(frozen=True)
class _Outlook:
    """What an LB's result depends on beyond its row: for the incremental writer."""

    due: float | None = None     # the result may change by time alone then
    reads_acks: bool = False     # it depends on acknowledgements and bindings
    moved_late: tuple[str, ...] = ()   # phase 2 written now without these chassis


_NO_OUTLOOK = _Outlook()


def _reconcile(
    lbs: Iterable[NbLoadBalancer],
    nb: NbView,
    index: TopologyIndex,
    validation: ValidationMemo,
    claims: _ClaimedVipIds,
    now: float,
    phases: _Phases,
    outlooks: dict[str, _Outlook] | None = None,
) -> dict[str, dict[str, str | None]]:
    blocked_vip_ids = _Blocked(claims.in_use)
    changes: dict[str, dict[str, str | None]] = {}
    for lb in sorted(lbs, key=_lb_order):
        ext = _external_ids(lb)
        outlook = _NO_OUTLOOK
        if is_marked(lb):
            desired, outlook = _desired_ids(lb, nb, index, validation, claims,
                                            blocked_vip_ids, now, phases)
        else:
            desired = {key: None for key in WRITER_KEYS if key in ext}
        if outlooks is not None:
            outlooks[lb.uuid] = outlook
        delta = {k: v for k, v in desired.items() if ext.get(k) != v}
        if delta:
            changes[lb.uuid] = delta
    return changes


def _desired_ids(
    lb: NbLoadBalancer,
    nb: NbView,
    index: TopologyIndex,
    validation: ValidationMemo,
    claims: _ClaimedVipIds,
    blocked_vip_ids: _Blocked,
    now: float,
    phases: _Phases,
) -> tuple[dict[str, str | None], _Outlook]:
    ext = _external_ids(lb)
    valid = validation.validate(lb, nb, index)
    if isinstance(valid, LbError):
        return {EXT_STATUS: _error_status(valid.message)}, _NO_OUTLOOK

    notes = list(claims.notes.get(lb.uuid, []))
    stored_vips, stored_buckets = stored_ids(ext)
    if stored_buckets is None:
        notes.append("bucket ids re-allocated: stored map was malformed")
    if stored_vips is None:
        notes.append("VIP ids re-allocated: stored map was malformed")
    try:
        vip_ids = allocate_ids(
            claims.kept.get(lb.uuid, {}), valid.vip_keys,
            reserved=blocked_vip_ids, max_id=MAX_VIP_ID, start=blocked_vip_ids.floor(),
        )
        bucket_ids = allocate_ids(stored_buckets or {}, valid.backend_keys)
    except IdSpaceExhausted as exhausted:
        return {EXT_STATUS: _error_status(str(exhausted))}, _NO_OUTLOOK
    blocked_vip_ids.update(vip_ids.values())

    drained, drain_dropped = parse_drain_checked(ext.get(EXT_DRAIN))
    if drain_dropped:
        notes.append(f"{EXT_DRAIN} is not a JSON list of IP:port strings; bad entries ignored")
    unknown = sorted(drained - set(valid.backend_keys))
    if unknown:
        notes.append(f"{EXT_DRAIN} names {', '.join(unknown[:5])}: not a backend")
    desired = {
        EXT_VIP_IDS: dump_id_map(vip_ids),
        EXT_BUCKETS: dump_id_map(bucket_ids),
    }
    if not valid.second_chance:
        # No set to record: without a second chance the gateways use the NB's backends
        # less the drained ones, as they are (what `active` would say). Most of the
        # bytes the writer adds to an LB row are its active set, and every ovn-nbctl
        # command that touches LB external_ids downloads them for every LB.
        desired[EXT_ACTIVE] = desired[EXT_PREVIOUS] = None
        desired[EXT_STATUS] = _format_status(notes)
        return desired, _NO_OUTLOOK
    active = {
        vip.key: {
            b.key: [bucket_ids[b.key], b.mac, b.lsp_name]
            for b in vip.backends if b.key not in drained
        }
        for vip in valid.vips
    }
    active_text = json.dumps(active, sort_keys=True, separators=(",", ":"))
    stored_active = ext.get(EXT_ACTIVE)
    previous = parse_previous(ext.get(EXT_PREVIOUS))
    outlook = _NO_OUTLOOK
    in_place = stored_active == active_text   # as after each write of ours
    # The stored set is read only when it is to be replaced.
    old = {} if in_place else parse_active(stored_active)
    if in_place:
        # In place. While the previous set is in force, say who does not hold it.
        if previous is not None and valid.second_chance and now < previous[0] + valid.window:
            state = _ack_state(lb, valid, previous, phases)
            if state.waiting:
                notes.append(f"previous bucket set not held by {join(state.waiting)}: "
                             "sessions there may break")
            if state.silent:
                notes.append(f"no statelesslb agent acknowledges on {join(state.silent)}")
            outlook = _Outlook(previous[0] + valid.window if state.waiting or state.silent
                               else None, True)
    elif not old:
        # First time (or second chance just turned on): the gateways move at once.
        desired[EXT_ACTIVE] = active_text
    elif previous is None or previous[1] != old:
        # Phase 1: publish the gateways' current set as "previous" and leave "active"
        # alone, so every backend chassis installs it before any gateway changes.
        desired[EXT_PREVIOUS] = json.dumps(
            {"since": round(now, 3), "vips": old}, sort_keys=True, separators=(",", ":"))
    else:
        # Phase 2 once every chassis that must hold the previous set says it does,
        # or when the wait is over (half the window at most: the set must still be
        # in force for a while once the gateways have moved).
        state = _ack_state(lb, valid, previous, phases)
        deadline = previous[0] + min(phases.ack_timeout, valid.window / 2)
        if state.silent:
            notes.append(f"no statelesslb agent acknowledges on {join(state.silent)}")
        if not state.waiting:
            desired[EXT_ACTIVE] = active_text
            outlook = _Outlook(None, True)
        elif now >= deadline:
            desired[EXT_ACTIVE] = active_text
            notes.append(f"previous bucket set not held by {join(state.waiting)}: "
                         "sessions there may break")
            outlook = _Outlook(previous[0] + valid.window, True, state.waiting)
        else:
            notes.append(f"waiting for {join(state.waiting)} to install the previous "
                         f"bucket set (at most {deadline - previous[0]:g} s)")
            outlook = _Outlook(deadline, True)
    desired[EXT_STATUS] = _format_status(notes)
    return desired, outlook


def _ack_state(lb: NbLoadBalancer, valid: ValidLb, previous: tuple[float, ActiveSet],
               phases: _Phases) -> AckState:
    """Who acknowledged the previous set: required are the chassis of every backend of
    the LB (drained ones too) and of every backend of the previous set."""
    ports = {b.lsp_name for vip in valid.vips for b in vip.backends}
    ports.update(lsp for backends in previous[1].values() for _bid, _mac, lsp in backends.values())
    return ack_state(lb.uuid, previous[0], sorted(ports), phases.sb, phases.installed)


class NbReconciler:
    """reconcile_nb() over a stream of NB views, at the cost of what changed.

    The writer is told which LBs changed since its last pass; it then evaluates
    those, the LBs whose last result it has not seen written yet, the LBs whose
    result may change by time alone (a wait for acknowledgements ran out, a
    second-chance window closed), the LBs that read acknowledgements when those
    or the SB bindings changed, the LBs whose VIP-id claims moved, and the LBs
    whose validation read what a topology change touched (an invalid LB:
    anything). Any other LB gave an empty result last time from the same
    inputs, so it would again: the result equals reconcile_nb() over all LBs
    (a property test holds it to that). `changed=None`, or a topology change
    whose reach cannot be told, evaluates every LB.
    """

    def __init__(self, validation: ValidationMemo | None = None,
                 ack_timeout: float = DEFAULT_ACK_TIMEOUT,
                 topology: TopologyCache | None = None) -> None:
        # The agent shares one with its planner: one topology index, built once.
        self._topology = topology or TopologyCache()
        # The agent shares one memo with its planner: a topology change validates once.
        self._validation = validation or ValidationMemo()
        self.ack_timeout = ack_timeout
        self._claims: _ClaimedVipIds | None = None
        self._claim_index: _ClaimIndex | None = None
        self._claim_keys: dict[str, object] = {}
        self._unwritten: set[str] = set()       # last result non-empty
        self._due: dict[str, float] = {}        # uuid -> its result may change then
        self._ack_readers: set[str] = set()     # results that read acknowledgements
        self._sb: SbView | None = None
        self._installed: Mapping[str, str] | None = None
        self._topology_readers = Dependents()    # topology each marked LB's validation read
        # Phase 2 written by the last pass without these chassis' acknowledgement.
        self.moved_late: dict[str, tuple[str, ...]] = {}

    def next_due(self) -> float | None:
        """Unix time at which some LB's result may change by time alone."""
        return min(self._due.values(), default=None)

    def _claims_for(self, lbs: Mapping[str, NbLoadBalancer], changed: Set[str] | None,
                    todo: set[str]) -> _ClaimedVipIds:
        """The VIP-id claims of `lbs`; LBs whose claims moved are added to `todo`.
        `changed`: the LBs changed since the last call (None: claim from scratch)."""
        old = self._claims
        if changed is not None and old is not None:
            moved = [u for u in changed
                     if _claim_key(lbs.get(u)) != self._claim_keys.get(u)]
            if not moved:
                return old
            if self._claim_index is not None:
                try:
                    todo.update(u for u in self._claim_index.update(lbs, moved) if u in lbs)
                except ValueError:
                    pass    # a fuzzer's LB keyed by another uuid: from scratch below
                else:
                    for u in moved:
                        key = _claim_key(lbs.get(u))
                        if key is None:
                            self._claim_keys.pop(u, None)
                        else:
                            self._claim_keys[u] = key
                    return old
        self._claim_keys = {u: _claim_key(lb) for u, lb in lbs.items()}
        index: _ClaimIndex | None = _ClaimIndex()
        try:
            index.update(lbs, lbs.keys())
            claims = index.claims()
        except ValueError:
            index, claims = None, _claim_vip_ids(list(lbs.values()))
        if changed is not None and old is not None:
            todo.update(u for u in lbs if old.kept.get(u) != claims.kept.get(u)
                        or old.notes.get(u) != claims.notes.get(u))
        self._claim_index, self._claims = index, claims
        return claims

    def reconcile(
        self, nb: NbView, now: float, changed: Set[str] | None = None,
        sb: SbView | None = None, installed: Mapping[str, str] | None = None,
    ) -> dict[str, dict[str, str | None]]:
        """reconcile_nb(all LBs of nb, nb, now, sb, installed, self.ack_timeout);
        `changed`: LB uuids changed since the last call (None: unknown)."""
        lbs = nb.load_balancers
        topology = self._topology.get(nb, self)
        index = topology.index
        validation = self._validation.scope(nb, topology.key)
        full = (changed is None or self._claims is None
                or (topology.changed and topology.changes is None))
        todo: set[str] = set(lbs) if full else {
            u for u in (*changed, *topology.moved) if u in lbs}
        if topology.changed and topology.changes is not None and not full:
            # The LBs whose validation read what the change touched.
            todo.update(u for u in self._topology_readers.of(topology.changes.keys())
                        if u in lbs)
        claims = self._claims_for(lbs, None if full else changed, todo)
        todo.update(u for u in self._unwritten if u in lbs)
        todo.update(u for u, due in self._due.items() if due <= now and u in lbs)
        if not (_same(sb, self._sb) and _same(installed, self._installed)):
            # Acknowledgements or bindings moved: whoever read them may differ.
            todo.update(u for u in self._ack_readers if u in lbs)
            self._sb, self._installed = sb, installed
        outlooks: dict[str, _Outlook] = {}
        changes = _reconcile([lbs[u] for u in todo], nb, index, validation, claims, now,
                             _Phases(sb, installed, self.ack_timeout), outlooks)

        self._unwritten = set(changes)
        if full:
            self._due, self._ack_readers = {}, set()
            self._topology_readers = Dependents()
        for u in todo:
            valid = validation.validate(lbs[u], nb, index) if is_marked(lbs[u]) else None
            if valid is None:
                self._topology_readers.discard(u)
            else:   # the memo's result: no second validation
                self._topology_readers.set(
                    u, topology_deps(valid) if isinstance(valid, ValidLb) else None)
        for u in changed or ():
            if u not in lbs:
                self._topology_readers.discard(u)
        for u in (self._due.keys() | self._ack_readers) - lbs.keys():
            self._due.pop(u, None)
            self._ack_readers.discard(u)
        self.moved_late = {}
        for u, outlook in outlooks.items():
            if outlook.due is None:
                self._due.pop(u, None)
            else:
                self._due[u] = outlook.due
            if outlook.reads_acks:
                self._ack_readers.add(u)
            else:
                self._ack_readers.discard(u)
            if outlook.moved_late:
                self.moved_late[u] = outlook.moved_late
        return changes


def _same(a: object, b: object) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False


def _claim_key(lb: NbLoadBalancer | None) -> object:
    """What an LB's VIP-id claims depend on."""
    if lb is None:
        return None
    return (_lb_order(lb), is_marked(lb), _external_ids(lb).get(EXT_VIP_IDS))
