"""The gateway's part of an LB's plan - per VIP a select group whose buckets steer to one
backend each, the intercept flow that sends the VIP to it, and the affinity layer.
"""

from __future__ import annotations

from collections.abc import Mapping

from statelesslb.nb.model import (
    UNHEALTHY,
    SbView,
    Snapshot,
    TableLayout,
)
from statelesslb.nb.parse import parse_endpoint, parse_mac, show
from statelesslb.nb.validate import (
    ValidBackend,
    ValidLb,
    ValidVip,
)
from statelesslb.nb.weights import slot_ids
from statelesslb.ofstrings import (
    dec_int,
    hex_int,
    ip_text,
    mac_text,
    shared_results,
)
from statelesslb.plan.candidate import Candidate, StoredIds
from statelesslb.plan.lookups import backend_health, l4_match, usable_binding, usable_datapath_key
from statelesslb.plan.specs import (
    MAX_TABLE,
    ROLE_GATEWAY,
    ROLE_STANDBY,
    FlowSpec,
    GroupSpec,
    PlanConfig,
)


def plan_gateway(
    valid: ValidLb, ids: StoredIds, snapshot: Snapshot, config: PlanConfig, out: Candidate
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
    looked_up: set[str] = set()   # the backends of an LB mostly share one router port
    for vip in valid.vips:
        for backend in vip.backends:
            name = backend.router_port_name
            if name in looked_up:
                continue
            looked_up.add(name)
            binding = usable_binding(sb, name)
            if binding is not None and binding.datapath_key == router_dp:
                rp_keys[name] = binding.tunnel_key
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
    valid: ValidLb, vip: ValidVip, ids: StoredIds, sb: SbView
) -> list[tuple[int, ValidBackend]]:
    """(bucket id, backend) of the VIP's gateway group.

    From the NB writer's `active` set when there is one: it changes only after the
    backends' chassis had a second to install the set before it, so gateways never
    steer a flow somewhere before the second chance for it exists. Without second
    chance (no `active` set), or before the writer's first pass, from the VIP's
    backends that have ids, less the drained ones.
    """
    active = ids.active.get(vip.key)
    if active is None:
        members = [(ids.bucket_ids[b.key], b) for b in vip.backends
                   if b.key not in ids.drained and b.key in ids.bucket_ids]
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
    valid: ValidLb, vip: ValidVip, ids: StoredIds, router_dp: int, group: GroupSpec,
    rp_keys: Mapping[str, int], members: list[tuple[int, ValidBackend]],
    tables: TableLayout, config: PlanConfig, out: Candidate,
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
              if b.key in ids.bucket_ids
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


@shared_results
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
