"""The agent's control socket, spoken the ovs-appctl way (python-ovs unixctl).

statelesslb-ctl (or plain `ovs-appctl -t SOCKET COMMAND`) asks; every reply is
one JSON document, so the CLI renders tables or passes JSON through unchanged.
The socket is created mode 0600 in a directory of its own: only root (or the
agent's user) can drive the agent. Nothing listens on a network port.

Commands (reply schemas: docs/operation.md):

    status                       health, connections, counters, table layout
    lb-list                      marked LBs: NB status and this chassis' plan status
    lb-show LB                   VIPs, backends, bucket ids, ports, chassis, drain
    groups [LB]                  installed groups with per-bucket counters
    trace LB SRC_IP SRC_PORT PROTO [VIP:PORT]
                                 which bucket the gateway picks for that flow
                                 (PROTO "": the LB's own)
    plan                         the desired flows and groups as bundle lines
    resync                       re-read the bridge and reinstall what differs

Everything an operator types is parsed into typed values (validate.py's strict
parsers) before it reaches any command line; the ones built here go through
ofstrings' checks like the planner's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import ovs.poller
import ovs.unixctl
import ovs.unixctl.server

from statelesslb import __version__
from statelesslb.buckets import parse_drain, parse_id_map, parse_previous
from statelesslb.diff import bucket_body, group_header, want_buckets
from statelesslb.metrics import (
    AGENT_HEALTHY,
    BACKEND_CONNTRACK,
    BUCKET_BYTES,
    BUCKET_PACKETS,
    LB_STATE,
    Metric,
    conntrack_counts,
    render,
)
from statelesslb.model import (
    EXT_BUCKETS,
    EXT_DRAIN,
    EXT_PREVIOUS,
    EXT_STATUS,
    EXT_VIP_IDS,
    MODE_OPTION,
    PERSISTENCE_OPTION,
    NbLoadBalancer,
    Snapshot,
)
from statelesslb.ofstrings import (
    checked_piece,
    dec_int,
    endpoint_text,
    hex_int,
    ip_text,
    mac_text,
)
from statelesslb.openflow import InstalledGroup, OfctlError
from statelesslb.planner import (
    BUCKET_WEIGHT,
    ROLE_BACKEND,
    Plan,
    PlanConfig,
    backend_health,
    l4_match,
    usable_binding,
    usable_datapath_key,
)
from statelesslb.predict import HASH_IMPLS, FlowTuple, bucket_scores
from statelesslb.validate import (
    DEFAULT_PERSISTENCE,
    SUPPORTED_PROTOCOLS,
    LbError,
    ValidLb,
    ValidVip,
    endpoint_key,
    is_marked,
    parse_endpoint,
    parse_ip,
    parse_mac,
    parse_port,
    show,
    validate_lb,
    vip_backend_keys,
)
from statelesslb.weights import SLOT_BASE, base_id

if TYPE_CHECKING:
    from statelesslb.agent import Agent

LOG = logging.getLogger(__name__)

# A traced packet needs some source MAC; the intercept flow does not match on it.
TRACE_SRC_MAC = "02:00:00:00:00:01"
TRACE_TTL = 64
# ct_state new|trk, in the numeric form (no '|' in flow text).
CT_NEW_TRACKED = 0x21
# How often `groups` re-reads when a bundle changed a group between its two dumps.
GROUP_READ_ATTEMPTS = 3
# A full sync older than this many resync intervals makes `status` unhealthy.
STALE_SYNC_FACTOR = 3

_STATS_GROUP_RE = re.compile(
    r"group_id=(\d+),.*?\bpacket_count=(\d+),byte_count=(\d+)")
_STATS_BUCKET_RE = re.compile(r"\bbucket(\d+):packet_count=(\d+),byte_count=(\d+)")
_ETH_DST_RE = re.compile(r"set_field:([0-9a-f:]{17})->eth_dst")
_TRACE_TABLE_RE = re.compile(r"^\s*(\d+)\. (.*?)(?:, priority (\d+))?(?:, cookie (0x[0-9a-f]+))?$")
_TRACE_SCORE_RE = re.compile(r"-> bucket (\d+): score (\d+)")
_TRACE_USING_RE = re.compile(r"-> using bucket (\d+)")
_TRACE_TUNNEL_RE = re.compile(r"-> tunneling to (\S+) via")
_TRACE_DP_RE = re.compile(r"^Datapath actions: (.*)$")
# The intercept's first action when a conntrack lookup comes first (affinity layer).
_TRACE_CT_RE = re.compile(r"^\s*ct\(table=(\d+),zone=(\d+)\)$")
_TRACE_RECIRC_RE = re.compile(r"^=+$")

GROUP_GATEWAY = "gateway"     # the VIP's select group on an active gateway
GROUP_PREVIOUS = "previous"   # the bucket set before the last change (second chance)


class NotReady(ValueError):
    """The agent has not read the databases or the bridge yet."""


# ---------------------------------------------------------------------------
# Pure helpers: snapshot + plan in, JSON-able documents out (unit-tested).


def find_lb(snapshot: Snapshot, ref: str, *, marked: bool = True) -> NbLoadBalancer:
    """The NB load balancer named (or with the UUID) `ref`, or a ValueError saying why not."""
    lbs = [lb for lb in snapshot.nb.load_balancers.values() if isinstance(lb, NbLoadBalancer)]
    found = [lb for lb in lbs if lb.uuid == ref] or [lb for lb in lbs if lb.name == ref]
    if not found:
        raise ValueError(f"no load balancer named {show(ref)} in the NB "
                         "(statelesslb-ctl lb-list shows the stateless ones)")
    if len(found) > 1:
        uuids = ", ".join(sorted(lb.uuid for lb in found))
        raise ValueError(f"{len(found)} load balancers are named {show(ref)}: "
                         f"give one of their UUIDs ({uuids})")
    lb = found[0]
    if marked and not is_marked(lb):
        raise ValueError(f"load balancer {show(lb.name)} is not stateless: set "
                         f"options:{MODE_OPTION}=mac on it first")
    return lb


@dataclass(frozen=True)
class LbIds:
    vip_ids: dict[str, int]
    bucket_ids: dict[str, int]
    drained: frozenset[str]

    @property
    def backend_of_bucket(self) -> dict[int, str]:
        return _BucketBackends({bucket_id: key for key, bucket_id in self.bucket_ids.items()})


class _BucketBackends(dict):
    """NB bucket id -> backend key; a weighted backend's slot ids find it too."""

    def get(self, bucket_id, default=None):
        if bucket_id in self:
            return self[bucket_id]
        if isinstance(bucket_id, int) and bucket_id >= SLOT_BASE:
            return super().get(base_id(bucket_id), default)
        return default


def lb_ids(lb: NbLoadBalancer) -> LbIds:
    """The NB writer's ids and the operator's drain list; malformed maps read as empty."""
    ext = lb.external_ids
    return LbIds(parse_id_map(ext.get(EXT_VIP_IDS)) or {},
                 parse_id_map(ext.get(EXT_BUCKETS)) or {},
                 parse_drain(ext.get(EXT_DRAIN)))


def _binding_chassis(snapshot: Snapshot, logical_port: str) -> str | None:
    binding = snapshot.sb.port_bindings.get(logical_port)
    return binding.chassis if binding is not None else None


def _valid(snapshot: Snapshot, lb: NbLoadBalancer) -> ValidLb | None:
    valid = validate_lb(lb, snapshot.nb)
    return None if isinstance(valid, LbError) else valid


def _backend_details(snapshot: Snapshot, valid: ValidLb | None) -> dict[str, dict[str, Any]]:
    """Backend key -> MAC, logical port and the chassis the SB binds that port to."""
    details: dict[str, dict[str, Any]] = {}
    for vip in valid.vips if valid else ():
        for backend in vip.backends:
            details[backend.key] = {
                "mac": backend.mac,
                "logical_port": backend.lsp_name,
                "chassis": _binding_chassis(snapshot, backend.lsp_name),
            }
    return details


def _gateway_ports(snapshot: Snapshot, valid: ValidLb | None) -> list[dict[str, Any]]:
    ports = []
    for dgp in valid.dgps if valid else ():
        chassis = _binding_chassis(snapshot, "cr-" + dgp)
        ports.append({"name": dgp, "chassis": chassis, "here": chassis == snapshot.chassis})
    return ports


def _not_gateway_note(snapshot: Snapshot, lb: NbLoadBalancer) -> str:
    ports = _gateway_ports(snapshot, _valid(snapshot, lb))
    where = ", ".join(f"cr-{p['name']} is on {p['chassis'] or 'no chassis'}" for p in ports)
    return (f"{snapshot.chassis} is not an active gateway of {show(lb.name)}"
            + (f" ({where})" if where else ""))


def _plan_entry(plan: Plan | None, lb: NbLoadBalancer) -> dict[str, Any] | None:
    status = plan.lb_status.get(lb.uuid) if plan else None
    return asdict(status) if status else None


def lb_list_doc(snapshot: Snapshot | None, plan: Plan | None) -> list[dict[str, Any]]:
    """One entry per marked LB: this chassis' plan status plus the NB's view of it."""
    if plan is None or snapshot is None:
        return []
    entries = []
    for uuid, status in sorted(plan.lb_status.items()):
        lb = snapshot.nb.load_balancers.get(uuid)
        entry = {"uuid": uuid, **asdict(status)}
        entry["mode"] = lb.options.get(MODE_OPTION) if lb else None
        entry["protocol"] = (lb.protocol or "tcp") if lb else None
        entry["nb_status"] = lb.external_ids.get(EXT_STATUS) if lb else None
        entry["persistence"] = (lb.options.get(PERSISTENCE_OPTION, DEFAULT_PERSISTENCE)
                                if lb else None)
        entry["vips"] = [key for key, _ in vip_backend_keys(lb.vips)] if lb else []
        entries.append(entry)
    return entries


def lb_show_doc(snapshot: Snapshot, plan: Plan | None, config: PlanConfig,
                ref: str) -> dict[str, Any]:
    lb = find_lb(snapshot, ref, marked=False)
    valid = _valid(snapshot, lb) if is_marked(lb) else None
    ids = lb_ids(lb)
    details = _backend_details(snapshot, valid)
    vips = []
    for vip_key, backends in vip_backend_keys(lb.vips):
        vip_id = ids.vip_ids.get(vip_key)
        group_id = config.group_id_base + vip_id if vip_id is not None else None
        planned = plan.groups.get(group_id) if plan and group_id is not None else None
        rows = []
        for key in backends:
            bucket_id = ids.bucket_ids.get(key)
            info = details.get(key, {})
            endpoint = parse_endpoint(key)
            health = (None if isinstance(endpoint, str) else
                      backend_health(snapshot.sb, *endpoint, lb.protocol or "tcp"))
            rows.append({
                "backend": key,
                "bucket_id": bucket_id,
                "mac": info.get("mac"),
                "logical_port": info.get("logical_port"),
                "chassis": info.get("chassis"),
                "drained": key in ids.drained,
                "health": health,
                "in_group": (bucket_id in planned.buckets) if planned else None,
            })
        vips.append({"vip": vip_key, "vip_id": vip_id, "group_id": group_id,
                     "group_here": planned is not None, "backends": rows})
    return {
        "chassis": snapshot.chassis,
        "uuid": lb.uuid,
        "name": lb.name,
        "protocol": lb.protocol or "tcp",
        "mode": lb.options.get(MODE_OPTION),
        "nb_status": lb.external_ids.get(EXT_STATUS),
        "agent": _plan_entry(plan, lb),
        "router": valid.router_name if valid else None,
        "persistence": _persistence(valid),
        "hash": _hash_doc(valid),
        "weights": dict(valid.weights) if valid else {},
        "previous": _previous_set(lb, valid),
        "gateway_ports": _gateway_ports(snapshot, valid),
        "drain": sorted(ids.drained),
        "vips": vips,
    }


def _hash_doc(valid: ValidLb | None) -> dict[str, Any] | None:
    """What the LB's groups hash: its options:stateless_hash and the classes it makes."""
    if valid is None:
        return None
    return {"option": valid.hash.text, "classes": valid.hash.classes,
            "fields": {vip.key: valid.group_fields(vip) for vip in valid.vips}}


def _persistence(valid: ValidLb | None) -> dict[str, Any] | None:
    if valid is None:
        return None
    return {"affinity": valid.affinity, "second_chance": valid.second_chance,
            "window": valid.window}


def _previous_set(lb: NbLoadBalancer, valid: ValidLb | None) -> dict[str, Any] | None:
    """The bucket set before the last change, which second chance serves until `until`."""
    previous = parse_previous(lb.external_ids.get(EXT_PREVIOUS))
    if previous is None or valid is None or not valid.second_chance:
        return None
    since, vips = previous
    return {"since": since, "until": since + valid.window,
            "vips": {vip: sorted(backends) for vip, backends in sorted(vips.items())}}


@dataclass(frozen=True)
class GroupStats:
    packet_count: int
    byte_count: int
    buckets: tuple[tuple[int, int], ...]   # (packets, bytes) by LIST POSITION


def parse_group_stats(dump: str) -> dict[int, GroupStats]:
    """`dump-group-stats` output by group id. OVS numbers buckets by position, not id."""
    stats = {}
    for line in dump.splitlines():
        m = _STATS_GROUP_RE.search(line)
        if not m:
            continue
        by_position = sorted((int(p), int(n), int(b))
                             for p, n, b in _STATS_BUCKET_RE.findall(line))
        stats[int(m.group(1))] = GroupStats(
            int(m.group(2)), int(m.group(3)), tuple((n, b) for _, n, b in by_position))
    return stats


def group_owners(snapshot: Snapshot, config: PlanConfig
                 ) -> dict[int, tuple[NbLoadBalancer, LbIds, str, str]]:
    """Group id -> (marked LB, its ids, VIP key, kind), from the NB writer's VIP ids."""
    owners = {}
    for lb in snapshot.nb.load_balancers.values():
        if isinstance(lb, NbLoadBalancer) and is_marked(lb):
            ids = lb_ids(lb)
            for vip_key, vip_id in ids.vip_ids.items():
                owners.setdefault(config.group_id_base + vip_id,
                                  (lb, ids, vip_key, GROUP_GATEWAY))
                owners.setdefault(config.previous_group_base + vip_id,
                                  (lb, ids, vip_key, GROUP_PREVIOUS))
    return owners


def groups_doc(snapshot: Snapshot, plan: Plan | None, config: PlanConfig,
               installed: Mapping[int, InstalledGroup], stats: Mapping[int, GroupStats],
               ref: str | None = None) -> dict[str, Any]:
    """Our installed groups, each bucket with its id, backend and counters.

    `installed` comes from dump-groups (bucket dicts in list order); its order
    maps dump-group-stats' bucket positions to bucket ids.
    """
    lb_filter = find_lb(snapshot, ref) if ref is not None else None
    owners = group_owners(snapshot, config)
    no_ids = LbIds({}, {}, frozenset())
    # An LB owns several groups: its bucket map and backend details, once per LB.
    per_lb: dict[str, tuple[dict[int, str], dict[str, dict[str, Any]]]] = {}
    groups = []
    for group_id, group in sorted(installed.items()):
        lb, ids, vip_key, kind = owners.get(group_id, (None, no_ids, None, None))
        if lb_filter is not None and (lb is None or lb.uuid != lb_filter.uuid):
            continue
        if lb is not None and lb.uuid not in per_lb:
            per_lb[lb.uuid] = (ids.backend_of_bucket,
                               _backend_details(snapshot, _valid(snapshot, lb)))
        backend_of, details = per_lb[lb.uuid] if lb is not None else ({}, {})
        counters = stats.get(group_id, GroupStats(0, 0, ()))
        buckets = []
        for position, (bucket_id, body) in enumerate(group.buckets.items()):
            backend = backend_of.get(bucket_id)
            mac = _ETH_DST_RE.search(body)
            packets, octets = (counters.buckets[position]
                               if position < len(counters.buckets) else (None, None))
            info = details.get(backend, {}) if backend else {}
            buckets.append({
                "bucket_id": bucket_id,
                "position": position,
                "backend": backend,
                "mac": mac.group(1) if mac else None,
                "logical_port": info.get("logical_port"),
                "chassis": info.get("chassis"),
                "packet_count": packets,
                "byte_count": octets,
            })
        planned = plan.groups.get(group_id) if plan else None
        # In sync: same header, same buckets, in the same (canonical) order: ties go
        # to the bucket listed later, so the order is part of what gateways agree on.
        in_sync = planned is not None and group.header == group_header(planned) and [
            (bid, bucket_body(body)) for bid, body in group.buckets.items()
        ] == list(want_buckets(planned).items())
        # Drained buckets are left out of the gateway groups only; a previous set is
        # the history it is.
        drained = (sorted(key for key in ids.drained if key in ids.bucket_ids)
                   if kind == GROUP_GATEWAY else [])
        base = (config.previous_group_base if kind == GROUP_PREVIOUS
                else config.group_id_base)
        groups.append({
            "group_id": group_id,
            "kind": kind,
            "lb": lb.name if lb else None,
            "lb_uuid": lb.uuid if lb else None,
            "vip": vip_key,
            "vip_id": group_id - base if kind else None,
            "packet_count": counters.packet_count,
            "byte_count": counters.byte_count,
            "in_plan": planned is not None,
            "in_sync": in_sync,
            "drained": drained,
            "buckets": buckets,
        })
    notes = []
    if lb_filter is not None and not any(g["kind"] == GROUP_GATEWAY for g in groups):
        notes.append(_not_gateway_note(snapshot, lb_filter))
    elif lb_filter is not None and not any(
            p["here"] for p in _gateway_ports(snapshot, _valid(snapshot, lb_filter))):
        notes.append(_not_gateway_note(snapshot, lb_filter)
                     + ": standby, its groups are ready for a failover")
    return {"chassis": snapshot.chassis, "lb": lb_filter.name if lb_filter else None,
            "groups": groups, "notes": notes}


@dataclass(frozen=True)
class TraceRequest:
    lb: NbLoadBalancer
    valid: ValidLb
    vip_key: str
    group_id: int
    source: str            # "172.16.0.50:40000"
    flow: str              # the packet's headers and OVN registers
    actions: str           # resubmit to the intercept table
    packet: FlowTuple      # what the group hashes
    fields: str            # the group's fields(...): what of the packet it hashes


def trace_request(snapshot: Snapshot, plan: Plan | None, config: PlanConfig,
                  argv: list[str]) -> TraceRequest:
    """Check `trace LB SRC_IP SRC_PORT PROTO [VIP:PORT]` and build the packet to trace.

    An empty PROTO traces with the LB's own protocol.
    """
    lb_ref, src_ip_text, src_port_text, proto = argv[:4]
    vip_text = argv[4] if len(argv) > 4 else None
    src_ip = parse_ip(src_ip_text)
    if src_ip is None:
        raise ValueError(f"source {show(src_ip_text)} is not an IPv4 or IPv6 address")
    src_port = parse_port(src_port_text)
    if src_port is None:
        raise ValueError(f"source port {show(src_port_text)} is not in 1..65535")
    if proto and proto not in SUPPORTED_PROTOCOLS:
        raise ValueError(f"protocol {show(proto)} is not tcp or udp")
    lb = find_lb(snapshot, lb_ref)
    valid = validate_lb(lb, snapshot.nb)
    if isinstance(valid, LbError):
        raise ValueError(f"load balancer {show(lb.name)} is not usable: {valid.message}")
    if proto and proto != valid.protocol:
        raise ValueError(f"load balancer {show(lb.name)} balances {valid.protocol}, not {proto}")
    vip = _choose_vip(valid, vip_text)
    if src_ip.version != vip.ip.version:
        raise ValueError(f"source {src_ip} is IPv{src_ip.version}, VIP {vip.key} is "
                         f"IPv{vip.ip.version}")
    vip_id = lb_ids(lb).vip_ids.get(vip.key)
    if vip_id is None:
        raise ValueError(f"VIP {vip.key} has no id yet: is an NB writer agent running?")
    group_id = config.group_id_base + vip_id
    if plan is None or group_id not in plan.groups:
        raise ValueError(_not_gateway_note(snapshot, lb) + ": run the trace there")
    local = [dgp for dgp in valid.dgps
             if _binding_chassis(snapshot, "cr-" + dgp) == snapshot.chassis]
    if not local:
        # A standby holds the groups too, but no traffic of the VIP comes here.
        raise ValueError(_not_gateway_note(snapshot, lb) + ": run the trace there")
    router_dp = usable_datapath_key(snapshot.sb, valid.router_uuid)
    # inport and destination MAC from one DGP: the packet as that port receives it.
    usable = [(dgp, binding) for dgp in local
              if (binding := usable_binding(snapshot.sb, dgp)) is not None
              and binding.datapath_key == router_dp]
    if router_dp is None or not usable:
        raise ValueError(f"the SB has no keys for router {show(valid.router_name)} yet")
    dgp, dgp_binding = usable[0]
    dgp_port = snapshot.nb.router_ports.get(dgp)
    dgp_mac = parse_mac(dgp_port.mac if dgp_port else None) or TRACE_SRC_MAC
    l4, ip = l4_match(valid.protocol, vip.ip)
    flow = checked_piece(",".join([
        "in_port=CONTROLLER",
        l4,
        f"metadata={hex_int(router_dp)}",
        f"reg14={hex_int(dgp_binding.tunnel_key)}",
        f"dl_src={mac_text(TRACE_SRC_MAC)}",
        f"dl_dst={mac_text(dgp_mac)}",
        f"{ip}_src={ip_text(src_ip)}",
        f"{ip}_dst={ip_text(vip.ip)}",
        f"nw_ttl={dec_int(TRACE_TTL, 255)}",
        f"tp_src={dec_int(src_port, 0xFFFF)}",
        f"tp_dst={dec_int(vip.port, 0xFFFF)}",
    ]))
    actions = checked_piece(f"resubmit(,{dec_int(snapshot.tables.lr_in_intercept, 254)})")
    source = endpoint_text(src_ip, src_port)
    packet = FlowTuple.make(src_ip, vip.ip, valid.protocol, src_port, vip.port)
    return TraceRequest(lb, valid, vip.key, group_id, source, flow, actions, packet,
                        plan.groups[group_id].fields)


def trace_followup(req: TraceRequest, text: str) -> tuple[str, str, int] | None:
    """(flow, actions, zone) that continue a trace stopped at the intercept's conntrack
    lookup (the affinity layer), as a new connection; None when no lookup came first.

    ofproto/trace-packet-out cannot resume a recirculation ("Recirculation conflict"),
    so the second half is traced as its own packet, with the state a new connection
    gets from that lookup.
    """
    lines = text.splitlines()
    for n, line in enumerate(lines):
        if _TRACE_TABLE_RE.match(line) and n + 1 < len(lines):
            m = _TRACE_CT_RE.match(lines[n + 1])
            if not m:
                return None
            table, zone = int(m.group(1)), int(m.group(2))
            flow = checked_piece(f"{req.flow},ct_state={CT_NEW_TRACKED:#x},"
                                 f"ct_zone={dec_int(zone, 0xFFFF)}")
            return flow, checked_piece(f"resubmit(,{dec_int(table, 254)})"), zone
    return None


def _choose_vip(valid: ValidLb, vip_text: str | None) -> ValidVip:
    if vip_text is not None:
        parsed = parse_endpoint(vip_text)
        if isinstance(parsed, str):
            raise ValueError(f"VIP {show(vip_text)} {parsed}")
        key = endpoint_key(*parsed)
        for vip in valid.vips:
            if vip.key == key:
                return vip
        raise ValueError(f"{key} is not a VIP of {show(valid.name)} "
                         f"(its VIPs: {', '.join(valid.vip_keys)})")
    if len(valid.vips) != 1:
        raise ValueError(f"{show(valid.name)} has {len(valid.vips)} VIPs "
                         f"({', '.join(valid.vip_keys)}): choose one with --vip")
    return valid.vips[0]


def parse_trace(text: str) -> dict[str, Any]:
    """The parts of an `ofproto/trace` that say what the gateway did with the packet."""
    first_table = None
    scores: dict[int, int] = {}
    chosen = None
    eth_dst = tunnel = datapath_actions = None
    for line in text.splitlines():
        if first_table is None:
            m = _TRACE_TABLE_RE.match(line)
            if m:
                first_table = {"table": int(m.group(1)), "match": m.group(2),
                               "priority": int(m.group(3)) if m.group(3) else None,
                               "cookie": m.group(4)}
                continue
        if m := _TRACE_SCORE_RE.search(line):
            scores[int(m.group(1))] = int(m.group(2))
        elif chosen is None and (m := _TRACE_USING_RE.search(line)):
            chosen = int(m.group(1))
        elif chosen is not None and eth_dst is None and (m := _ETH_DST_RE.search(line)):
            eth_dst = m.group(1)
        elif tunnel is None and (m := _TRACE_TUNNEL_RE.search(line)):
            tunnel = m.group(1)
        elif m := _TRACE_DP_RE.match(line):
            datapath_actions = m.group(1)
    return {"first_table": first_table, "scores": scores, "bucket_id": chosen,
            "eth_dst": eth_dst, "tunnel_to": tunnel, "datapath_actions": datapath_actions}


def hash_impl_of(scores: Mapping[int, int], packet: FlowTuple, fields: str) -> str | None:
    """Which OVS hash build printed these scores ("murmur" or "crc32"), None if neither:
    statelesslb.predict recomputes them from the packet and the group's `fields`.

    Gateways whose builds hash differently pick different backends for one flow.
    """
    if not scores:
        return None
    for impl in HASH_IMPLS:
        if bucket_scores(list(scores), BUCKET_WEIGHT, fields, packet,
                         hash_impl=impl) == dict(scores):
            return impl
    return None


def trace_doc(snapshot: Snapshot, config: PlanConfig, req: TraceRequest,
              text: str, followup: str | None = None, zone: int | None = None
              ) -> dict[str, Any]:
    """The trace's verdict. `followup` is the second half when the intercept first looked
    the packet up in the affinity zone `zone` (see trace_followup)."""
    notes = []
    if followup is not None:
        # Phase one up to where it recirculates; its failed resumption says nothing.
        head = []
        for line in text.splitlines():
            if _TRACE_RECIRC_RE.match(line):
                break
            head.append(line)
        text = "\n".join(head).rstrip() + (
            f"\n\n--- continued as a NEW connection (ct_state=new|trk in zone {zone}) ---\n\n"
            + followup)
        notes.append(f"affinity: a connection already tracked in conntrack zone {zone} "
                     "keeps the bucket stored in its ct_mark (ovs-appctl "
                     f"dpctl/dump-conntrack zone={zone}); this is a new connection's choice")
    parsed = parse_trace(text)
    ids = lb_ids(req.lb)
    backend_of = ids.backend_of_bucket
    details = _backend_details(snapshot, req.valid)
    first = parsed["first_table"] or {}
    cookie = first.get("cookie")
    ours = cookie is not None and int(cookie, 16) >> 48 == config.cookie_prefix
    chosen = None
    if parsed["bucket_id"] is not None:
        backend = backend_of.get(parsed["bucket_id"])
        info = details.get(backend, {}) if backend else {}
        chosen = {"bucket_id": parsed["bucket_id"], "backend": backend,
                  "mac": parsed["eth_dst"] or info.get("mac"),
                  "logical_port": info.get("logical_port"), "chassis": info.get("chassis")}
    return {
        "chassis": snapshot.chassis,
        "lb": req.lb.name,
        "lb_uuid": req.lb.uuid,
        "vip": req.vip_key,
        "protocol": req.valid.protocol,
        "source": req.source,
        "group_id": req.group_id,
        "flow": req.flow,
        "intercepted": ours,
        "first_table": first or None,
        "backend": chosen,
        "scores": [{"bucket_id": bid, "backend": backend_of.get(bid), "score": score}
                   for bid, score in sorted(parsed["scores"].items())],
        "hash_fields": req.fields,
        "hash_classes": req.valid.hash.text,
        "hash_impl": hash_impl_of(parsed["scores"], req.packet, req.fields),
        "tunnel_to": parsed["tunnel_to"],
        "datapath_actions": parsed["datapath_actions"],
        "notes": notes,
        "trace": text,
    }


def metrics_text(snapshot: Snapshot, plan: Plan | None, groups: Mapping[str, Any],
                 conntrack: Mapping[tuple[str, int, str, int], int], healthy: bool) -> str:
    """The Prometheus exposition of this chassis: bucket counters of its groups (by
    bucket id), conntrack entries per local backend and VIP, each LB's state."""
    chassis = snapshot.chassis
    samples: list[tuple[Metric, Mapping[str, object], float | int | None]] = [
        (AGENT_HEALTHY, {"chassis": chassis}, int(healthy))]
    for group in groups.get("groups", []):
        for bucket in group["buckets"]:
            labels = {"chassis": chassis, "lb": group.get("lb"), "vip": group.get("vip"),
                      "group": group.get("kind"), "bucket_id": bucket["bucket_id"],
                      "backend": bucket.get("backend")}
            samples.append((BUCKET_PACKETS, labels, bucket.get("packet_count")))
            samples.append((BUCKET_BYTES, labels, bucket.get("byte_count")))
    for uuid, status in sorted((plan.lb_status if plan else {}).items()):
        samples.append((LB_STATE, {"chassis": chassis, "lb": status.name, "lb_uuid": uuid,
                                   "state": status.state}, 1))
        lb = snapshot.nb.load_balancers.get(uuid)
        valid = _valid(snapshot, lb) if lb is not None else None
        if valid is None or ROLE_BACKEND not in status.roles:
            continue
        for vip in valid.vips:
            for backend in vip.backends:
                count = conntrack.get((ip_text(vip.ip), vip.port, ip_text(backend.ip),
                                       backend.port))
                if count:
                    samples.append((BACKEND_CONNTRACK, {
                        "chassis": chassis, "lb": valid.name, "vip": vip.key,
                        "backend": backend.key}, count))
    return render(samples)


def health_problems(status: Mapping[str, Any], resync_interval: float,
                    now: float) -> list[str]:
    """Why this agent is not healthy, in words an operator can act on; [] when healthy."""
    problems = []
    for name, up in sorted(status.get("connections", {}).items()):
        if not up:
            problems.append(f"not connected to the {name.upper()} database")
    if status.get("layout") is None:
        problems.append("OpenFlow table layout not derived yet "
                        "(is ovn-controller running and connected?)")
    if status.get("last_error"):
        problems.append(f"last update failed: {status['last_error']}")
    if status.get("nb_writer_error"):
        problems.append(f"NB write failed: {status['nb_writer_error']}")
    synced = status.get("last_full_sync")
    if synced is None:
        problems.append("no full sync with the bridge yet")
    elif now - synced > STALE_SYNC_FACTOR * resync_interval + 10:
        problems.append(f"last full sync {now - synced:.0f}s ago "
                        f"(resync_interval is {resync_interval:g}s): is the agent stuck?")
    for what in ("flows", "groups"):
        have, want = status.get(f"{what}_installed"), status.get(f"{what}_expected")
        if have is not None and have != want:
            problems.append(f"{have} {what} installed, {want} expected")
    return problems


# ---------------------------------------------------------------------------
# The socket


class CtlServer:
    def __init__(self, path: str, agent: Agent):
        self.path = path
        self.agent = agent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ctl-server", daemon=True)
        self._server = None
        self.commands: dict[str, Callable[[list[str]], Any]] = {}
        self.register("status", self._status)
        self.register("lb-list", self._lb_list)
        self.register("lb-show", self._lb_show, 1, 1)
        self.register("groups", self._groups, 0, 1)
        self.register("trace", self._trace, 4, 5)
        self.register("plan", self._plan)
        self.register("resync", self._resync)
        self.register("metrics", self._metrics)

    def register(self, name: str, handler, min_args: int = 0, max_args: int = 0) -> None:
        """handler(argv) -> JSON-able object; raise ValueError for a user error."""
        self.commands[name] = handler

        def _callback(conn, argv, aux):
            try:
                conn.reply(json.dumps(handler(argv), sort_keys=True, default=str))
            except ValueError as exc:
                LOG.debug("ctl command %s %s: %s", name, argv, exc)
                conn.reply_error(str(exc))
            except Exception as exc:  # the agent keeps running whatever a command does
                LOG.exception("ctl command %s failed", name)
                conn.reply_error(f"internal error: {exc}")

        ovs.unixctl.command_register(name, "", min_args, max_args, _callback, None)

    def start(self) -> None:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o750, exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)  # a stale socket of a previous run
        old_umask = os.umask(0o177)
        try:
            error, self._server = ovs.unixctl.server.UnixctlServer.create(self.path)
        finally:
            os.umask(old_umask)
        if error:
            raise SystemExit(f"cannot create control socket {self.path}: {os.strerror(error)}")
        os.chmod(self.path, 0o600)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        if self._server is not None:
            self._server.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._server.run()
            poller = ovs.poller.Poller()
            self._server.wait(poller)
            poller.timer_wait(200)
            poller.block()

    # -- state access ----------------------------------------------------------------
    def _snapshot(self) -> tuple[Snapshot, Plan | None]:
        # The agent replaces both objects whole: read each reference once.
        snapshot, plan = self.agent.snapshot, self.agent.plan
        if snapshot is None:
            raise NotReady("the agent has not read the NB, SB and bridge yet "
                           "(starting, or waiting for ovn-controller); try again shortly")
        return snapshot, plan

    def _ofctl(self):
        if self.agent.ofctl is None:
            raise NotReady("the agent is still starting; try again shortly")
        return self.agent.ofctl

    # -- commands -----------------------------------------------------------------
    def _status(self, argv):
        agent = self.agent
        status = asdict(agent.status)
        status["connections"] = {
            name: bool(w is not None and w.connected)
            for name, w in (("nb", agent.nb), ("sb", agent.sb), ("ovs", agent.ovs))
        }
        writer = getattr(agent, "writer", None)
        monitor = getattr(agent, "monitor", None)
        status["nb_writer_error"] = writer.last_error if writer is not None else None
        status["monitor_restarts"] = monitor.restarts if monitor is not None else 0
        status["resync_interval"] = agent.conf.statelesslb.resync_interval
        status["version"] = __version__
        status["pid"] = os.getpid()
        now = time.time()
        status["now"] = now
        status["problems"] = health_problems(status, status["resync_interval"], now)
        status["healthy"] = not status["problems"]
        return status

    def _lb_list(self, argv):
        return lb_list_doc(self.agent.snapshot, self.agent.plan)

    def _lb_show(self, argv):
        snapshot, plan = self._snapshot()
        return lb_show_doc(snapshot, plan, self.agent.plan_config, argv[0])

    def _groups(self, argv):
        snapshot, plan = self._snapshot()
        ref = argv[0] if argv else None
        if ref is not None:
            find_lb(snapshot, ref)  # an unknown LB is an error before any ovs-ofctl
        installed, stats = self._read_groups()
        return groups_doc(snapshot, plan, self.agent.plan_config, installed, stats, ref)

    def _read_groups(self) -> tuple[dict[int, InstalledGroup], dict[int, GroupStats]]:
        """Groups and their stats, read so that bucket positions line up.

        dump-group-stats numbers buckets by position; a bundle landing between the
        two dumps could reorder them, so the group list is read again after the
        stats and the pair retried until both dumps agree.
        """
        ofctl = self._ofctl()
        id_min, id_max = self.agent.group_range()
        plan = self.agent.plan   # replaced whole by the agent: read the reference once
        known = set(plan.groups) if plan is not None else set()
        try:
            # Per group (Ofctl.groups): a whole-bridge dump-groups can crash OVS 3.1.
            before = ofctl.groups(id_min, id_max, known)
            for _ in range(GROUP_READ_ATTEMPTS):
                stats = parse_group_stats(ofctl.group_stats())
                after = ofctl.groups(id_min, id_max, known)
                if _bucket_orders(before) == _bucket_orders(after):
                    return after, {gid: s for gid, s in stats.items() if gid in after}
                before = after
        except OfctlError as exc:
            raise ValueError(f"cannot read groups from the bridge: {exc}") from exc
        raise ValueError("groups kept changing while being read; try again")

    def _trace(self, argv):
        snapshot, plan = self._snapshot()
        config = self.agent.plan_config
        req = trace_request(snapshot, plan, config, list(argv))
        bridge = self._bridge()
        text = self._appctl("ofproto/trace-packet-out", bridge, req.flow, req.actions)
        followup = trace_followup(req, text)
        if followup is None:
            return trace_doc(snapshot, config, req, text)
        flow, actions, zone = followup
        more = self._appctl("ofproto/trace-packet-out", bridge, flow, actions)
        return trace_doc(snapshot, config, req, text, more, zone)

    def _plan(self, argv):
        plan = self.agent.plan
        if plan is None:
            return {"flows": [], "groups": []}
        return {
            "flows": [f.add_line() for _, f in sorted(plan.flows.items())],
            "groups": [line for _, g in sorted(plan.groups.items()) for line in g.add_lines()],
        }

    def _resync(self, argv):
        self.agent.request_resync()
        return {"resync": "requested"}

    def _metrics(self, argv):
        snapshot, plan = self._snapshot()
        installed, stats = self._read_groups()
        groups = groups_doc(snapshot, plan, self.agent.plan_config, installed, stats)
        conntrack = conntrack_counts(self._appctl("dpctl/dump-conntrack"))
        healthy = self._status([])["healthy"]
        return {"text": metrics_text(snapshot, plan, groups, conntrack, healthy)}

    # -- ovs-vswitchd ------------------------------------------------------------------
    def _bridge(self) -> str:
        # The bridge the agent programs, chosen by Agent.start before this server starts.
        return checked_piece(self.agent.bridge)

    def _appctl(self, *args: str) -> str:
        conf = self.agent.conf
        binary = conf.ovs.appctl_path or appctl_binary(conf.ovs.ofctl_path)
        argv = [binary, "-t", vswitchd_ctl(conf), *args]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=conf.ovs.ofctl_timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ValueError(f"cannot run {argv[0]}: {exc}") from exc
        if proc.returncode != 0:
            raise ValueError(f"{' '.join(argv[:4])} failed: {proc.stderr.strip()[-2000:]}")
        return proc.stdout


def _bucket_orders(groups: Mapping[int, InstalledGroup]) -> dict[int, list[int]]:
    return {gid: list(g.buckets) for gid, g in groups.items()}


def appctl_binary(ofctl_path: str) -> str:
    """ovs-appctl from the same installation as the configured ovs-ofctl ([ovs]
    appctl_path unset)."""
    head, _ = os.path.split(ofctl_path)
    return os.path.join(head, "ovs-appctl") if head else "ovs-appctl"


def vswitchd_ctl(conf, exists: Callable[[str], bool] = os.path.exists,
                 read: Callable[[str], str] | None = None) -> str:
    """ovs-vswitchd's control socket: [ovs] vswitchd_ctl if set, else
    <ovs_rundir>/ovs-vswitchd.ctl (an explicit --unixctl), else the packaged
    daemon's <ovs_rundir>/ovs-vswitchd.<pid>.ctl."""
    explicit = conf.ovs.vswitchd_ctl
    if explicit:
        return explicit
    rundir = conf.ovs.ovs_rundir
    fixed = os.path.join(rundir, "ovs-vswitchd.ctl")
    if exists(fixed):
        return fixed
    pidfile = os.path.join(rundir, "ovs-vswitchd.pid")
    try:
        text = read(pidfile) if read else _read_text(pidfile)
        pid = int(text.split()[0])
    except (OSError, ValueError, IndexError) as exc:
        raise ValueError(f"cannot find ovs-vswitchd's control socket: no {fixed} and no "
                         f"pid in {pidfile} ({exc}); check [ovs] ovs_rundir") from exc
    return os.path.join(rundir, f"ovs-vswitchd.{pid}.ctl")


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()
