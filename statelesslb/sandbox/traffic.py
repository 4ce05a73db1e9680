"""Stateless-LB helpers on top of the sandbox: create LBs, send flows, see where they went.

Shared by the tests, the demo and the benchmarks, so they all measure the same way.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass

from statelesslb.nb.model import EXT_ACTIVE, EXT_BUCKETS, EXT_DRAIN, EXT_STATUS, EXT_VIP_IDS
from statelesslb.openflow.ofctl import InstalledGroup, Ofctl, parse_groups
from statelesslb.plan.specs import our_cookies
from statelesslb.sandbox import packets as P
from statelesslb.sandbox.chassis import Chassis
from statelesslb.sandbox.core import EXTERNAL_BRIDGE, Sandbox
from statelesslb.sandbox.ovsread import cross_check, read_groups
from statelesslb.sandbox.processes import parse_ctl_json, wait_until
from statelesslb.sandbox.topology import Topology, Vm

COOKIE_PREFIX = 0x51B0
GROUP_BASE = 0x70000000
OUR_COOKIES = our_cookies(COOKIE_PREFIX)
_STATS_RE = re.compile(r"(duration|n_packets|n_bytes|idle_age|hard_age)=[^,\s]*,?\s*")


def create_lb(sb: Sandbox, name: str, vip: str, backends: list[str], proto: str = "tcp",
              router: str = "lr0", stateless: bool = True) -> None:
    sb.nbctl("lb-add", name, vip, ",".join(backends), proto)
    sb.nbctl("lr-lb-add", router, name)
    if stateless:
        sb.nbctl("set", "load_balancer", name, "options:stateless_mode=mac")


def lb_external_ids(sb: Sandbox, name: str) -> dict[str, str]:
    out = sb.nbctl("--format=json", "--columns=external_ids", "find", "load_balancer",
                   f"name={name}")
    rows = parse_ctl_json(out)
    return rows[0]["external_ids"] if rows else {}


def lb_status(sb: Sandbox, name: str) -> str | None:
    return lb_external_ids(sb, name).get(EXT_STATUS)


def lb_ids(sb: Sandbox, name: str) -> tuple[dict[str, int], dict[str, int]]:
    ext = lb_external_ids(sb, name)
    # Plain json, not the product's reader (nb.stored.stored_ids): the tests read
    # the NB on their own, so that a bug in that reader cannot cancel out.
    return json.loads(ext.get(EXT_VIP_IDS, "{}")), json.loads(ext.get(EXT_BUCKETS, "{}"))


def groups_in_force(sb: Sandbox) -> dict[str, dict[int, set[int]]]:
    """{LB name: {gateway group id: bucket ids}} the gateways must hold, read from the NB:
    the NB writer's active set with second chance, else the VIP's listed backends that
    have ids; drained ones left out either way. Plain json, as in lb_ids."""
    rows = parse_ctl_json(sb.nbctl("--format=json", "--columns=name,vips,external_ids",
                                   "list", "load_balancer"))
    out: dict[str, dict[int, set[int]]] = {}
    for row in rows:
        ext = row["external_ids"]
        vip_ids = json.loads(ext.get(EXT_VIP_IDS, "{}"))
        if EXT_ACTIVE in ext:
            sets = {vip: {entry[0] for entry in backends.values()}
                    for vip, backends in json.loads(ext[EXT_ACTIVE]).items()}
        else:
            buckets = json.loads(ext.get(EXT_BUCKETS, "{}"))
            drained = set(json.loads(ext.get(EXT_DRAIN, "[]")))
            sets = {vip: {buckets[b] for b in listed.split(",")
                          if b in buckets and b not in drained}
                    for vip, listed in row["vips"].items()}
        out[row["name"]] = {GROUP_BASE + vip_ids[vip]: ids for vip, ids in sets.items()
                            if vip in vip_ids}
    return out


def our_flows(chassis: Chassis) -> list[str]:
    out = chassis.ofctl("dump-flows", OUR_COOKIES, "--no-stats")
    return [line.strip() for line in out.splitlines() if "cookie=" in line]


def installed_fields(chassis: Chassis, group_id: int) -> str:
    """The `fields(...)` the installed group hashes, as the switch reports it."""
    header = our_groups(chassis, previous=True, known=(group_id,))[group_id].header
    return header.split("selection_method=hash,", 1)[1]


def our_groups(chassis: Chassis, previous: bool = False,
               known: tuple[int, ...] = ()) -> dict[int, InstalledGroup]:
    """Our gateway groups (with previous=True also the second-chance groups).

    Read as the agent reads them (one dump per group, the ids group stats list and
    `known`, parsed by openflow.parse_groups), and each dump read again independently
    (ovsread: ovs.flow's decoder): the two readings must agree, so a parser bug cannot
    cancel out between the agent and the checks.
    """
    top = GROUP_BASE + (0x1FFFFFFF if previous else 0x0FFFFFFF)
    ofctl = Ofctl(chassis.br_int, chassis.sandbox.bin["ovs-ofctl"])
    out: dict[int, InstalledGroup] = {}
    for gid, dump in ofctl.group_dumps(GROUP_BASE, top, known).items():
        product = parse_groups(dump, GROUP_BASE, top)
        independent = read_groups(dump)
        # An empty dump (a group gone meanwhile, or one above 64 KiB: OVS 3.1 sends
        # nothing) reads as no group both ways.
        assert product.keys() == independent.keys() <= {gid}, (gid, dump)
        for read in product:
            cross_check(product[read], independent[read])
        out.update(product)
    return out


def ovn_state(chassis: Chassis) -> tuple[frozenset[str], frozenset[str]]:
    """ovn-controller's flows (without counters) and groups: everything that is not ours."""
    flows = set()
    for line in chassis.ofctl("dump-flows", "--no-stats").splitlines():
        m = re.search(r"cookie=(0x[0-9a-f]+)", line)
        if m and int(m.group(1), 16) >> 48 == COOKIE_PREFIX:
            continue
        if "actions=" in line:
            flows.add(_STATS_RE.sub("", line.strip()))
    groups = set()
    for gid, text in _group_lines(chassis.dump_groups()):
        if not GROUP_BASE <= gid <= GROUP_BASE + 0x0FFFFFFF:
            groups.add(text)
    return frozenset(flows), frozenset(groups)


def _group_lines(dump: str):
    for line in dump.splitlines():
        m = re.match(r"\s*group_id=(\d+),", line)
        if m:
            yield int(m.group(1)), line.strip()


def wait_group(chassis: Chassis, group_id: int, bucket_ids: set[int],
               timeout: float = 10.0) -> InstalledGroup:
    def ready():
        group = our_groups(chassis, known=(group_id,)).get(group_id)
        return group if group is not None and set(group.buckets) == bucket_ids else None
    return wait_until(ready, timeout, 0.02, f"group {group_id:#x} with buckets {bucket_ids} "
                      f"on {chassis.name}")


def wait_lb_ready(sb: Sandbox, name: str, vip: str, n_backends: int,
                  gateway: str = "gw1", timeout: float = 20.0,
                  topo: Topology | None = None) -> int:
    """Wait for the NB ids, the gateway group and (with topo) every backend's DNAT flow.

    Returns the group id. Agents work independently: the gateway may steer to a
    new backend a few milliseconds before that backend's chassis DNATs for it.
    """
    def ids_ready():
        vip_ids, buckets = lb_ids(sb, name)
        return vip_ids.get(vip) and len(buckets) >= n_backends and (vip_ids, buckets)
    vip_ids, buckets = wait_until(ids_ready, timeout, 0.05, f"bucket ids for {name}")
    gid = GROUP_BASE + vip_ids[vip]
    def group_ready():
        group = our_groups(sb.chassis[gateway], known=(gid,)).get(gid)
        return group is not None and len(group.buckets) == n_backends
    wait_until(group_ready, timeout, 0.02, f"group of {name} on {gateway}")
    if topo is not None:
        vip_ip, vip_port = vip.rsplit(":", 1)
        for backend in buckets:
            vm = topo.vm_by_ip(backend.rsplit(":", 1)[0])
            chassis = sb.chassis[vm.chassis]
            wanted = f"nw_dst={vip_ip},tp_dst={vip_port} actions=ct("
            wait_until(lambda c=chassis, w=wanted, b=backend: (
                flows := our_flows(c)) and any(w in f for f in flows) and any(
                f"nat(dst={b})" in f for f in flows),
                timeout, 0.02, f"DNAT flow for {backend} on {chassis.name}")
    return gid


def set_backends(sb: Sandbox, topo: Topology, name: str, vip: str, backends: list[str],
                 gateway: str = "gw1", timeout: float = 15.0) -> int:
    """Set the backends of `vip` (IP:port) and wait until the change is in place.

    That is: NB ids for every backend, the gateway's group holding exactly their
    buckets, then wait_lb_ready (with every backend's DNAT flow). Returns the group id.
    """
    sb.nbctl("set", "load_balancer", name, f'vips:"{vip}"="{",".join(backends)}"')

    def ids_ready():
        vip_ids, ids = lb_ids(sb, name)
        return vip in vip_ids and ids.keys() >= set(backends) and (vip_ids, ids)
    vip_ids, ids = wait_until(ids_ready, timeout, 0.05, f"bucket ids of {name} for {backends}")
    gid = GROUP_BASE + vip_ids[vip]
    wait_group(sb.chassis[gateway], gid, {ids[b] for b in backends}, timeout)
    return wait_lb_ready(sb, name, vip, len(backends), gateway=gateway, topo=topo)


@dataclass
class Arrival:
    vm: Vm
    packet: object


def find_arrival(sb: Sandbox, topo: Topology, src_ip: str, sport: int,
                 proto: str = "tcp", timeout: float = 3.0) -> Arrival | None:
    """Poll every VM port's capture for the packet of this client flow."""
    def look():
        for vm in topo.vms:
            for pkt in sb.chassis[vm.chassis].sent(vm.name):
                ip, l4 = P.ip(pkt), P.l4(pkt)
                if ip is None or l4 is None or ip.src != src_ip:
                    continue
                if l4.sport == sport and l4.name.lower() == proto:
                    return Arrival(vm, pkt)
        return None
    try:
        return wait_until(look, timeout, 0.02, f"{proto} from {src_ip}:{sport} at a VM")
    except TimeoutError:
        return None


def send_syn(sb: Sandbox, topo: Topology, vip: str, sport: int, dport: int = 80,
             src_ip: str | None = None) -> None:
    sb.client_inject(P.tcp_syn(topo.client_mac, topo.dgp_mac, src_ip or topo.client_ip,
                               vip, sport, dport))


def conntrack_lines(chassis: Chassis, needle: str) -> list[str]:
    return [line for line in chassis.conntrack().splitlines() if needle in line]


@dataclass(frozen=True)
class Conn:
    """One client TCP connection through the LB: who opened it, and where it landed."""

    src_ip: str
    sport: int
    vm: str


def _vm_offsets(sb: Sandbox, topo: Topology) -> dict[str, int]:
    return {vm.name: len(sb.chassis[vm.chassis].sent(vm.name)) for vm in topo.vms}


def _new_at_vms(sb: Sandbox, topo: Topology, offsets: dict[str, int]):
    for vm in topo.vms:
        for pkt in sb.chassis[vm.chassis].sent(vm.name)[offsets.get(vm.name, 0):]:
            yield vm, pkt


def open_connections(sb: Sandbox, topo: Topology, vip: str, sports: range,
                     dgp_mac: str | None = None, src_ip: str | None = None,
                     dport: int = 80, settle: float = 3.0) -> list[Conn]:
    """Full handshakes: SYN through a gateway, SYN-ACK from the chosen VM, ACK.

    Returns the connections whose SYN reached a VM, with that VM.
    """
    mac = dgp_mac or topo.dgp_mac
    src = src_ip or topo.client_ip
    offsets = _vm_offsets(sb, topo)
    for sport in sports:
        sb.client_inject(P.tcp_syn(topo.client_mac, mac, src, vip, sport, dport))
    wanted = set(sports)
    # sport -> (VM its SYN reached, the port it arrived for: the backend's after DNAT)
    owner: dict[int, tuple[Vm, int]] = {}

    def landed():
        for vm, pkt in _new_at_vms(sb, topo, offsets):
            ip, l4 = P.ip(pkt), P.l4(pkt)
            if (P.is_tcp(pkt, "S") and ip.src == src and l4.sport in wanted):
                owner.setdefault(l4.sport, (vm, l4.dport))
        return len(owner) == len(wanted)
    try:
        wait_until(landed, settle, 0.05, "every SYN at a VM")
    except TimeoutError:
        print(_why_not_landed(sb, sorted(wanted - set(owner)), len(wanted)), file=sys.stderr)
    conns = []
    for sport, (vm, backend_port) in sorted(owner.items()):
        sb.chassis[vm.chassis].inject(vm.name, P.tcp_synack(
            vm.mac, topo.gateway_mac(vm), vm.ip, src, backend_port, sport))
        sb.client_inject(P.tcp_ack(topo.client_mac, mac, src, vip, sport, dport))
        conns.append(Conn(src, sport, vm.name))
    return conns


def _why_not_landed(sb: Sandbox, missing: list[int], wanted: int) -> str:
    """What a test failure needs when SYNs did not reach a VM: where each gateway port
    lives, BFD, and where the external segment believes the router MACs are."""
    lines = [f"open_connections: {len(missing)} of {wanted} SYNs reached no VM "
             f"(source ports {missing[:8]}{'...' if len(missing) > 8 else ''})"]
    try:
        names = {r["_uuid"]: r["name"] for r in sb.sb_rows("Chassis", columns=["_uuid", "name"])}
        for pb in sb.sb_rows("Port_Binding", "type=chassisredirect",
                             columns=["logical_port", "chassis"]):
            lines.append(f"  {pb['logical_port']} on {names.get(pb['chassis'], pb['chassis'])}")
        for gw in sb.gateway_chassis:
            lines.append(f"  {gw.name}: BFD up {gw.bfd_up()}")
        lines.append("  external segment fdb:\n" + sb.net_appctl("fdb/show", EXTERNAL_BRIDGE))
    except Exception as exc:  # a diagnostic must not hide the failure it explains
        lines.append(f"  (diagnostics failed: {exc})")
    return "\n".join(lines)


def midstream(sb: Sandbox, topo: Topology, vip: str, conns: list[Conn], tag: bytes,
              dgp_mac: str | None = None, dport: int = 80,
              settle: float = 1.5) -> dict[tuple[str, int], list[str]]:
    """One data packet on every connection; where each arrived (VM names, in order).

    A connection is intact when its packet reached exactly its own VM.
    """
    mac = dgp_mac or topo.dgp_mac
    offsets = _vm_offsets(sb, topo)
    for c in conns:
        sb.client_inject(P.tcp_ack(topo.client_mac, mac, c.src_ip, vip, c.sport, dport,
                                   payload=tag))
    seen: dict[tuple[str, int], list[str]] = {(c.src_ip, c.sport): [] for c in conns}

    def collect():
        for key in seen:
            seen[key] = []
        for vm, pkt in _new_at_vms(sb, topo, offsets):
            ip, l4 = P.ip(pkt), P.l4(pkt)
            if ip is None or l4 is None or not bytes(l4.payload).startswith(tag):
                continue
            key = (ip.src, l4.sport)
            if key in seen:
                seen[key].append(vm.name)
        return all(seen.values())
    try:
        wait_until(collect, settle, 0.05, "mid-stream packets at the VMs")
    except TimeoutError:
        collect()
    return seen


def broken(conns: list[Conn], arrivals: dict[tuple[str, int], list[str]]) -> list[Conn]:
    return [c for c in conns if arrivals.get((c.src_ip, c.sport)) != [c.vm]]


def reply_from(sb: Sandbox, topo: Topology, arrival: Arrival, sport: int,
               backend_port: int = 8080, timeout: float = 3.0):
    """The VM answers the SYN that arrived with a SYN-ACK; returns it as the client got it."""
    seen = len(sb.client_received())
    vm = arrival.vm
    sb.chassis[vm.chassis].inject(vm.name, P.tcp_synack(
        vm.mac, topo.gateway_mac(vm), vm.ip, topo.client_ip, backend_port, sport))

    def received():
        for pkt in sb.client_received()[seen:]:
            if P.is_tcp(pkt, "SA", dport=sport):
                return pkt
        return None
    return wait_until(received, timeout, 0.02, "the SYN-ACK at the client")
