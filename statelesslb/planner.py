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

import functools
import hashlib
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field
from ipaddress import IPv6Address
from types import MappingProxyType

from statelesslb.buckets import (
    MAX_BUCKET_ID,
    MAX_VIP_ID,
    parse_active,
    parse_drain,
    parse_id_map,
    parse_previous,
)
from statelesslb.hashing import FULL_FIELDS
from statelesslb.model import (
    EXT_ACTIVE,
    EXT_BUCKETS,
    EXT_DRAIN,
    EXT_PREVIOUS,
    EXT_VIP_IDS,
    UNHEALTHY,
    NbLoadBalancer,
    SbPortBinding,
    SbView,
    Snapshot,
    TableLayout,
)
from statelesslb.ofstrings import (
    IpAddress,
    checked_line,
    checked_piece,
    dec_int,
    endpoint_text,
    hex_int,
    ip_text,
    is_plain_int,
    mac_text,
)
from statelesslb.validate import (
    Dependents,
    LbError,
    TopologyCache,
    TopologyState,
    ValidationMemo,
    ValidBackend,
    ValidLb,
    ValidVip,
    changed_keys,
    is_marked,
    parse_endpoint,
    parse_mac,
    parse_window,
    same_objects,
    show,
    topology_deps,
)
from statelesslb.weights import SLOT_BASE, slot_ids

# The full 5-tuple (options:stateless_hash=5-tuple); an LB's own fields come from
# ValidLb.group_fields(). Fields whose prerequisites fail (udp_* on TCP, ipv6_* on
# IPv4) are skipped.
GROUP_FIELDS = FULL_FIELDS
# Explicit: insert_bucket without a weight makes a weight-0 (dead) bucket on OVS 3.1.
BUCKET_WEIGHT = 100
# Our cookies carry this in their top 16 bits; OVN's cookies have the upper 32 bits 0.
DEFAULT_COOKIE_PREFIX = 0x51B0
COOKIE_MASK = 0xFFFF << 48
OFPG_MAX = 0xFFFFFF00
MAX_TABLE = 254
# 500 buckets of ~100 bytes stay well under OpenFlow's 64 KiB per message.
DEFAULT_MAX_BUCKETS_PER_MSG = 500
# ovn-controller's own group ids: 1..65535 in 23.03, a compact pool from 1 later.
_MIN_GROUP_ID_BASE = 0x10000

ROLE_GATEWAY = "gateway"
ROLE_STANDBY = "standby-gateway"
ROLE_BACKEND = "backend"
STATE_OK = "ok"
STATE_PENDING = "pending"
STATE_ERROR = "error"


def _check_range(name: str, value: object, low: int, high: int) -> None:
    if not is_plain_int(value) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")


@dataclass(frozen=True)
class PlanConfig:
    group_id_base: int = 0x70000000
    cookie_prefix: int = DEFAULT_COOKIE_PREFIX
    gateway_priority: int = 1000
    backend_priority: int = 1000
    sentinel_table: int = 250
    # Tables of our own (OVN 23.03 uses up to ~80; later releases about 100).
    private_table_base: int = 200
    # Conntrack zone of the gateway-affinity layer: a zone no OVN port or datapath uses.
    gateway_zone: int = 64000

    @property
    def backend_decide_table(self) -> int:
        return self.private_table_base

    @property
    def gateway_sticky_table(self) -> int:
        return self.private_table_base + 1

    @property
    def gateway_commit_table(self) -> int:
        return self.private_table_base + 2

    @property
    def redirect_table(self) -> int:
        return self.private_table_base + 3

    @property
    def private_tables(self) -> tuple[int, ...]:
        return tuple(range(self.private_table_base, self.private_table_base + 4))

    @property
    def previous_group_base(self) -> int:
        """Groups of the previous bucket sets (second chance) follow the gateway groups."""
        return self.group_id_base + MAX_VIP_ID + 1

    def __post_init__(self) -> None:
        _check_range("group_id_base", self.group_id_base, _MIN_GROUP_ID_BASE,
                     OFPG_MAX - 2 * (MAX_VIP_ID + 1))
        _check_range("cookie_prefix", self.cookie_prefix, 1, 0xFFFF)
        _check_range("gateway_priority", self.gateway_priority, 0, 0xFFFF)
        _check_range("backend_priority", self.backend_priority, 0, 0xFFFF)
        _check_range("sentinel_table", self.sentinel_table, 0, MAX_TABLE)
        _check_range("private_table_base", self.private_table_base, 1, MAX_TABLE - 4)
        _check_range("gateway_zone", self.gateway_zone, 1, 0xFFFF)
        if self.sentinel_table in self.private_tables:
            raise ValueError("sentinel_table must not be one of the private tables")

    @property
    def cookie_value(self) -> int:
        """`cookie=<value>/<COOKIE_MASK>` selects exactly our flows."""
        return self.cookie_prefix << 48


@dataclass(frozen=True)
class FlowSpec:
    table: int
    priority: int
    match: str               # "" matches everything
    actions: str
    cookie_prefix: int = DEFAULT_COOKIE_PREFIX

    def __post_init__(self) -> None:
        _check_range("table", self.table, 0, MAX_TABLE)
        _check_range("priority", self.priority, 0, 0xFFFF)
        _check_range("cookie_prefix", self.cookie_prefix, 1, 0xFFFF)
        checked_piece(self.match)
        if not self.actions:
            raise ValueError("a flow needs actions")
        checked_piece(self.actions)

    @property
    def key(self) -> tuple[int, int, str]:
        """What OpenFlow identifies a flow by (OVN too): two specs with one key clash."""
        return (self.table, self.priority, self.match)

    @property
    def cookie(self) -> int:
        # blake2b, not hash(): the same flow must get the same cookie in every
        # process, so a restarted agent recognises what it installed.
        content = f"{self.table}\n{self.priority}\n{self.match}\n{self.actions}".encode()
        digest = hashlib.blake2b(content, digest_size=6).digest()
        return (self.cookie_prefix << 48) | int.from_bytes(digest, "big")

    def add_line(self) -> str:
        parts = [f"table={self.table}", f"priority={self.priority}", f"cookie={self.cookie:#x}"]
        if self.match:
            parts.append(self.match)
        parts.append(f"actions={self.actions}")
        return checked_line("flow add " + ",".join(parts))

    def delete_line(self) -> str:
        return checked_line(f"flow delete cookie={self.cookie:#x}/-1")


@dataclass(frozen=True)
class GroupSpec:
    """A select group; `buckets` maps bucket id -> that bucket's action list."""

    group_id: int
    fields: str = GROUP_FIELDS
    buckets: Mapping[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_range("group_id", self.group_id, 0, OFPG_MAX)
        checked_piece(self.fields)
        for bucket_id, actions in self.buckets.items():
            _check_range("bucket id", bucket_id, 0, MAX_BUCKET_ID)
            if not actions:
                raise ValueError("a bucket needs actions")
            checked_piece(actions)
        # Sorted and read-only: equal groups render identical lines.
        object.__setattr__(
            self, "buckets", MappingProxyType(dict(sorted(self.buckets.items())))
        )

    def bucket_text(self, bucket_id: int) -> str:
        return (f"bucket=bucket_id:{bucket_id},weight:{BUCKET_WEIGHT},"
                f"actions={self.buckets[bucket_id]}")

    def add_lines(self, max_buckets_per_msg: int = DEFAULT_MAX_BUCKETS_PER_MSG) -> list[str]:
        """`group add` with the first buckets, then `insert_bucket` lines for the rest."""
        _check_range("max_buckets_per_msg", max_buckets_per_msg, 1, 100_000)
        texts = [self.bucket_text(b) for b in self.buckets]
        head = (f"group add group_id={self.group_id},type=select,"
                f"selection_method=hash,{self.fields}")
        lines = [",".join([head, *texts[:max_buckets_per_msg]])]
        for start in range(max_buckets_per_msg, len(texts), max_buckets_per_msg):
            chunk = texts[start:start + max_buckets_per_msg]
            lines.append(
                f"group insert_bucket group_id={self.group_id},command_bucket_id=last,"
                + ",".join(chunk)
            )
        return [checked_line(line) for line in lines]

    def insert_bucket_line(self, bucket_id: int, after: int | str = "last") -> str:
        """Insert one bucket after bucket `after` (an id, "first" or "last").

        OVS 3.1 puts inserted buckets AFTER command_bucket_id (the man page says
        before); "first" puts them at the front.
        """
        if isinstance(after, str):
            if after not in ("first", "last"):
                raise ValueError(f"bad insert position {after!r}")
            where = after
        else:
            _check_range("bucket id", after, 0, MAX_BUCKET_ID)
            where = str(after)
        return checked_line(
            f"group insert_bucket group_id={self.group_id},command_bucket_id={where},"
            + self.bucket_text(bucket_id)
        )

    def remove_bucket_line(self, bucket_id: int) -> str:
        _check_range("bucket id", bucket_id, 0, MAX_BUCKET_ID)
        return checked_line(
            f"group remove_bucket group_id={self.group_id},command_bucket_id={bucket_id}"
        )

    def delete_line(self) -> str:
        return checked_line(f"group delete group_id={self.group_id}")


@dataclass(frozen=True)
class LbPlanStatus:
    name: str
    state: str                       # STATE_OK, STATE_PENDING or STATE_ERROR
    message: str                     # "" when ok
    roles: tuple[str, ...] = ()      # ROLE_BACKEND / ROLE_GATEWAY played here
    vip_keys: tuple[str, ...] = ()   # VIPs with at least one flow here


@dataclass(frozen=True)
class Plan:
    groups: dict[int, GroupSpec]
    flows: dict[int, FlowSpec]       # by cookie; includes the sentinel
    lb_status: dict[str, LbPlanStatus]
    sentinel_cookie: int
    # When a second-chance window closes: the agent plans again then.
    expires_at: float | None = None


def sentinel_flow(config: PlanConfig) -> FlowSpec:
    """A flow in a table OVN never uses: when it is gone, ovn-controller wiped br-int."""
    return FlowSpec(config.sentinel_table, 0, "", "drop", config.cookie_prefix)


# ---------------------------------------------------------------------------
# Planning


@dataclass
class _Candidate:
    """Everything one LB wants on this chassis, accepted or rejected as a whole."""

    flows: dict[tuple[int, int, str], tuple[FlowSpec, str]] = field(default_factory=dict)
    groups: dict[int, tuple[GroupSpec, str]] = field(default_factory=dict)
    roles: set[str] = field(default_factory=set)
    vip_keys: set[str] = field(default_factory=set)
    pending: list[str] = field(default_factory=list)
    self_conflict: str | None = None

    def add_flow(self, flow: FlowSpec, vip_key: str) -> None:
        known = self.flows.get(flow.key)
        if known is not None and known[0] != flow:
            # validate_lb should rule this out (one backend port per VIP).
            self.self_conflict = f"VIPs {known[1]} and {vip_key} need clashing flows"
        self.flows.setdefault(flow.key, (flow, vip_key))
        self.vip_keys.add(vip_key)


@dataclass(frozen=True)
class _Owner:
    name: str
    uuid: str

    def describe(self) -> str:
        return f"load balancer {show(self.name)} ({show(self.uuid)})"


@dataclass(frozen=True)
class _Ids:
    vip_ids: Mapping[str, int]
    bucket_ids: Mapping[str, int]
    drained: frozenset[str]
    # The gateways' bucket set before the last change, while its window is open.
    previous: Mapping[str, Mapping[str, tuple[int, str, str]]] = field(default_factory=dict)
    previous_until: float | None = None
    # The NB writer's `statelesslb:active`: what the gateways' groups hold.
    active: Mapping[str, Mapping[str, tuple[int, str, str]]] = field(default_factory=dict)


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


@dataclass(frozen=True)
class _Part:
    """One marked LB's plan, and what it was planned from."""

    lb: NbLoadBalancer
    open_window: bool
    status: LbPlanStatus | None       # set when the LB plans nothing (invalid, pending ids)
    candidate: _Candidate | None
    until: float | None               # when its second-chance window closes
    sb_reads: frozenset[object] = frozenset()   # SB keys its plan looked up
    # What its validation read of the topology; None: anything (it failed validation).
    topology_deps: frozenset[object] | None = None

    @property
    def order(self) -> tuple[str, str]:
        return (_text(self.lb.name), self.lb.uuid)


class IncrementalPlanner:
    """plan() for a stream of snapshots, at the cost of what changed.

    Like ovn-controller's incremental engine: the caller says which LBs changed
    since the last update; only those are planned again and patched into the
    merged flow table and group set, and the update names the cookies and groups
    that moved, so the diff against the bridge looks at those alone. A topology
    or SB change plans again the LBs that read what it touched (an invalid LB
    counts as reading everything); a new chassis name or table layout, or a
    topology change whose reach cannot be told, plans every LB, and any conflict
    between LBs redoes the merge in name order, as plan() does. Every update
    equals plan() of its snapshot; a property test holds it to that.
    """

    def __init__(self, config: PlanConfig | None = None,
                 validation: ValidationMemo | None = None):
        self.config = config or PlanConfig()
        self._topology = TopologyCache()
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
        topology = self._topology.get(nb)
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
                self._parts[uuid] = part
                self._sb_readers.set(uuid, part.sb_reads)
                self._topology_readers.set(uuid, part.topology_deps)
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
        """Whether every LB must be planned again: new chassis or tables, or a
        topology change whose reach cannot be told."""
        unknown_reach = topology.key is None or (topology.changed and topology.changes is None)
        context: tuple[object, ...] | None = (snapshot.chassis, snapshot.tables)
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
        # Who uses each flow key / group id ("" is the sentinel): identical flows may be
        # shared, and one leaves the bridge only with its last user.
        self.flow_users: dict[tuple[int, int, str], set[str]] = {sentinel.key: {""}}
        self.flow_by_key: dict[tuple[int, int, str], FlowSpec] = {sentinel.key: sentinel}
        self.group_users: dict[int, set[str]] = {}
        self.accepted: dict[str, _Candidate] = {}
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
            name = _text(lb.name)
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
            for key, (flow, _vip) in sorted(candidate.flows.items()):
                flow_owner.setdefault(key, (flow, owner))
            for group_id, (_group, _vip) in sorted(candidate.groups.items()):
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
            candidate, name = part.candidate, _text(part.lb.name)
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

    def _clashes(self, candidate: _Candidate) -> bool:
        for key, (flow, _vip) in candidate.flows.items():
            known = self.flow_by_key.get(key)
            if known is not None and known != flow:
                return True
            same_cookie = self.flows.get(flow.cookie)
            if same_cookie is not None and same_cookie != flow:
                return True
        for group_id, (group, _vip) in candidate.groups.items():
            known_group = self.groups.get(group_id)
            if known_group is not None and known_group != group:
                return True
        return False

    def _add(self, uuid: str, candidate: _Candidate) -> None:
        self.accepted[uuid] = candidate
        for key, (flow, _vip) in candidate.flows.items():
            users = self.flow_users.setdefault(key, set())
            if not users:
                self.flow_by_key[key] = flow
                self.flows[flow.cookie] = flow
                self.touched_flows.add(flow.cookie)
            users.add(uuid)
        for group_id, (group, _vip) in candidate.groups.items():
            users = self.group_users.setdefault(group_id, set())
            if not users:
                self.groups[group_id] = group
                self.touched_groups.add(group_id)
            users.add(uuid)

    def _remove(self, uuid: str, candidate: _Candidate) -> None:
        for key, (flow, _vip) in candidate.flows.items():
            users = self.flow_users[key]
            users.discard(uuid)
            if not users:
                del self.flow_users[key], self.flow_by_key[key], self.flows[flow.cookie]
                self.touched_flows.add(flow.cookie)
        for group_id in candidate.groups:
            users = self.group_users[group_id]
            users.discard(uuid)
            if not users:
                del self.group_users[group_id], self.groups[group_id]
                self.touched_groups.add(group_id)


def _conflict_status(name: str, conflict: str) -> LbPlanStatus:
    return LbPlanStatus(
        name, STATE_ERROR,
        f"{conflict}; nothing of this load balancer is installed on this chassis")


def _accepted_status(name: str, candidate: _Candidate) -> LbPlanStatus:
    pending = sorted(set(candidate.pending))
    return LbPlanStatus(
        name,
        STATE_PENDING if pending else STATE_OK,
        _summary(pending),
        tuple(sorted(candidate.roles)),
        tuple(sorted(candidate.vip_keys)),
    )


def _plan_lb(
    lb: NbLoadBalancer, open_window: bool, index, snapshot: Snapshot, config: PlanConfig,
    now: float, validation: ValidationMemo,
) -> _Part:
    """One LB on its own, with what it read of the topology and of the SB."""
    name = _text(lb.name)
    valid = validation.validate(lb, snapshot.nb, index)
    if isinstance(valid, LbError):
        return _Part(lb, open_window, LbPlanStatus(name, STATE_ERROR, valid.message),
                     None, None)
    deps = topology_deps(valid)
    ids = _read_ids(lb, valid, now)
    if isinstance(ids, LbPlanStatus):
        return _Part(lb, open_window, ids, None, None, topology_deps=deps)
    reads: set[object] = set()
    recording = Snapshot(snapshot.nb, _recording_sb(snapshot.sb, reads), snapshot.chassis,
                         snapshot.tables)
    candidate = _Candidate()
    _plan_gateway(valid, ids, recording, config, candidate)
    _plan_backends(valid, ids, recording, config, candidate)
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


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _check_tables(tables: TableLayout, config: PlanConfig) -> None:
    used = set()
    for name in ("lr_in_intercept", "ls_out_intercept", "ls_out_next",
                 "ls_in_intercept", "ls_in_next", "output"):
        value = getattr(tables, name)
        _check_range(f"tables.{name}", value, 0, MAX_TABLE)
        used.add(value)
    if config.sentinel_table in used:
        raise ValueError(f"sentinel_table {config.sentinel_table} is an OVN pipeline table")
    clash = used & set(config.private_tables)
    if clash:
        raise ValueError(f"private tables {sorted(clash)} are OVN pipeline tables")


def _read_ids(lb: NbLoadBalancer, valid: ValidLb, now: float) -> _Ids | LbPlanStatus:
    """The NB writer's ids for this LB, or why they cannot be used yet."""
    name = _text(lb.name)
    ext = lb.external_ids if isinstance(lb.external_ids, Mapping) else {}
    vip_ids = parse_id_map(ext.get(EXT_VIP_IDS))
    bucket_ids = parse_id_map(ext.get(EXT_BUCKETS))
    if vip_ids is None or bucket_ids is None:
        return LbPlanStatus(name, STATE_PENDING,
                            "stored ids are malformed; waiting for the NB writer")
    missing = [k for k in valid.vip_keys if k not in vip_ids]
    missing += [k for k in valid.backend_keys if k not in bucket_ids]
    if missing:
        more = len(missing) - 5
        return LbPlanStatus(
            name, STATE_PENDING,
            f"ids not yet assigned by the NB writer for {', '.join(missing[:5])}"
            + (f" and {more} more" if more > 0 else ""),
        )
    for key in valid.vip_keys:
        if vip_ids[key] > MAX_VIP_ID:
            return LbPlanStatus(name, STATE_ERROR,
                                f"VIP id {vip_ids[key]} of {key} is above {MAX_VIP_ID:#x}")
    for key in valid.backend_keys:
        if bucket_ids[key] > MAX_BUCKET_ID:
            return LbPlanStatus(
                name, STATE_ERROR,
                f"bucket id {bucket_ids[key]} of {key} is above {MAX_BUCKET_ID:#x}")
    if valid.weights and any(is_plain_int(b) and b >= SLOT_BASE for b in bucket_ids.values()):
        # Slot k of bucket B is B + k * 2**20: NB ids must stay below that to stay apart.
        return LbPlanStatus(name, STATE_ERROR,
                            f"options:stateless_weights needs bucket ids below {SLOT_BASE}")
    own_vip_ids = [vip_ids[k] for k in valid.vip_keys]
    own_bucket_ids = [bucket_ids[k] for k in valid.backend_keys]
    if (len(set(own_vip_ids)) != len(own_vip_ids)
            or len(set(own_bucket_ids)) != len(own_bucket_ids)):
        return LbPlanStatus(name, STATE_PENDING,
                            "stored ids repeat; waiting for the NB writer to re-assign them")
    previous = parse_previous(ext.get(EXT_PREVIOUS))
    active = parse_active(ext.get(EXT_ACTIVE))
    if previous is not None and valid.second_chance and now < previous[0] + valid.window:
        return _Ids(vip_ids, bucket_ids, parse_drain(ext.get(EXT_DRAIN)), previous[1],
                    previous[0] + valid.window, active)
    return _Ids(vip_ids, bucket_ids, parse_drain(ext.get(EXT_DRAIN)), active=active)


def usable_binding(sb: SbView, logical_port: str) -> SbPortBinding | None:
    """The SB port binding, if present and carrying usable keys."""
    bindings = sb.port_bindings if isinstance(sb.port_bindings, Mapping) else {}
    binding = bindings.get(logical_port)
    if (isinstance(binding, SbPortBinding)
            and is_plain_int(binding.tunnel_key) and 0 < binding.tunnel_key <= 0xFFFFFFFF
            and is_plain_int(binding.datapath_key)):
        return binding
    return None


def usable_datapath_key(sb: SbView, nb_uuid: str) -> int | None:
    keys = sb.datapath_keys if isinstance(sb.datapath_keys, Mapping) else {}
    key = keys.get(nb_uuid)
    return key if is_plain_int(key) and 0 < key <= 0xFFFFFFFF else None


def l4_match(protocol: str, ip: IpAddress) -> tuple[str, str]:
    """("tcp6", "ipv6") style prefixes for a match on `ip`."""
    if protocol not in ("tcp", "udp"):
        raise ValueError(f"unexpected protocol {protocol!r}")
    if isinstance(ip, IPv6Address):
        return protocol + "6", "ipv6"
    return protocol, "nw"


def _plan_gateway(
    valid: ValidLb, ids: _Ids, snapshot: Snapshot, config: PlanConfig, out: _Candidate
) -> None:
    sb = snapshot.sb
    resident = []
    active_here = False
    router_ports = snapshot.nb.router_ports if isinstance(snapshot.nb.router_ports,
                                                          Mapping) else {}
    for dgp in valid.dgps:
        redirect = usable_binding(sb, "cr-" + dgp)
        port = router_ports.get(dgp)
        candidates = getattr(port, "gateway_chassis", ())
        # Resident here, or a standby that may become so: prepared ahead, the flows
        # are in place the moment a failover lands here. On a standby they match
        # nothing: OVN's admission stage drops the DGP's traffic before our table.
        here = redirect is not None and redirect.chassis == snapshot.chassis
        active_here = active_here or here
        if here or (isinstance(candidates, tuple) and snapshot.chassis in candidates):
            resident.append(dgp)
        elif redirect is None:
            out.pending.append(f"no SB port binding cr-{show(dgp)} yet")
    if not resident:
        return

    # All or nothing: a group missing a bucket would send that backend's share
    # elsewhere and move it again once the data arrives.
    problems: list[str] = []
    router_dp = usable_datapath_key(sb, valid.router_uuid)
    if router_dp is None:
        out.pending.append(f"no SB datapath for router {show(valid.router_name)} yet")
        return
    dgp_keys = []
    for dgp in resident:
        binding = usable_binding(sb, dgp)
        if binding is None or binding.datapath_key != router_dp:
            problems.append(f"no usable SB port binding for gateway port {show(dgp)} yet")
        else:
            dgp_keys.append(binding.tunnel_key)
    # Every backend's router port, drained ones too (affinity keeps their flows); a
    # stand-in borrows the port of a backend listed under some VIP.
    rp_keys: dict[str, int] = {}
    for vip in valid.vips:
        for backend in vip.backends:
            binding = usable_binding(sb, backend.router_port_name)
            if binding is not None and binding.datapath_key == router_dp:
                rp_keys[backend.router_port_name] = binding.tunnel_key
    groups = []
    for vip in valid.vips:
        buckets = {}
        members = _gateway_members(valid, vip, ids, sb)
        for bucket_id, backend in members:
            rp_key = rp_keys.get(backend.router_port_name)
            if rp_key is None:
                problems.append(
                    f"no usable SB port binding for router port "
                    f"{show(backend.router_port_name)} yet")
                continue
            if valid.affinity:
                # New flows go on to the commit table, which remembers the bucket.
                buckets[bucket_id] = _steer_actions(
                    backend, rp_key, f"resubmit(,{config.gateway_commit_table})")
            else:
                buckets[bucket_id] = _bucket_actions(backend, rp_key, snapshot.tables)
        groups.append((vip, GroupSpec(config.group_id_base + ids.vip_ids[vip.key],
                                      valid.group_fields(vip), buckets), members))
    if problems:
        out.pending.extend(problems)
        return

    out.roles.add(ROLE_GATEWAY if active_here else ROLE_STANDBY)
    for vip, group, members in groups:
        out.groups[group.group_id] = (group, vip.key)
        for dgp_key in dgp_keys:
            out.add_flow(_gateway_flow(valid, vip, dgp_key, router_dp, group,
                                       snapshot.tables, config), vip.key)
        if valid.affinity:
            _plan_affinity(valid, vip, ids, router_dp, group, rp_keys, members,
                           snapshot.tables, config, out)


def _gateway_members(
    valid: ValidLb, vip: ValidVip, ids: _Ids, sb: SbView
) -> list[tuple[int, ValidBackend]]:
    """(bucket id, backend) of the VIP's gateway group.

    From the NB writer's `active` set when there is one: it changes only after the
    backends' chassis had a second to install the set before it, so gateways never
    steer a flow somewhere before the second chance for it exists. Before the
    writer's first pass, from the VIP's backends less the drained ones.
    """
    active = ids.active.get(vip.key)
    if active is None:
        members = [(ids.bucket_ids[b.key], b) for b in vip.backends
                   if b.key not in ids.drained]
    else:
        by_key = {b.key: b for b in vip.backends}
        members = []
        for key, (bucket_id, mac, lsp) in sorted(active.items()):
            backend = by_key.get(key) or _stand_in(key, mac, lsp, valid, sb)
            if backend is not None:
                members.append((bucket_id, backend))
    # OVN's health checks: a backend its Service_Monitor says is down leaves the group
    # (REMOVE_BUCKET; its id stays in the NB for its return). Only its flows move.
    # A backend of weight W has W buckets (slots), its NB id first.
    return [(slot, b) for bid, b in members
            if backend_health(sb, b.ip, b.port, valid.protocol) not in UNHEALTHY
            for slot in slot_ids(bid, valid.weight(b.key))]


def backend_health(sb: SbView, ip: IpAddress, port: int, protocol: str) -> str | None:
    """The SB Service_Monitor status of a backend, None when it is not health-checked."""
    monitors = sb.service_monitors
    if not isinstance(monitors, Mapping):   # a fuzzer's view
        return None
    status = monitors.get((ip_text(ip), port, protocol))
    return status if isinstance(status, str) else None


def _stand_in(key: str, mac: str, lsp: str, valid: ValidLb, sb: SbView) -> ValidBackend | None:
    """A backend the NB no longer lists but the gateways still use (until phase 2).

    Its router port is that of another backend on the same switch.
    """
    endpoint = parse_endpoint(key)
    canonical_mac = parse_mac(mac)
    binding = usable_binding(sb, lsp)
    if isinstance(endpoint, str) or canonical_mac is None or binding is None:
        return None
    for vip in valid.vips:
        for other in vip.backends:
            if usable_datapath_key(sb, other.switch_uuid) == binding.datapath_key:
                return ValidBackend(endpoint[0], endpoint[1], key, lsp, canonical_mac,
                                    other.switch_uuid, other.router_port_name,
                                    other.router_port_mac)
    return None


def _plan_affinity(
    valid: ValidLb, vip: ValidVip, ids: _Ids, router_dp: int, group: GroupSpec,
    rp_keys: Mapping[str, int], members: list[tuple[int, ValidBackend]],
    tables: TableLayout, config: PlanConfig, out: _Candidate,
) -> None:
    """Gateway affinity: a conntrack entry in our own zone remembers each flow's bucket.

    The intercept flow looks the packet up in `gateway_zone`; a known flow goes
    straight to its bucket's backend (drained ones included), a new one through
    the group, then to the commit table that stores the bucket id in ct_mark.
    """
    l4, ip_prefix = l4_match(valid.protocol, vip.ip)
    vip_part = (f"{l4},metadata={hex_int(router_dp)},{ip_prefix}_dst={ip_text(vip.ip)},"
                f"tp_dst={dec_int(vip.port, 0xFFFF)}")
    zone = f"zone={dec_int(config.gateway_zone, 0xFFFF)}"
    # Sticky: every backend still listed (drained ones too) and every group member.
    sticky = {slot: b for b in vip.backends
              for slot in slot_ids(ids.bucket_ids[b.key], valid.weight(b.key))}
    sticky.update(dict(members))
    for bid, backend in sorted(sticky.items()):
        if backend.router_port_name not in rp_keys:
            continue
        forward = _bucket_actions(backend, rp_keys[backend.router_port_name], tables)
        out.add_flow(FlowSpec(
            config.gateway_sticky_table, 200,
            f"ct_state=+trk,ct_mark={hex_int(bid)},{vip_part}", forward,
            config.cookie_prefix), vip.key)
    for bid, backend in members:   # the commit table serves exactly the group's buckets
        out.add_flow(FlowSpec(
            config.gateway_commit_table, 100,
            f"{vip_part},dl_dst={mac_text(backend.mac)}",
            f"ct(commit,{zone},exec(set_field:{hex_int(bid)}->ct_mark)),"
            f"dec_ttl,resubmit(,{dec_int(tables.output, MAX_TABLE)})",
            config.cookie_prefix), vip.key)
    out.add_flow(FlowSpec(config.gateway_sticky_table, 100, vip_part,
                          f"group:{dec_int(group.group_id)}", config.cookie_prefix), vip.key)


def _bucket_actions(backend: ValidBackend, router_port_key: int, tables: TableLayout) -> str:
    return (
        f"set_field:{mac_text(backend.router_port_mac)}->eth_src,"
        f"set_field:{mac_text(backend.mac)}->eth_dst,"
        "dec_ttl,"
        f"set_field:{hex_int(router_port_key)}->reg15,"
        f"resubmit(,{dec_int(tables.output, MAX_TABLE)})"
    )


def _steer_actions(backend: ValidBackend, router_port_key: int, then: str) -> str:
    # A bucket is an action set: set fields, then ONE resubmit (no ct(commit) here,
    # it would be lost beside the resubmit on OVS 3.1).
    return (
        f"set_field:{mac_text(backend.router_port_mac)}->eth_src,"
        f"set_field:{mac_text(backend.mac)}->eth_dst,"
        f"set_field:{hex_int(router_port_key)}->reg15,{then}"
    )


def _gateway_flow(
    valid: ValidLb, vip: ValidVip, dgp_key: int, router_dp: int, group: GroupSpec,
    tables: TableLayout, config: PlanConfig,
) -> FlowSpec:
    l4, ip_prefix = l4_match(valid.protocol, vip.ip)
    match = (f"{l4},reg14={hex_int(dgp_key)},metadata={hex_int(router_dp)},"
             f"{ip_prefix}_dst={ip_text(vip.ip)},tp_dst={dec_int(vip.port, 0xFFFF)}")
    if valid.affinity:
        actions = (f"ct(table={dec_int(config.gateway_sticky_table, MAX_TABLE)},"
                   f"zone={dec_int(config.gateway_zone, 0xFFFF)})")
    else:
        actions = f"group:{dec_int(group.group_id)}"
    return FlowSpec(tables.lr_in_intercept, config.gateway_priority, match, actions,
                    config.cookie_prefix)


@dataclass(frozen=True)
class _LocalBackend:
    """A backend whose VIF is bound on this chassis, with its SB keys."""

    ip: IpAddress
    port: int
    key: str
    mac: str
    port_key: int
    switch_dp: int
    router_port_mac: str


def _plan_backends(
    valid: ValidLb, ids: _Ids, snapshot: Snapshot, config: PlanConfig, out: _Candidate
) -> None:
    sb, tables = snapshot.sb, snapshot.tables
    # Switch datapath key -> its router port's MAC, from every VIP's backends first:
    # a backend only in a previous set may sit on a switch another VIP uses.
    router_macs: dict[int, str] = {}
    for vip in valid.vips:
        for backend in vip.backends:
            switch_dp = usable_datapath_key(sb, backend.switch_uuid)
            if switch_dp is not None:
                router_macs.setdefault(switch_dp, backend.router_port_mac)
    for vip in valid.vips:
        local = []
        for backend in vip.backends:
            binding = usable_binding(sb, backend.lsp_name)
            if binding is None:
                out.pending.append(
                    f"no usable SB port binding for backend port {show(backend.lsp_name)} yet")
                continue
            switch_dp = usable_datapath_key(sb, backend.switch_uuid)
            if switch_dp is None or binding.datapath_key != switch_dp:
                out.pending.append(
                    f"no usable SB datapath for the switch of {show(backend.lsp_name)} yet")
                continue
            if binding.chassis != snapshot.chassis:
                continue
            local.append(_LocalBackend(backend.ip, backend.port, backend.key, backend.mac,
                                       binding.tunnel_key, switch_dp,
                                       backend.router_port_mac))
        previous = ids.previous.get(vip.key, {})
        # Backends only in the previous set still hold connections: while the window
        # is open their chassis keep un-DNATing replies and serving redirected packets.
        current = {b.key for b in vip.backends}
        for key, (_bid, mac_text_, lsp) in sorted(previous.items()):
            if key in current:
                continue
            extra = _previous_backend(key, mac_text_, lsp, sb, snapshot.chassis, router_macs)
            if extra is not None:
                local.append(extra)
        second_chance = (valid.second_chance and valid.protocol == "tcp")
        prev_group = None
        if second_chance and previous and local:
            prev_group, targets = _previous_group(valid, vip, previous, ids, sb, config)
            out.groups[prev_group.group_id] = (prev_group, vip.key)
            # A redirected packet leaves through the previous owner's switch, which
            # may be another switch of the router than the one it came in on.
            l4, ip_prefix = l4_match(valid.protocol, vip.ip)
            for dp in sorted(targets | {b.switch_dp for b in local}):
                out.add_flow(FlowSpec(
                    config.redirect_table, 100,
                    f"{l4},metadata={hex_int(dp)},{ip_prefix}_dst={ip_text(vip.ip)},"
                    f"tp_dst={dec_int(vip.port, 0xFFFF)}",
                    f"resubmit(,{dec_int(tables.output, MAX_TABLE)})",
                    config.cookie_prefix), vip.key)
        for backend in local:
            out.roles.add(ROLE_BACKEND)
            _backend_flows(valid, vip, backend, second_chance, prev_group, tables, config,
                           out)


def _previous_backend(
    key: str, mac: str, lsp: str, sb: SbView, chassis: str, router_macs: Mapping[int, str]
) -> _LocalBackend | None:
    endpoint = parse_endpoint(key)
    canonical_mac = parse_mac(mac)
    binding = usable_binding(sb, lsp)
    if isinstance(endpoint, str) or canonical_mac is None or binding is None:
        return None
    if binding.chassis != chassis or binding.datapath_key not in router_macs:
        return None
    ip, port = endpoint
    return _LocalBackend(ip, port, key, canonical_mac, binding.tunnel_key,
                         binding.datapath_key, router_macs[binding.datapath_key])


def _previous_group(
    valid: ValidLb, vip: ValidVip, previous: Mapping[str, tuple[int, str, str]], ids: _Ids,
    sb: SbView, config: PlanConfig,
) -> tuple[GroupSpec, set[int]]:
    """The gateways' group as it was before the last change, on a backend's chassis,
    and the switch datapaths its buckets send to.

    Same bucket ids, same fields: it picks for a packet the backend the gateways
    picked before the change, the one that holds the connection. Each bucket
    steers there, on that backend's own switch (the group serves every local
    backend, whatever its switch, and the previous owner may be on another switch
    of the router): metadata = its switch, inport = 0 (no port; the caller's
    inport belongs to the caller's switch and might equal the owner's key there,
    which OVN's loopback check drops; written `0` as OVS prints it back, or every
    resync would see a difference), outport = its port. The redirect table
    then commits locally or outputs towards it once.
    """
    buckets = {}
    targets: set[int] = set()
    redirect = f"resubmit(,{dec_int(config.redirect_table, MAX_TABLE)})"
    for key, (nb_bid, mac, lsp) in sorted(previous.items()):
        canonical_mac = parse_mac(mac)
        binding = usable_binding(sb, lsp)
        # The slots as the gateways had them (weights as they are now).
        slots = slot_ids(nb_bid, valid.weight(key))
        if (canonical_mac is None or binding is None
                or not 0 < binding.datapath_key <= 0xFFFFFFFF):
            # Unknown now: no state to find anywhere, so serve it here.
            actions = redirect
        else:
            targets.add(binding.datapath_key)
            actions = (f"set_field:{canonical_mac}->eth_dst,"
                       f"set_field:{hex_int(binding.datapath_key)}->metadata,"
                       "set_field:0->reg14,"
                       f"set_field:{hex_int(binding.tunnel_key)}->reg15,{redirect}")
        buckets.update(dict.fromkeys(slots, actions))
    return (GroupSpec(config.previous_group_base + ids.vip_ids[vip.key],
                      valid.group_fields(vip), buckets), targets)


def _backend_flows(
    valid: ValidLb, vip: ValidVip, b: _LocalBackend, second_chance: bool,
    prev_group: GroupSpec | None, tables: TableLayout, config: PlanConfig, out: _Candidate,
) -> None:
    l4, ip_prefix = l4_match(valid.protocol, vip.ip)
    port_key, dp_key = hex_int(b.port_key), hex_int(b.switch_dp)
    zone = "zone=NXM_NX_REG13[0..15]"   # the port's own conntrack zone
    vip_part = f"{ip_prefix}_dst={ip_text(vip.ip)},tp_dst={dec_int(vip.port, 0xFFFF)}"
    out_next = dec_int(tables.ls_out_next, MAX_TABLE)
    dnat = (f"ct(commit,table={out_next},{zone},"
            f"nat(dst={endpoint_text(b.ip, b.port)}))")
    rp_mac = mac_text(b.router_port_mac)
    here = f"{l4},reg15={port_key},metadata={dp_key}"
    reply = FlowSpec(
        tables.ls_in_intercept, config.backend_priority,
        f"{l4},reg14={port_key},metadata={dp_key},"
        f"{ip_prefix}_src={ip_text(b.ip)},tp_src={dec_int(b.port, 0xFFFF)}",
        f"ct(table={dec_int(tables.ls_in_next, MAX_TABLE)},{zone},nat)",
        config.cookie_prefix,
    )
    out.add_flow(reply, vip.key)
    if not second_chance:
        out.add_flow(FlowSpec(tables.ls_out_intercept, config.backend_priority,
                              f"{here},{vip_part}", dnat, config.cookie_prefix), vip.key)
        return
    decide = config.backend_decide_table
    flows = [
        # Look the packet up (un-committed); an existing entry also applies its DNAT.
        FlowSpec(tables.ls_out_intercept, config.backend_priority, f"{here},{vip_part}",
                 f"ct(table={dec_int(decide, MAX_TABLE)},{zone},nat)", config.cookie_prefix),
        # Known connection (already DNATed by the lookup): on to the next stage.
        FlowSpec(decide, 300, f"ct_state=-new-inv+trk,{here}",
                 f"set_field:{rp_mac}->eth_src,resubmit(,{out_next})", config.cookie_prefix),
        # An entry without a reply yet is still ct.new, but the lookup found it and
        # DNATed the packet: the destination says so.
        FlowSpec(decide, 250,
                 f"ct_state=+trk,{here},{ip_prefix}_dst={ip_text(b.ip)},"
                 f"tp_dst={dec_int(b.port, 0xFFFF)}",
                 f"set_field:{rp_mac}->eth_src,resubmit(,{out_next})", config.cookie_prefix),
        # A SYN opens a connection here.
        FlowSpec(decide, 200, f"ct_state=+new+trk,tcp_flags=+syn-ack,{here},{vip_part}",
                 dnat, config.cookie_prefix),
        # Anything else new: serve it here (redirected packets land here too).
        FlowSpec(decide, 100, f"ct_state=+new+trk,{here},{vip_part}",
                 f"set_field:{rp_mac}->eth_src,{dnat}", config.cookie_prefix),
        FlowSpec(decide, 50, f"ct_state=+inv+trk,{here}", "drop", config.cookie_prefix),
        # Redirect table: the previous owner is this very backend -> serve here.
        FlowSpec(config.redirect_table, 200,
                 f"{l4},metadata={dp_key},dl_src={mac_text(b.mac)},dl_dst={mac_text(b.mac)},"
                 f"{vip_part}",
                 f"set_field:{port_key}->reg15,set_field:{rp_mac}->eth_src,{dnat}",
                 config.cookie_prefix),
    ]
    if prev_group is not None:
        # Mid-stream, no state here, straight from a gateway (eth.src is the router's):
        # ask the previous bucket set who owned it. eth.src = our MAC marks the packet
        # as redirected, so the next chassis never redirects it again: no loops.
        flows.append(FlowSpec(
            decide, 150, f"ct_state=+new+trk,{here},dl_src={rp_mac},{vip_part}",
            f"set_field:{mac_text(b.mac)}->eth_src,group:{dec_int(prev_group.group_id)}",
            config.cookie_prefix))
    for flow in flows:
        out.add_flow(flow, vip.key)


def _find_conflict(
    candidate: _Candidate,
    flow_owner: Mapping[tuple[int, int, str], tuple[FlowSpec, _Owner]],
    flows: Mapping[int, FlowSpec],
    groups: Mapping[int, GroupSpec],
    group_owner: Mapping[int, _Owner],
) -> str | None:
    """Why `candidate` cannot join what is accepted so far, or None."""
    for key, (flow, vip_key) in sorted(candidate.flows.items()):
        accepted = flow_owner.get(key)
        if accepted is not None and accepted[0] != flow:
            return f"VIP {vip_key} conflicts with {accepted[1].describe()}"
        same_cookie = flows.get(flow.cookie)
        if same_cookie is not None and same_cookie != flow:
            return f"VIP {vip_key}: flow cookie {flow.cookie:#x} collides with another flow"
    for group_id, (group, vip_key) in sorted(candidate.groups.items()):
        accepted_group = groups.get(group_id)
        if accepted_group is not None and accepted_group != group:
            return (f"VIP {vip_key}: group {group_id} is also used by "
                    f"{group_owner[group_id].describe()} (duplicate VIP id)")
    return None
