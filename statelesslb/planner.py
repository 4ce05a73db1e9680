"""Compute the OpenFlow flows and groups this chassis needs: pure, no I/O.

`plan(snapshot, config)` returns a `Plan`: every flow keyed by its cookie (a
hash of its content, so a changed flow is a new cookie), every select group
keyed by group id, and a status per marked LB. The agent diffs two plans and
applies the difference in one `ovs-ofctl bundle`.

Roles of a chassis for one LB:
- gateway: a DGP of the LB's router is resident here (its `cr-` port is bound
  here). Per VIP: a flow in the router's ingress sending VIP:port to a hash
  group whose buckets rewrite eth.src/eth.dst towards one backend each.
- backend: a backend's VIF is bound here. Per (VIP, backend): a switch egress
  flow that DNATs VIP:port to the backend and commits to conntrack; per
  backend: a switch ingress flow that un-DNATs its replies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv6Address
from types import MappingProxyType

from statelesslb.buckets import MAX_BUCKET_ID, MAX_VIP_ID, parse_drain, parse_id_map
from statelesslb.model import (
    EXT_BUCKETS,
    EXT_DRAIN,
    EXT_VIP_IDS,
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
    LbError,
    ValidBackend,
    ValidLb,
    ValidVip,
    index_topology,
    is_marked,
    show,
    validate_lb,
)

# Identical on every gateway: the hash, and so the chosen backend, must agree.
# Fields whose prerequisites fail (udp_* on TCP, ipv6_* on IPv4) are skipped.
GROUP_FIELDS = "fields(ip_src,ip_dst,ipv6_src,ipv6_dst,nw_proto,tcp_src,tcp_dst,udp_src,udp_dst)"
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

    def __post_init__(self) -> None:
        _check_range("group_id_base", self.group_id_base, _MIN_GROUP_ID_BASE,
                     OFPG_MAX - MAX_VIP_ID)
        _check_range("cookie_prefix", self.cookie_prefix, 1, 0xFFFF)
        _check_range("gateway_priority", self.gateway_priority, 0, 0xFFFF)
        _check_range("backend_priority", self.backend_priority, 0, 0xFFFF)
        _check_range("sentinel_table", self.sentinel_table, 0, MAX_TABLE)

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

    def insert_bucket_line(self, bucket_id: int) -> str:
        return checked_line(
            f"group insert_bucket group_id={self.group_id},command_bucket_id=last,"
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


def plan(snapshot: Snapshot, config: PlanConfig | None = None) -> Plan:
    """The flows, groups and per-LB status for `snapshot.chassis`.

    Raises ValueError only for a bad `config` or table layout (local setup,
    not NB data); NB and SB content never makes it raise.
    """
    config = config or PlanConfig()
    _check_tables(snapshot.tables, config)
    sentinel = sentinel_flow(config)
    flows: dict[int, FlowSpec] = {sentinel.cookie: sentinel}
    groups: dict[int, GroupSpec] = {}
    flow_owner: dict[tuple[int, int, str], tuple[FlowSpec, _Owner]] = {
        sentinel.key: (sentinel, _Owner("sentinel", "")),
    }
    group_owner: dict[int, _Owner] = {}
    statuses: dict[str, LbPlanStatus] = {}

    nb = snapshot.nb
    index = index_topology(nb)
    rows = nb.load_balancers.values() if isinstance(nb.load_balancers, Mapping) else ()
    marked = [
        lb for lb in rows
        if isinstance(lb, NbLoadBalancer) and isinstance(lb.uuid, str) and is_marked(lb)
    ]
    for lb in sorted(marked, key=lambda lb: (_text(lb.name), lb.uuid)):
        name = _text(lb.name)
        valid = validate_lb(lb, nb, index)
        if isinstance(valid, LbError):
            statuses[lb.uuid] = LbPlanStatus(name, STATE_ERROR, valid.message)
            continue
        ids = _read_ids(lb, valid)
        if isinstance(ids, LbPlanStatus):
            statuses[lb.uuid] = ids
            continue
        candidate = _Candidate()
        _plan_gateway(valid, ids, snapshot, config, candidate)
        _plan_backends(valid, snapshot, config, candidate)

        owner = _Owner(name, lb.uuid)
        conflict = candidate.self_conflict or _find_conflict(
            candidate, flow_owner, flows, groups, group_owner)
        if conflict:
            statuses[lb.uuid] = LbPlanStatus(
                name, STATE_ERROR,
                f"{conflict}; nothing of this load balancer is installed on this chassis",
            )
            continue
        for key, (flow, _vip) in sorted(candidate.flows.items()):
            flow_owner.setdefault(key, (flow, owner))
            flows[flow.cookie] = flow
        for group_id, (group, _vip) in sorted(candidate.groups.items()):
            group_owner.setdefault(group_id, owner)
            groups[group_id] = group
        pending = sorted(set(candidate.pending))
        statuses[lb.uuid] = LbPlanStatus(
            name,
            STATE_PENDING if pending else STATE_OK,
            _summary(pending),
            tuple(sorted(candidate.roles)),
            tuple(sorted(candidate.vip_keys)),
        )
    return Plan(
        groups=dict(sorted(groups.items())),
        flows=dict(sorted(flows.items())),
        lb_status=dict(sorted(statuses.items())),
        sentinel_cookie=sentinel.cookie,
    )


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


def _read_ids(lb: NbLoadBalancer, valid: ValidLb) -> _Ids | LbPlanStatus:
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
    own_vip_ids = [vip_ids[k] for k in valid.vip_keys]
    own_bucket_ids = [bucket_ids[k] for k in valid.backend_keys]
    if (len(set(own_vip_ids)) != len(own_vip_ids)
            or len(set(own_bucket_ids)) != len(own_bucket_ids)):
        return LbPlanStatus(name, STATE_PENDING,
                            "stored ids repeat; waiting for the NB writer to re-assign them")
    return _Ids(vip_ids, bucket_ids, parse_drain(ext.get(EXT_DRAIN)))


def _binding(sb: SbView, logical_port: str) -> SbPortBinding | None:
    """The SB port binding, if present and carrying usable keys."""
    bindings = sb.port_bindings if isinstance(sb.port_bindings, Mapping) else {}
    binding = bindings.get(logical_port)
    if (isinstance(binding, SbPortBinding)
            and is_plain_int(binding.tunnel_key) and 0 < binding.tunnel_key <= 0xFFFFFFFF
            and is_plain_int(binding.datapath_key)):
        return binding
    return None


def _datapath_key(sb: SbView, nb_uuid: str) -> int | None:
    keys = sb.datapath_keys if isinstance(sb.datapath_keys, Mapping) else {}
    key = keys.get(nb_uuid)
    return key if is_plain_int(key) and 0 < key <= 0xFFFFFFFF else None


def _l4_match(protocol: str, ip: IpAddress) -> tuple[str, str]:
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
    for dgp in valid.dgps:
        redirect = _binding(sb, "cr-" + dgp)
        if redirect is None:
            out.pending.append(f"no SB port binding cr-{show(dgp)} yet")
        elif redirect.chassis == snapshot.chassis:
            resident.append(dgp)
    if not resident:
        return

    # All or nothing: a group missing a bucket would send that backend's share
    # elsewhere and move it again once the data arrives.
    problems: list[str] = []
    router_dp = _datapath_key(sb, valid.router_uuid)
    if router_dp is None:
        out.pending.append(f"no SB datapath for router {show(valid.router_name)} yet")
        return
    dgp_keys = []
    for dgp in resident:
        binding = _binding(sb, dgp)
        if binding is None or binding.datapath_key != router_dp:
            problems.append(f"no usable SB port binding for gateway port {show(dgp)} yet")
        else:
            dgp_keys.append(binding.tunnel_key)
    groups = []
    for vip in valid.vips:
        buckets = {}
        for backend in vip.backends:
            if backend.key in ids.drained:
                continue
            binding = _binding(sb, backend.router_port_name)
            if binding is None or binding.datapath_key != router_dp:
                problems.append(
                    f"no usable SB port binding for router port "
                    f"{show(backend.router_port_name)} yet")
                continue
            buckets[ids.bucket_ids[backend.key]] = _bucket_actions(
                backend, binding.tunnel_key, snapshot.tables)
        groups.append((vip, GroupSpec(config.group_id_base + ids.vip_ids[vip.key],
                                      GROUP_FIELDS, buckets)))
    if problems:
        out.pending.extend(problems)
        return

    out.roles.add(ROLE_GATEWAY)
    for vip, group in groups:
        out.groups[group.group_id] = (group, vip.key)
        for dgp_key in dgp_keys:
            out.add_flow(_gateway_flow(valid.protocol, vip, dgp_key, router_dp, group,
                                       snapshot.tables, config), vip.key)


def _bucket_actions(backend: ValidBackend, router_port_key: int, tables: TableLayout) -> str:
    return (
        f"set_field:{mac_text(backend.router_port_mac)}->eth_src,"
        f"set_field:{mac_text(backend.mac)}->eth_dst,"
        "dec_ttl,"
        f"set_field:{hex_int(router_port_key)}->reg15,"
        f"resubmit(,{dec_int(tables.output, MAX_TABLE)})"
    )


def _gateway_flow(
    protocol: str, vip: ValidVip, dgp_key: int, router_dp: int, group: GroupSpec,
    tables: TableLayout, config: PlanConfig,
) -> FlowSpec:
    l4, ip_prefix = _l4_match(protocol, vip.ip)
    match = (f"{l4},reg14={hex_int(dgp_key)},metadata={hex_int(router_dp)},"
             f"{ip_prefix}_dst={ip_text(vip.ip)},tp_dst={dec_int(vip.port, 0xFFFF)}")
    return FlowSpec(tables.lr_in_intercept, config.gateway_priority, match,
                    f"group:{dec_int(group.group_id)}", config.cookie_prefix)


def _plan_backends(
    valid: ValidLb, snapshot: Snapshot, config: PlanConfig, out: _Candidate
) -> None:
    sb, tables = snapshot.sb, snapshot.tables
    for vip in valid.vips:
        for backend in vip.backends:
            binding = _binding(sb, backend.lsp_name)
            if binding is None:
                out.pending.append(
                    f"no usable SB port binding for backend port {show(backend.lsp_name)} yet")
                continue
            if binding.chassis != snapshot.chassis:
                continue
            switch_dp = _datapath_key(sb, backend.switch_uuid)
            if switch_dp is None or binding.datapath_key != switch_dp:
                out.pending.append(
                    f"no usable SB datapath for the switch of {show(backend.lsp_name)} yet")
                continue
            out.roles.add(ROLE_BACKEND)
            l4, ip_prefix = _l4_match(valid.protocol, vip.ip)
            port_key, dp_key = hex_int(binding.tunnel_key), hex_int(switch_dp)
            zone = "zone=NXM_NX_REG13[0..15]"   # the port's own conntrack zone
            dnat = FlowSpec(
                tables.ls_out_intercept, config.backend_priority,
                f"{l4},reg15={port_key},metadata={dp_key},"
                f"{ip_prefix}_dst={ip_text(vip.ip)},tp_dst={dec_int(vip.port, 0xFFFF)}",
                f"ct(commit,table={dec_int(tables.ls_out_next, MAX_TABLE)},{zone},"
                f"nat(dst={endpoint_text(backend.ip, backend.port)}))",
                config.cookie_prefix,
            )
            reply = FlowSpec(
                tables.ls_in_intercept, config.backend_priority,
                f"{l4},reg14={port_key},metadata={dp_key},"
                f"{ip_prefix}_src={ip_text(backend.ip)},tp_src={dec_int(backend.port, 0xFFFF)}",
                f"ct(table={dec_int(tables.ls_in_next, MAX_TABLE)},{zone},nat)",
                config.cookie_prefix,
            )
            out.add_flow(dnat, vip.key)
            out.add_flow(reply, vip.key)


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
