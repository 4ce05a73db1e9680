"""The backend chassis' part of an LB's plan - DNAT of VIP-port to the local backend and
commit, un-DNAT of its replies (only those of connections a stateless VIP opened: the
ownership record), and the second chance for connections that moved.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from statelesslb.nb.model import (
    SbView,
    Snapshot,
    TableLayout,
)
from statelesslb.nb.parse import parse_endpoint, parse_mac, show
from statelesslb.nb.validate import (
    ValidLb,
    ValidVip,
)
from statelesslb.nb.weights import slot_ids
from statelesslb.ofstrings import (
    IpAddress,
    dec_int,
    endpoint_text,
    hex_int,
    ip_text,
    mac_text,
    shared_results,
)
from statelesslb.plan.candidate import Candidate, StoredIds
from statelesslb.plan.lookups import l4_match, usable_binding, usable_datapath_key
from statelesslb.plan.specs import (
    MAX_TABLE,
    OTHER_PATH_MARK,
    ROLE_BACKEND,
    FlowSpec,
    GroupSpec,
    PlanConfig,
)

# The logical port's own conntrack zone, which ovn-controller keeps in reg13.
PORT_ZONE = "zone=NXM_NX_REG13[0..15]"


@dataclass(frozen=True, slots=True)
class _LocalBackend:
    """A backend whose VIF is bound on this chassis, with its SB keys."""

    ip: IpAddress
    port: int
    key: str
    mac: str
    port_key: int
    switch_dp: int
    router_port_mac: str


def plan_backends(
    valid: ValidLb, ids: StoredIds, snapshot: Snapshot, config: PlanConfig, out: Candidate
) -> None:
    sb, tables = snapshot.sb, snapshot.tables
    # Switch datapath key -> its router port's MAC, from every VIP's backends first:
    # a backend only in a previous set may sit on a switch another VIP uses.
    router_macs: dict[int, str] = {}
    # Each switch's key looked up once: an LB's backends mostly share one or two.
    switch_dps: dict[str, int | None] = {}
    for vip in valid.vips:
        for backend in vip.backends:
            if backend.switch_uuid not in switch_dps:
                switch_dps[backend.switch_uuid] = usable_datapath_key(sb, backend.switch_uuid)
            switch_dp = switch_dps[backend.switch_uuid]
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
            switch_dp = switch_dps[backend.switch_uuid]
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
        if local and valid.direct_return:
            _direct_return(valid, vip, snapshot, config, out)


def _direct_return(
    valid: ValidLb, vip: ValidVip, snapshot: Snapshot, config: PlanConfig, out: Candidate
) -> None:
    """The VIP's replies, un-DNATed here, leave this chassis for the external network
    instead of going through the gateway that holds the DGP.

    In the router's gateway-redirect stage, where OVN would send them to the gateway,
    a packet from VIP:port bound for a DGP can only be a reply our un-DNAT made
    (ovn-northd un-DNATs native LBs on the gateway). Routing is done by then (next
    hop's MAC, TTL): it leaves by the agent's patch to the DGP network's bridge
    (statelesslb.agent.uplinks), with this chassis' MAC as source (the gateway
    announces the DGP's MAC on that network; seen here too, it would pull the gateway's
    traffic here), and the localnet port's VLAN. OVN itself keeps the DGP's switch off
    a hypervisor while the router has no distributed NAT, so its localnet port is not
    there to use. A next hop not resolved yet (zero MAC) goes to the gateway as before,
    which resolves it. Without an uplink the replies go through the gateway, and the
    status says why.
    """
    tables, sb = snapshot.tables, snapshot.sb
    if tables.lr_in_gw_redirect is None or tables.lr_in_gw_redirect_next is None:
        out.notes.append("replies through the gateway: no gateway-redirect stage found")
        return
    router_dp = usable_datapath_key(sb, valid.router_uuid)
    if router_dp is None:
        out.pending.append(f"no SB datapath for router {show(valid.router_name)} yet")
        return
    l4, ip_prefix = l4_match(valid.protocol, vip.ip)
    for dgp, networks in valid.dgp_networks:
        usable = [(n, tag, snapshot.local.uplink(n)) for n, tag in networks]
        usable = [(n, tag, up) for n, tag, up in usable if up is not None]
        if not usable:
            out.notes.append(
                f"replies to {show(dgp)} through the gateway: no bridge mapping with a "
                f"chassis MAC (ovn-chassis-mac-mappings) here for "
                f"{'/'.join(show(n) for n, _ in networks)}")
            continue
        binding = usable_binding(sb, dgp)
        redirect = usable_binding(sb, "cr-" + dgp)
        if (binding is None or binding.datapath_key != router_dp or redirect is None
                or redirect.datapath_key != router_dp):
            out.pending.append(f"no usable SB port binding for gateway port {show(dgp)} yet")
            continue
        _network, tag, (chassis_mac, ofport) = usable[0]
        match = (f"{l4},metadata={hex_int(router_dp)},reg15={hex_int(binding.tunnel_key)},"
                 f"{ip_prefix}_src={ip_text(vip.ip)},tp_src={dec_int(vip.port, 0xFFFF)}")
        vlan = (f"push_vlan:0x8100,set_field:{dec_int(0x1000 | tag, 0x1FFF)}->vlan_vid,"
                if tag else "")
        out.add_flow(FlowSpec(
            tables.lr_in_gw_redirect, config.backend_priority, match,
            f"set_field:{mac_text(chassis_mac)}->eth_src,{vlan}"
            f"output:{dec_int(ofport, 0xFEFF)}", config.cookie_prefix), vip.key)
        # OVN's own redirect, for a next hop it has not resolved yet.
        out.add_flow(FlowSpec(
            tables.lr_in_gw_redirect, config.backend_priority + 1,
            f"{match},dl_dst=00:00:00:00:00:00",
            f"set_field:{hex_int(redirect.tunnel_key)}->reg15,"
            f"resubmit(,{dec_int(tables.lr_in_gw_redirect_next, MAX_TABLE)})",
            config.cookie_prefix), vip.key)


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
    valid: ValidLb, vip: ValidVip, previous: Mapping[str, tuple[int, str, str]], ids: StoredIds,
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
    prev_group: GroupSpec | None, tables: TableLayout, config: PlanConfig, out: Candidate,
) -> None:
    l4, ip_prefix = l4_match(valid.protocol, vip.ip)
    port_key, dp_key = hex_int(b.port_key), hex_int(b.switch_dp)
    zone = PORT_ZONE
    vip_part = f"{ip_prefix}_dst={ip_text(vip.ip)},tp_dst={dec_int(vip.port, 0xFFFF)}"
    forward = dec_int(config.backend_forward_table, MAX_TABLE)
    # Every stateless DNAT goes on to the ownership record (backend forward table).
    dnat = (f"ct(commit,table={forward},{zone},"
            f"nat(dst={endpoint_text(b.ip, b.port)}))")
    rp_mac = mac_text(b.router_port_mac)
    here = f"{l4},reg15={port_key},metadata={dp_key}"
    for flow in _ownership_flows(valid.protocol, l4, ip_prefix, b, tables, config):
        out.add_flow(flow, vip.key)
    if not second_chance:
        out.add_flow(FlowSpec(tables.ls_out_intercept, config.backend_priority,
                              f"{here},{vip_part}", dnat, config.cookie_prefix), vip.key)
        return
    decide = config.backend_decide_table
    flows = [
        # Look the packet up (un-committed); an existing entry also applies its DNAT.
        FlowSpec(tables.ls_out_intercept, config.backend_priority, f"{here},{vip_part}",
                 f"ct(table={dec_int(decide, MAX_TABLE)},{zone},nat)", config.cookie_prefix),
        # Known connection (already DNATed by the lookup): on to the next stage, through
        # the ownership record.
        FlowSpec(decide, 300, f"ct_state=-new-inv+trk,{here}",
                 f"set_field:{rp_mac}->eth_src,resubmit(,{forward})", config.cookie_prefix),
        # An entry without a reply yet is still ct.new, but the lookup found it and
        # DNATed the packet: the destination says so.
        FlowSpec(decide, 250,
                 f"ct_state=+trk,{here},{ip_prefix}_dst={ip_text(b.ip)},"
                 f"tp_dst={dec_int(b.port, 0xFFFF)}",
                 f"set_field:{rp_mac}->eth_src,resubmit(,{forward})", config.cookie_prefix),
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


@shared_results
def _ownership_flows(
    protocol: str, l4: str, ip_prefix: str, b: _LocalBackend, tables: TableLayout,
    config: PlanConfig,
) -> tuple[FlowSpec, ...]:
    """The backend's replies are un-DNATed only if a stateless VIP opened their connection.

    The port's zone (reg13) cannot tell: a stateless connection's closed entry there
    (TIME_WAIT) has exactly the reply tuple of a later connection from the same client
    ip:port that reached the backend another way (OVN's native LB, or the backend's own
    address), and un-DNATing that reply breaks it (docs/real-tcp.md, "shared backends").
    So every connection to backend ip:port, whatever its path, is also tracked in
    `backend_zone`, a zone of our own, by its tuple as the backend sees it (client ->
    backend ip:port); the last SYN (for UDP, the last packet) writes which path it took
    into OTHER_PATH_MARK. A SYN on a closed entry re-creates it, so the mark follows the
    4-tuple's current owner. A reply looks itself up there first: marked, it goes on
    untouched; unmarked or unknown (a connection older than these flows), it is
    un-DNATed as before. The mark decides whatever the TCP state says: a SYN can reach
    the backend before conntrack has seen the previous connection on the tuple close
    (checked on OVS 3.5), and its SYN-ACK is then `+inv` there, without `+rpl`, but
    still carries the entry's mark.

    Other paths are caught in the first egress table with `ct_state=-trk` (a packet
    that crossed a tunnel or a router hop arrives untracked) and sent back to the same
    table after the lookup, tracked, so that OVN's own flows there take it: nothing of
    OVN's pipeline is skipped. A packet that arrives tracked (a client on the same
    chassis behind a switch with stateful ACLs) is not recorded and keeps the old
    behaviour.
    """
    own = f"zone={dec_int(config.backend_zone, 0xFFFF)}"
    mark = hex_int(OTHER_PATH_MARK)
    port_key, dp_key = hex_int(b.port_key), hex_int(b.switch_dp)
    to_backend = (f"{l4},reg15={port_key},metadata={dp_key},"
                  f"{ip_prefix}_dst={ip_text(b.ip)},tp_dst={dec_int(b.port, 0xFFFF)}")
    from_backend = (f"{l4},reg14={port_key},metadata={dp_key},"
                    f"{ip_prefix}_src={ip_text(b.ip)},tp_src={dec_int(b.port, 0xFFFF)}")
    first_egress = dec_int(tables.ls_out_intercept, MAX_TABLE)
    out_next = dec_int(tables.ls_out_next, MAX_TABLE)
    in_next = dec_int(tables.ls_in_next, MAX_TABLE)
    forward, reply = config.backend_forward_table, config.backend_reply_table
    prio, cookie = config.backend_priority, config.cookie_prefix
    stateless_commit = f"ct(commit,{own},exec(set_field:0/{mark}->ct_mark))"
    other_commit = (f"ct(commit,table={first_egress},{own},"
                    f"exec(set_field:{mark}/{mark}->ct_mark))")
    flows = [
        # Replies: look up the record; the other path's connections go on untouched,
        # everything else is un-DNATed in the port's zone.
        FlowSpec(tables.ls_in_intercept, prio, from_backend,
                 f"ct(table={dec_int(reply, MAX_TABLE)},{own})", cookie),
        FlowSpec(reply, 200, f"ct_state=+trk,ct_mark={mark}/{mark},{from_backend}",
                 f"resubmit(,{in_next})", cookie),
        FlowSpec(reply, 100, from_backend,
                 f"ct(table={in_next},{PORT_ZONE},nat)", cookie),
    ]
    if protocol == "tcp":
        syn = "tcp_flags=+syn-ack"
        flows += [
            # Stateless, after the DNAT: a SYN claims the 4-tuple, the rest keeps the
            # record's TCP state in step.
            FlowSpec(forward, 200, f"{to_backend},{syn}",
                     f"{stateless_commit},resubmit(,{out_next})", cookie),
            FlowSpec(forward, 100, to_backend, f"ct({own}),resubmit(,{out_next})", cookie),
            # Any other path, untracked: the same, then back to the first egress table.
            FlowSpec(tables.ls_out_intercept, prio + 1, f"ct_state=-trk,{to_backend},{syn}",
                     other_commit, cookie),
            FlowSpec(tables.ls_out_intercept, prio, f"ct_state=-trk,{to_backend}",
                     f"ct(table={first_egress},{own})", cookie),
        ]
    else:
        # No SYN to go by: every packet claims the tuple for its path.
        flows += [
            FlowSpec(forward, 100, to_backend,
                     f"{stateless_commit},resubmit(,{out_next})", cookie),
            FlowSpec(tables.ls_out_intercept, prio, f"ct_state=-trk,{to_backend}",
                     other_commit, cookie),
        ]
    # The same objects for every VIP and LB the backend serves (shared_results).
    return tuple(flows)
