"""What the control socket answers, computed from the agent's snapshot and plan and what
the bridge holds - pure, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from statelesslb.nb.model import (
    EXT_DRAIN,
    EXT_PREVIOUS,
    EXT_STATUS,
    MODE_OPTION,
    PERSISTENCE_OPTION,
    RETURN_OPTION,
    NbLoadBalancer,
    Snapshot,
)
from statelesslb.nb.parse import (
    is_marked,
    parse_endpoint,
    show,
    vip_backend_keys,
)
from statelesslb.nb.stored import parse_drain, parse_previous, stored_ids
from statelesslb.nb.validate import (
    DEFAULT_PERSISTENCE,
    LbError,
    ValidLb,
    validate_lb,
)
from statelesslb.nb.weights import SLOT_BASE, base_id
from statelesslb.observe.metrics import (
    AGENT_HEALTHY,
    BACKEND_CONNTRACK,
    BUCKET_BYTES,
    BUCKET_PACKETS,
    LB_STATE,
    Metric,
    render,
)
from statelesslb.ofstrings import (
    ip_text,
)
from statelesslb.openflow.diff import in_sync
from statelesslb.openflow.ofctl import InstalledGroup
from statelesslb.plan.lookups import backend_health
from statelesslb.plan.specs import ROLE_BACKEND, Plan, PlanConfig

if TYPE_CHECKING:
    pass
# A full sync older than this many resync intervals makes `status` unhealthy.
STALE_SYNC_FACTOR = 3

_STATS_GROUP_RE = re.compile(
    r"group_id=(\d+),.*?\bpacket_count=(\d+),byte_count=(\d+)")
_STATS_BUCKET_RE = re.compile(r"\bbucket(\d+):packet_count=(\d+),byte_count=(\d+)")
ETH_DST_RE = re.compile(r"set_field:([0-9a-f:]{17})->eth_dst")

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
    vip_ids, bucket_ids = stored_ids(lb.external_ids)
    return LbIds(vip_ids or {}, bucket_ids or {}, parse_drain(lb.external_ids.get(EXT_DRAIN)))


def binding_chassis(snapshot: Snapshot, logical_port: str) -> str | None:
    binding = snapshot.sb.port_bindings.get(logical_port)
    return binding.chassis if binding is not None else None


def _valid(snapshot: Snapshot, lb: NbLoadBalancer) -> ValidLb | None:
    valid = validate_lb(lb, snapshot.nb)
    return None if isinstance(valid, LbError) else valid


def backend_details(snapshot: Snapshot, valid: ValidLb | None) -> dict[str, dict[str, Any]]:
    """Backend key -> MAC, logical port and the chassis the SB binds that port to."""
    details: dict[str, dict[str, Any]] = {}
    for vip in valid.vips if valid else ():
        for backend in vip.backends:
            details[backend.key] = {
                "mac": backend.mac,
                "logical_port": backend.lsp_name,
                "chassis": binding_chassis(snapshot, backend.lsp_name),
            }
    return details


def _gateway_ports(snapshot: Snapshot, valid: ValidLb | None) -> list[dict[str, Any]]:
    ports = []
    for dgp in valid.dgps if valid else ():
        chassis = binding_chassis(snapshot, "cr-" + dgp)
        ports.append({"name": dgp, "chassis": chassis, "here": chassis == snapshot.chassis})
    return ports


def not_gateway_note(snapshot: Snapshot, lb: NbLoadBalancer) -> str:
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
        entry["return"] = lb.options.get(RETURN_OPTION, "gateway") if lb else None
        entry["vips"] = [key for key, _ in vip_backend_keys(lb.vips)] if lb else []
        entries.append(entry)
    return entries


def lb_show_doc(snapshot: Snapshot, plan: Plan | None, config: PlanConfig,
                ref: str) -> dict[str, Any]:
    lb = find_lb(snapshot, ref, marked=False)
    valid = _valid(snapshot, lb) if is_marked(lb) else None
    ids = lb_ids(lb)
    details = backend_details(snapshot, valid)
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
                               backend_details(snapshot, _valid(snapshot, lb)))
        backend_of, details = per_lb[lb.uuid] if lb is not None else ({}, {})
        counters = stats.get(group_id, GroupStats(0, 0, ()))
        buckets = []
        for position, (bucket_id, body) in enumerate(group.buckets.items()):
            backend = backend_of.get(bucket_id)
            mac = ETH_DST_RE.search(body)
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
        synced = planned is not None and in_sync(planned, group)
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
            "in_sync": synced,
            "drained": drained,
            "buckets": buckets,
        })
    notes = []
    if lb_filter is not None and not any(g["kind"] == GROUP_GATEWAY for g in groups):
        notes.append(not_gateway_note(snapshot, lb_filter))
    elif lb_filter is not None and not any(
            p["here"] for p in _gateway_ports(snapshot, _valid(snapshot, lb_filter))):
        notes.append(not_gateway_note(snapshot, lb_filter)
                     + ": standby, its groups are ready for a failover")
    return {"chassis": snapshot.chassis, "lb": lb_filter.name if lb_filter else None,
            "groups": groups, "notes": notes}


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
    if status.get("uplink_error"):
        problems.append("direct-return uplinks not set up (replies go through the gateway): "
                        f"{status['uplink_error']}")
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
