"""Compute the OpenFlow flows and groups this chassis needs: pure, no I/O.

`plan(snapshot, config)` returns a `Plan`: every flow keyed by its cookie (a
hash of its content, so a changed flow is a new cookie), every select group
keyed by group id, and a status per marked LB. The agent diffs two plans and
applies the difference in one `ovs-ofctl bundle`.

Roles of a chassis for one LB:
- gateway: a DGP of the LB's router is resident here (its `cr-` port is bound
  here), or this chassis is one of the DGP's gateway chassis (standby). Per
  VIP: a flow in the router's ingress sending VIP:port to a hash group whose
  buckets rewrite eth.src/eth.dst towards one backend each.
- backend: a backend's VIF is bound here. Per (VIP, backend): a switch egress
  flow that DNATs VIP:port to the backend and commits to conntrack; per
  backend: a switch ingress flow that un-DNATs its replies.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass

from statelesslb.nb.model import (
    EXT_PREVIOUS,
    NbLoadBalancer,
    SbView,
    Snapshot,
    TableLayout,
)
from statelesslb.nb.parse import is_marked, show
from statelesslb.nb.stored import parse_previous
from statelesslb.nb.topology import (
    Dependents,
    TopologyCache,
    TopologyState,
    changed_keys,
    same_objects,
)
from statelesslb.nb.validate import (
    LbError,
    ValidationMemo,
    parse_window,
    topology_deps,
)
from statelesslb.plan.backend import plan_backends
from statelesslb.plan.candidate import Candidate, name_text, read_ids, unassigned_text
from statelesslb.plan.gateway import plan_gateway
from statelesslb.plan.specs import (
    MAX_TABLE,
    STATE_ERROR,
    STATE_OK,
    STATE_PENDING,
    FlowSpec,
    GroupSpec,
    LbPlanStatus,
    Plan,
    PlanConfig,
    check_range,
    sentinel_flow,
)


@dataclass(frozen=True, slots=True)
class _Owner:
    name: str
    uuid: str

    def describe(self) -> str:
        return f"load balancer {show(self.name)} ({show(self.uuid)})"


def plan(snapshot: Snapshot, config: PlanConfig | None = None, now: float = 0.0) -> Plan:
    """The flows, groups and per-LB status for `snapshot.chassis`.

    `now` (unix time) decides which second-chance windows are still open.

    Raises ValueError only for a bad `config` or table layout (local setup,
    not NB data); NB and SB content never makes it raise.
    """
    return IncrementalPlanner(config).update(snapshot, now).plan


@dataclass(frozen=True)
class PlanUpdate:
    """A plan, and what may differ from the plan of the previous update."""

    plan: Plan
    flows: frozenset[int] | None      # cookies added or removed; None: any
    groups: frozenset[int] | None     # group ids added, removed or re-planned; None: any
    lbs: frozenset[str] | None        # LB uuids whose status may differ; None: any


@dataclass(frozen=True, slots=True)
class _Part:
    """One marked LB's plan, and what it was planned from."""

    lb: NbLoadBalancer
    open_window: bool
    status: LbPlanStatus | None       # set when the LB plans nothing (invalid, pending ids)
    candidate: Candidate | None
    until: float | None               # when its second-chance window closes
    # Until the planner indexed them (then empty): the SB keys its plan looked up, and
    # what its validation read of the topology (None: anything, it failed validation).
    sb_reads: frozenset[object] = frozenset()
    topology_deps: frozenset[object] | None = None

    @property
    def order(self) -> tuple[str, str]:
        return (name_text(self.lb.name), self.lb.uuid)


class IncrementalPlanner:
    """plan() for a stream of snapshots, at the cost of what changed.

    Like ovn-controller's incremental engine: the caller says which LBs changed
    since the last update; only those are planned again and patched into the
    merged flow table and group set, and the update names the cookies and groups
    that moved, so the diff against the bridge looks at those alone. A topology
    or SB change plans again the LBs that read what it touched (an invalid LB
    counts as reading everything); a new chassis name, table layout or reach, or a
    topology change whose reach cannot be told, plans every LB, and any conflict
    between LBs redoes the merge in name order, as plan() does. Every update
    equals plan() of its snapshot; a property test holds it to that.
    """

    def __init__(self, config: PlanConfig | None = None,
                 validation: ValidationMemo | None = None,
                 topology: TopologyCache | None = None):
        self.config = config or PlanConfig()
        # The agent shares one with its NB writer: one topology index, built once.
        self._topology = topology or TopologyCache()
        self._validation = validation or ValidationMemo()
        self._context: tuple[object, ...] | None = None   # (chassis, tables) last planned for
        self._parts: dict[str, _Part] = {}
        self._windows: dict[str, float] = {}     # uuid -> until, open windows only
        self._sb: SbView | None = None
        self._sb_readers = Dependents()     # SB keys each LB's plan looked up
        self._topology_readers = Dependents()   # topology each LB's validation read
        self._sentinel = sentinel_flow(self.config)
        self._merged = _Merged(self._sentinel)
        self._plan: Plan | None = None   # of the last update

    def update(self, snapshot: Snapshot, now: float = 0.0,
               changed: Set[str] | None = None) -> PlanUpdate:
        """The plan for `snapshot`; `changed`: uuids of LBs changed since the last
        update (None: unknown, every LB is looked at)."""
        _check_tables(snapshot.tables, self.config)
        nb = snapshot.nb
        topology = self._topology.get(nb, self)
        index = topology.index
        validation = self._validation.scope(nb, topology.key)
        context_changed = self._check_context(snapshot, topology)
        rows = nb.load_balancers if isinstance(nb.load_balancers, Mapping) else {}
        # Attached to or detached from a router, or its validation read what a topology
        # change touched (an invalid LB: anything): its row is the same, its plan may
        # not be. Likewise for the LBs whose plans looked up SB bindings that changed.
        forced = set(topology.moved)
        if topology.changed and topology.changes is not None:
            forced.update(self._topology_readers.of(topology.changes.keys()))
        if snapshot.sb is not self._sb:
            sb_changed = _sb_changes(self._sb, snapshot.sb)
            self._sb = snapshot.sb
            if sb_changed is None:
                context_changed = True
            elif sb_changed:
                forced.update(self._sb_readers.of((*sb_changed, _READ_ALL)))
        if context_changed or changed is None:
            todo = set(self._parts) | {u for u in rows if isinstance(u, str)}
        else:
            todo = set(changed) | forced | {
                u for u, until in self._windows.items() if until <= now}

        replaced: dict[str, _Part | None] = {}
        for uuid in todo:
            lb = rows.get(uuid)
            old = self._parts.get(uuid)
            if not (isinstance(lb, NbLoadBalancer) and lb.uuid == uuid and is_marked(lb)):
                if old is not None:
                    replaced[uuid] = None
                continue
            open_window = _window_open(lb, now)
            if (old is not None and not context_changed and uuid not in forced
                    and old.open_window == open_window and _same_row(old.lb, lb)):
                continue
            replaced[uuid] = _plan_lb(lb, open_window, index, snapshot, self.config, now,
                                      validation)
        if not replaced and not context_changed and self._plan is not None:
            # Nothing moved (windows only change with parts): the same plan, not a copy.
            return PlanUpdate(self._plan, frozenset(), frozenset(), frozenset())

        for uuid, part in replaced.items():
            if part is None:
                self._parts.pop(uuid, None)
                self._sb_readers.discard(uuid)
                self._topology_readers.discard(uuid)
            else:
                self._sb_readers.set(uuid, part.sb_reads)
                self._topology_readers.set(uuid, part.topology_deps)
                # Indexed now: the part need not keep its own copies (memory at scale).
                self._parts[uuid] = dataclasses.replace(part, sb_reads=frozenset(),
                                                        topology_deps=frozenset())
            if part is not None and part.candidate is not None and part.until is not None:
                self._windows[uuid] = part.until
            else:
                self._windows.pop(uuid, None)
        merged = self._merged
        if context_changed or merged.conflicted or not merged.patch(replaced):
            merged = self._merged = _Merged(self._sentinel)
            merged.merge_all(self._parts.values())
            self._plan = merged.plan(self._windows)
            return PlanUpdate(self._plan, None, None, None)
        self._plan = merged.plan(self._windows)
        return PlanUpdate(self._plan, frozenset(merged.touched_flows),
                          frozenset(merged.touched_groups), frozenset(replaced))

    def _check_context(self, snapshot: Snapshot, topology: TopologyState) -> bool:
        """Whether every LB must be planned again: new chassis, tables or reach, or a
        topology change whose reach cannot be told."""
        unknown_reach = topology.key is None or (topology.changed and topology.changes is None)
        local = snapshot.local
        context: tuple[object, ...] | None = (
            snapshot.chassis, snapshot.tables,
            # The chassis' reach (direct return): as sorted pairs, to hash and compare.
            tuple(sorted(local.chassis_macs.items())), tuple(sorted(local.uplinks.items())))
        if self._context is not None and same_objects(context, self._context):
            return unknown_reach
        try:
            hash(context)
        except Exception:
            context = None   # odd values: plan everything, every time
        changed = context is None or context != self._context
        self._context = context
        return changed or unknown_reach


def _same_row(a: NbLoadBalancer, b: NbLoadBalancer) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:
        return False


def _window_open(lb: NbLoadBalancer, now: float) -> bool:
    """Whether the LB's second-chance window is open at `now` (its plan depends on it)."""
    try:
        since = _previous_since(lb.external_ids.get(EXT_PREVIOUS))
        window = parse_window(lb.options)
    except Exception:
        return False
    return since is not None and window is not None and now < since + window


class _Merged:
    """The accepted LBs' flows and groups, merged; patched LB by LB when it can be."""

    def __init__(self, sentinel: FlowSpec):
        self.sentinel = sentinel
        self.flows: dict[int, FlowSpec] = {sentinel.cookie: sentinel}
        self.groups: dict[int, GroupSpec] = {}
        self.statuses: dict[str, LbPlanStatus] = {}
        # How many accepted LBs use each flow key / group id (the sentinel counts as
        # one): identical flows may be shared, and one leaves the bridge only with its
        # last user.
        self.flow_users: dict[tuple[int, int, str], int] = {sentinel.key: 1}
        self.flow_by_key: dict[tuple[int, int, str], FlowSpec] = {sentinel.key: sentinel}
        self.group_users: dict[int, int] = {}
        self.accepted: dict[str, Candidate] = {}
        self.conflicted: set[str] = set()
        self.touched_flows: set[int] = set()
        self.touched_groups: set[int] = set()

    def plan(self, windows: Mapping[str, float]) -> Plan:
        # Copies: the agent's control socket reads a plan while the next is made.
        return Plan(groups=dict(self.groups), flows=dict(self.flows),
                    lb_status=dict(self.statuses), sentinel_cookie=self.sentinel.cookie,
                    expires_at=min(windows.values(), default=None))

    def merge_all(self, parts: Iterable[_Part]) -> None:
        """Merge from nothing, in name order: an LB clashing with an earlier one is out."""
        flow_owner: dict[tuple[int, int, str], tuple[FlowSpec, _Owner]] = {
            self.sentinel.key: (self.sentinel, _Owner("sentinel", "")),
        }
        group_owner: dict[int, _Owner] = {}
        for part in sorted(parts, key=lambda p: p.order):
            lb, candidate = part.lb, part.candidate
            name = name_text(lb.name)
            if candidate is None:
                self.statuses[lb.uuid] = part.status
                continue
            owner = _Owner(name, lb.uuid)
            conflict = candidate.self_conflict or _find_conflict(
                candidate, flow_owner, self.flows, self.groups, group_owner)
            if conflict:
                if not candidate.self_conflict:
                    self.conflicted.add(lb.uuid)
                self.statuses[lb.uuid] = _conflict_status(name, conflict)
                continue
            # Keys are unique within a candidate: no order to keep here.
            for key, (flow, _vip) in candidate.flows.items():
                flow_owner.setdefault(key, (flow, owner))
            for group_id in candidate.groups:
                group_owner.setdefault(group_id, owner)
            self._add(lb.uuid, candidate)
            self.statuses[lb.uuid] = _accepted_status(name, candidate)

    def patch(self, replaced: Mapping[str, _Part | None]) -> bool:
        """Swap the given LBs' contributions; False if that makes LBs clash (merge all)."""
        self.touched_flows, self.touched_groups = set(), set()
        for uuid in replaced:
            self.statuses.pop(uuid, None)
            old = self.accepted.pop(uuid, None)
            if old is not None:
                self._remove(uuid, old)
        for uuid, part in sorted(replaced.items()):
            if part is None:
                continue
            candidate, name = part.candidate, name_text(part.lb.name)
            if candidate is None:
                self.statuses[uuid] = part.status
            elif candidate.self_conflict:
                self.statuses[uuid] = _conflict_status(name, candidate.self_conflict)
            elif self._clashes(candidate):
                return False
            else:
                self._add(uuid, candidate)
                self.statuses[uuid] = _accepted_status(name, candidate)
        return True

    def _clashes(self, candidate: Candidate) -> bool:
        for key, (flow, _vip) in candidate.flows.items():
            # Shared flows (a backend's, in every LB it serves) are the same object.
            known = self.flow_by_key.get(key)
            if known is not None and known is not flow and known != flow:
                return True
            same_cookie = self.flows.get(flow.cookie)
            if same_cookie is not None and same_cookie is not flow and same_cookie != flow:
                return True
        for group_id, (group, _vip) in candidate.groups.items():
            known_group = self.groups.get(group_id)
            if known_group is not None and known_group != group:
                return True
        return False

    def _add(self, uuid: str, candidate: Candidate) -> None:
        # Called once per accepted LB, and _remove once when it leaves: a count of
        # users is enough (a set of uuids per flow shared by thousands of LBs, such as
        # a backend's ownership flows, cost megabytes: docs/scale.md).
        self.accepted[uuid] = candidate
        for key, (flow, _vip) in candidate.flows.items():
            users = self.flow_users.get(key)
            if users is None:
                self.flow_users[key] = 1
                self.flow_by_key[key] = flow
                self.flows[flow.cookie] = flow
                self.touched_flows.add(flow.cookie)
            else:
                self.flow_users[key] = users + 1
        for group_id, (group, _vip) in candidate.groups.items():
            users = self.group_users.get(group_id)
            if users is None:
                self.group_users[group_id] = 1
                self.groups[group_id] = group
                self.touched_groups.add(group_id)
            else:
                self.group_users[group_id] = users + 1

    def _remove(self, uuid: str, candidate: Candidate) -> None:
        for key, (flow, _vip) in candidate.flows.items():
            left = self.flow_users[key] - 1
            if left == 0:
                del self.flow_users[key], self.flow_by_key[key], self.flows[flow.cookie]
                self.touched_flows.add(flow.cookie)
            else:
                self.flow_users[key] = left
        for group_id in candidate.groups:
            left = self.group_users[group_id] - 1
            if left == 0:
                del self.group_users[group_id], self.groups[group_id]
                self.touched_groups.add(group_id)
            else:
                self.group_users[group_id] = left


def _conflict_status(name: str, conflict: str) -> LbPlanStatus:
    return LbPlanStatus(
        name, STATE_ERROR,
        f"{conflict}; nothing of this load balancer is installed on this chassis")


def _accepted_status(name: str, candidate: Candidate) -> LbPlanStatus:
    pending = sorted(set(candidate.pending))
    return LbPlanStatus(
        name,
        STATE_PENDING if pending else STATE_OK,
        _summary(pending or sorted(set(candidate.notes))),
        tuple(sorted(candidate.roles)),
        tuple(sorted(candidate.vip_keys)),
    )


def _plan_lb(
    lb: NbLoadBalancer, open_window: bool, index, snapshot: Snapshot, config: PlanConfig,
    now: float, validation: ValidationMemo,
) -> _Part:
    """One LB on its own, with what it read of the topology and of the SB."""
    name = name_text(lb.name)
    valid = validation.validate(lb, snapshot.nb, index)
    if isinstance(valid, LbError):
        return _Part(lb, open_window, LbPlanStatus(name, STATE_ERROR, valid.message),
                     None, None)
    deps = topology_deps(valid)
    ids = read_ids(lb, valid, now)
    if isinstance(ids, LbPlanStatus):
        return _Part(lb, open_window, ids, None, None, topology_deps=deps)
    reads: set[object] = set()
    recording = Snapshot(snapshot.nb, _recording_sb(snapshot.sb, reads), snapshot.chassis,
                         snapshot.tables, snapshot.local)
    candidate = Candidate()
    plan_gateway(valid, ids, recording, config, candidate)
    plan_backends(valid, ids, recording, config, candidate)
    if ids.unassigned:
        candidate.pending.append(
            unassigned_text(list(ids.unassigned)) + " (the other backends are served)")
    return _Part(lb, open_window, None, candidate, ids.previous_until, frozenset(reads),
                 deps)


@functools.lru_cache(maxsize=65536)
def _previous_since(text: object) -> float | None:
    """When `statelesslb:previous` was published (parsed once per distinct text)."""
    previous = parse_previous(text)
    return previous[0] if previous is not None else None


# An SB key read by iterating a whole mapping: any SB change may matter.
_READ_ALL = ("all",)


class _RecordedMapping(Mapping):
    """A read-only mapping that notes the keys looked up in it: an LB's SB dependencies."""

    def __init__(self, data: object, kind: str, reads: set[object]):
        self._data = data if isinstance(data, Mapping) else {}
        self._kind, self._reads = kind, reads

    def _note(self, key: object) -> None:
        try:
            self._reads.add((self._kind, key))
        except TypeError:
            self._reads.add(_READ_ALL)

    def __getitem__(self, key):
        self._note(key)
        return self._data[key]

    def get(self, key, default=None):
        self._note(key)
        return self._data.get(key, default)

    def __iter__(self):
        self._reads.add(_READ_ALL)
        return iter(self._data)

    def __len__(self) -> int:
        self._reads.add(_READ_ALL)
        return len(self._data)


def _recording_sb(sb: SbView, reads: set[object]) -> SbView:
    return SbView(_RecordedMapping(sb.datapath_keys, "datapath", reads),
                  _RecordedMapping(sb.port_bindings, "port", reads),
                  _RecordedMapping(sb.service_monitors, "health", reads))


def _sb_changes(old: SbView | None, new: SbView) -> set[object] | None:
    """The SB keys whose values differ (as _RecordedMapping names them); None: unknown."""
    if old is None:
        return None
    changed: set[object] = set()
    try:
        for kind, before, after in (("datapath", old.datapath_keys, new.datapath_keys),
                                    ("port", old.port_bindings, new.port_bindings),
                                    ("health", old.service_monitors, new.service_monitors)):
            if before is not after:
                changed.update((kind, key) for key in changed_keys(before, after))
    except Exception:
        return None
    return changed


def _summary(reasons: list[str], shown: int = 5) -> str:
    """Join reasons, but keep a status short when thousands of backends wait."""
    more = len(reasons) - shown
    return "; ".join(reasons[:shown]) + (f"; and {more} more" if more > 0 else "")


def _check_tables(tables: TableLayout, config: PlanConfig) -> None:
    used = set()
    for name in ("lr_in_intercept", "ls_out_intercept", "ls_out_next",
                 "ls_in_intercept", "ls_in_next", "output"):
        value = getattr(tables, name)
        check_range(f"tables.{name}", value, 0, MAX_TABLE)
        used.add(value)
    for name in ("lr_in_gw_redirect", "lr_in_gw_redirect_next"):
        value = getattr(tables, name)
        if value is not None:
            check_range(f"tables.{name}", value, 0, MAX_TABLE)
            used.add(value)
    if config.sentinel_table in used:
        raise ValueError(f"sentinel_table {config.sentinel_table} is an OVN pipeline table")
    clash = used & set(config.private_tables)
    if clash:
        raise ValueError(f"private tables {sorted(clash)} are OVN pipeline tables")


def _find_conflict(
    candidate: Candidate,
    flow_owner: Mapping[tuple[int, int, str], tuple[FlowSpec, _Owner]],
    flows: Mapping[int, FlowSpec],
    groups: Mapping[int, GroupSpec],
    group_owner: Mapping[int, _Owner],
) -> str | None:
    """Why `candidate` cannot join what is accepted so far, or None."""
    # Most flows are shared objects (a backend's, in every LB it serves): identity
    # first. In key order only when something clashes, to name the same clash each time.
    def clash(flow: FlowSpec, vip_key: str) -> str | None:
        accepted = flow_owner.get(flow.key)
        if accepted is not None and accepted[0] is not flow and accepted[0] != flow:
            return f"VIP {vip_key} conflicts with {accepted[1].describe()}"
        same_cookie = flows.get(flow.cookie)
        if same_cookie is not None and same_cookie is not flow and same_cookie != flow:
            return f"VIP {vip_key}: flow cookie {flow.cookie:#x} collides with another flow"
        return None

    if any(clash(flow, vip_key) for flow, vip_key in candidate.flows.values()):
        for _key, (flow, vip_key) in sorted(candidate.flows.items()):
            found = clash(flow, vip_key)
            if found:
                return found
    for group_id, (group, vip_key) in sorted(candidate.groups.items()):
        accepted_group = groups.get(group_id)
        if accepted_group is not None and accepted_group != group:
            return (f"VIP {vip_key}: group {group_id} is also used by "
                    f"{group_owner[group_id].describe()} (duplicate VIP id)")
    return None
