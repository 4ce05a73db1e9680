"""statelesslb-ctl trace - which bucket a gateway picks for a flow, asked of ovs-vswitchd's
ofproto/trace and checked against statelesslb's own prediction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from statelesslb.nb.model import (
    NbLoadBalancer,
    Snapshot,
)
from statelesslb.nb.parse import (
    endpoint_key,
    parse_endpoint,
    parse_ip,
    parse_mac,
    parse_port,
    show,
)
from statelesslb.nb.validate import (
    SUPPORTED_PROTOCOLS,
    LbError,
    ValidLb,
    ValidVip,
    validate_lb,
)
from statelesslb.observe.predict import HASH_IMPLS, FlowTuple, bucket_scores
from statelesslb.observe.reports import (
    ETH_DST_RE,
    backend_details,
    binding_chassis,
    find_lb,
    lb_ids,
    not_gateway_note,
)
from statelesslb.ofstrings import (
    checked_piece,
    dec_int,
    endpoint_text,
    hex_int,
    ip_text,
    mac_text,
)
from statelesslb.plan.lookups import l4_match, usable_binding, usable_datapath_key
from statelesslb.plan.specs import BUCKET_WEIGHT, Plan, PlanConfig

if TYPE_CHECKING:
    pass

# A traced packet needs some source MAC; the intercept flow does not match on it.
TRACE_SRC_MAC = "02:00:00:00:00:01"
TRACE_TTL = 64
# ct_state new|trk, in the numeric form (no '|' in flow text).
CT_NEW_TRACKED = 0x21
_TRACE_TABLE_RE = re.compile(r"^\s*(\d+)\. (.*?)(?:, priority (\d+))?(?:, cookie (0x[0-9a-f]+))?$")
_TRACE_SCORE_RE = re.compile(r"-> bucket (\d+): score (\d+)")
_TRACE_USING_RE = re.compile(r"-> using bucket (\d+)")
_TRACE_TUNNEL_RE = re.compile(r"-> tunneling to (\S+) via")
_TRACE_DP_RE = re.compile(r"^Datapath actions: (.*)$")
# The intercept's first action when a conntrack lookup comes first (affinity layer).
_TRACE_CT_RE = re.compile(r"^\s*ct\(table=(\d+),zone=(\d+)\)$")
_TRACE_RECIRC_RE = re.compile(r"^=+$")


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
        raise ValueError(not_gateway_note(snapshot, lb) + ": run the trace there")
    local = [dgp for dgp in valid.dgps
             if binding_chassis(snapshot, "cr-" + dgp) == snapshot.chassis]
    if not local:
        # A standby holds the groups too, but no traffic of the VIP comes here.
        raise ValueError(not_gateway_note(snapshot, lb) + ": run the trace there")
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
        elif chosen is not None and eth_dst is None and (m := ETH_DST_RE.search(line)):
            eth_dst = m.group(1)
        elif tunnel is None and (m := _TRACE_TUNNEL_RE.search(line)):
            tunnel = m.group(1)
        elif m := _TRACE_DP_RE.match(line):
            datapath_actions = m.group(1)
    return {"first_table": first_table, "scores": scores, "bucket_id": chosen,
            "eth_dst": eth_dst, "tunnel_to": tunnel, "datapath_actions": datapath_actions}


def hash_impl_of(scores: Mapping[int, int], packet: FlowTuple, fields: str) -> str | None:
    """Which OVS hash build printed these scores ("murmur" or "crc32"), None if neither:
    statelesslb.observe.predict recomputes them from the packet and the group's `fields`.

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
    details = backend_details(snapshot, req.valid)
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
