"""Issue 4: which connections survive which change, per persistence layer and for
OVN's native load balancer, side by side in one real sandbox.

For every change, each LB (one per layer, same 3 backends, its own VIP) gets N
fresh connections (SYN through a gateway, SYN-ACK injected at the backend port,
ACK), then the change is made, then one mid-stream data packet is sent on every
connection. A connection is broken when that packet does not reach, exactly
once, the backend it was opened on. Then the change is undone.

Then, per layer, the cost on the gateway of 1,000 connections: its conntrack
entries and its datapath flows.

    .venv/bin/python bench/persistence.py [--conns 100] [--cost 1000]
"""

from __future__ import annotations

import argparse
import re
import time

from common import running_sandbox

from statelesslb.nb.model import EXT_BUCKETS, EXT_DRAIN, EXT_VIP_IDS
from statelesslb.nb.stored import parse_drain, parse_id_map
from statelesslb.sandbox import Sandbox
from statelesslb.sandbox import packets as P
from statelesslb.sandbox.core import CLIENT_PORT
from statelesslb.sandbox.processes import wait_until
from statelesslb.sandbox.topology import add_second_dgp, wait_bound
from statelesslb.sandbox.traffic import (
    GROUP_BASE,
    conntrack_lines,
    lb_external_ids,
    our_groups,
)

THREE = ["10.0.0.11:8080", "10.0.0.12:8080", "10.0.0.13:8080"]
LAYERS = [  # name, options:stateless_persistence (None: OVN's native LB; "native:K=V":
            # OVN's native LB with options:K=V, see bench/ovn25_compare.py)
    ("native", None),
    ("hash", "hash"),
    ("affinity", "affinity"),
    ("second-chance", "second-chance"),
    ("affinity+2nd", "affinity,second-chance"),
]
# One packet per netdev-dummy/receive: with several packets per call, OVS 3.1's
# userspace datapath lost most of a burst that went through OVN's ct_lb_mark (checked:
# 3 of 20 SYNs survived), which would make the native LB look worse than it is.
BATCH = 1


def is_native(mode: str | None) -> bool:
    return mode is None or mode.startswith("native:")


class Bench:
    def __init__(self, sb: Sandbox, topo, dgp2, conns: int, layers=LAYERS):
        self.sb, self.topo, self.dgp2, self.n = sb, topo, dgp2, conns
        self.layers = layers
        self.vip = {name: f"172.16.0.{110 + i}" for i, (name, _) in enumerate(layers)}
        self.tails = {vm.name: P.PcapTail(sb.chassis[vm.chassis].pcap_path(vm.name))
                      for vm in topo.vms}
        self.next_sport = 20000

    # -- packets ------------------------------------------------------------------
    def client_send(self, pkts) -> None:
        hexes = [P.to_hex(p) for p in pkts]
        for i in range(0, len(hexes), BATCH):
            self.sb.net_appctl("netdev-dummy/receive", CLIENT_PORT, *hexes[i:i + BATCH])

    def vm_send(self, vm, pkts) -> None:
        hexes = [P.to_hex(p) for p in pkts]
        for i in range(0, len(hexes), BATCH):
            self.sb.chassis[vm.chassis].appctl("netdev-dummy/receive", vm.name,
                                               *hexes[i:i + BATCH])

    def drain_captures(self) -> None:
        for tail in self.tails.values():
            tail.skip_to_end()

    def collect(self, want, match, timeout=3.0):
        """{key: [vm names]} for captured packets; match(rec) -> key or None."""
        got: dict = {k: [] for k in want}
        deadline = time.monotonic() + timeout
        while True:
            for vm_name, tail in self.tails.items():
                for rec in tail.read():
                    key = match(rec)
                    if key in got:
                        got[key].append(vm_name)
            if all(got.values()) or time.monotonic() > deadline:
                return got
            time.sleep(0.02)   # leave the CPU to OVS, which has the packets to move

    # -- connections --------------------------------------------------------------
    def open(self, via_mac=None):
        """{layer: {sport: vm}} with a full handshake on every connection."""
        t = self.topo
        mac = via_mac or t.dgp_mac
        plan = {}
        for name, _ in self.layers:
            sports = range(self.next_sport, self.next_sport + self.n)
            self.next_sport += self.n
            plan[name] = sports
        self.drain_captures()
        syns = [P.tcp_syn(t.client_mac, mac, t.client_ip, self.vip[name], s, 80)
                for name, sports in plan.items() for s in sports]
        self.client_send(syns)
        want = {(t.client_ip, s) for sports in plan.values() for s in sports}
        got = self.collect(want, lambda r: (r[0], r[3]) if r[2] == "tcp" and r[5] == 0x02
                           else None)
        owners = {}
        replies: dict[str, list] = {}
        for name, sports in plan.items():
            owners[name] = {}
            for s in sports:
                vms = got.get((t.client_ip, s)) or []
                if vms:
                    vm = t.vm(vms[0])
                    owners[name][s] = vm.name
                    replies.setdefault(vm.name, []).append(P.tcp_synack(
                        vm.mac, t.router_port_mac, vm.ip, t.client_ip, 8080, s))
        for vm_name, pkts in replies.items():
            self.vm_send(t.vm(vm_name), pkts)
        acks = [P.tcp_ack(t.client_mac, mac, t.client_ip, self.vip[name], s, 80)
                for name, own in owners.items() for s in own]
        self.client_send(acks)
        time.sleep(0.3)
        return owners

    def midstream(self, owners, tag: bytes, via_mac=None):
        t = self.topo
        mac = via_mac or t.dgp_mac
        self.drain_captures()
        pkts = [P.tcp_ack(t.client_mac, mac, t.client_ip, self.vip[name], s, 80,
                          payload=tag) for name, own in owners.items() for s in own]
        self.client_send(pkts)
        want = {s for own in owners.values() for s in own}
        got = self.collect(want, lambda r: r[3] if r[2] == "tcp" and r[6].startswith(tag)
                           else None)
        time.sleep(0.3)  # late duplicates would show up as a second arrival
        for vm_name, tail in self.tails.items():
            for rec in tail.read():
                if rec[2] == "tcp" and rec[6].startswith(tag) and rec[3] in got:
                    got[rec[3]].append(vm_name)
        return got

    # -- LBs and changes -------------------------------------------------------------
    def create_lbs(self) -> None:
        for name, mode in self.layers:
            lb = f"lb-{name}"
            self.sb.nbctl("lb-add", lb, f"{self.vip[name]}:80", ",".join(THREE), "tcp",
                          "--", "lr-lb-add", "lr0", lb)
            if mode and mode.startswith("native:"):
                self.sb.nbctl("set", "load_balancer", lb, f"options:{mode[7:]}")
            elif mode:
                self.sb.nbctl("set", "load_balancer", lb, "options:stateless_mode=mac",
                              f"options:stateless_persistence={mode}")
        self.wait_applied()

    def set_backends(self, backends) -> None:
        for name, _ in self.layers:
            self.sb.nbctl("set", "load_balancer", f"lb-{name}",
                          f'vips:"{self.vip[name]}:80"="{",".join(backends)}"')
        self.wait_applied()

    def set_drain(self, backend) -> None:
        value = f'[\\"{backend}\\"]' if backend else "[]"
        for name, mode in self.layers:
            if not is_native(mode):
                self.sb.nbctl("set", "load_balancer", f"lb-{name}",
                              f'external_ids:"statelesslb:drain"="{value}"')
        self.wait_applied()

    def wait_applied(self, gateways=("gw1", "gw2")) -> None:
        """Every stateless LB's gateway groups equal the NB; every hv caught up."""
        self.sb.wait_flows_installed(30)

        def groups_match():
            for name, mode in self.layers:
                if is_native(mode):
                    continue
                ext = lb_external_ids(self.sb, f"lb-{name}")
                vip_ids = parse_id_map(ext.get(EXT_VIP_IDS)) or {}
                ids = parse_id_map(ext.get(EXT_BUCKETS)) or {}
                drained = parse_drain(ext.get(EXT_DRAIN))
                vips = self.sb.nbctl("get", "load_balancer", f"lb-{name}", "vips")
                members = vips.split("=", 1)[1].strip(' "}\n').split(",")
                want = {ids.get(m) for m in members if m not in drained}
                if None in want or not vip_ids:
                    return False
                gid = GROUP_BASE + vip_ids[f"{self.vip[name]}:80"]
                for gw in gateways:
                    group = our_groups(self.sb.chassis[gw]).get(gid)
                    if group is None or set(group.buckets) != want:
                        return False
            return True
        wait_until(groups_match, 30, 0.05, "gateway groups to match the NB")
        time.sleep(0.3)  # backends' chassis apply independently

    def failover(self, to_gw2: bool) -> None:
        prio = "30" if to_gw2 else "10"
        self.sb.nbctl("lrp-set-gateway-chassis", "lr0-public", "gw2", prio)
        wait_bound(self.sb, self.topo, 30, chassis="gw2" if to_gw2 else "gw1")
        self.sb.wait_settled(30)
        self.sb.flush_external_fdb()
        # Failed over, gw2 holds both DGPs and gw1 none: gw1 drops its groups.
        self.wait_applied(("gw2",) if to_gw2 else ("gw1", "gw2"))


def fraction(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100.0 * part / whole:.1f}%)" if whole else "-"


def run_changes(b: Bench, skip: tuple[str, ...] = ()) -> None:
    four = THREE + ["10.0.0.14:8080"]
    scenarios = [
        ("add a backend", lambda: b.set_backends(four), lambda: b.set_backends(THREE), None),
        ("remove a backend", lambda: b.set_backends([THREE[0], THREE[2]]),
         lambda: b.set_backends(THREE), None),
        ("drain a backend", lambda: b.set_drain(THREE[0]), lambda: b.set_drain(None), None),
        ("ECMP shift to gw2", lambda: None, lambda: None, b.dgp2.mac),
        ("add + ECMP shift", lambda: b.set_backends(four), lambda: b.set_backends(THREE),
         b.dgp2.mac),
        # Last: after a failover the sandbox's BFD and MAC learning take a while to settle
        # back, and the native LB's state must be where the DGP is for the others.
        ("DGP failover gw1->gw2", lambda: b.failover(True), lambda: b.failover(False), None),
    ]
    scenarios = [sc for sc in scenarios if sc[0] not in skip]
    width = max(16, *(len(name) + 2 for name, _ in b.layers))
    header = f"{'change':24}" + "".join(f"{name:>{width}}" for name, _ in b.layers)
    print("\nbroken established connections (mid-stream packet not at its own backend):")
    print(header)
    collateral_row = None
    for i, (label, change, revert, via) in enumerate(scenarios):
        owners = b.open()
        native_ct = gateway_ct(b, b.vip["native"])
        change()
        got = b.midstream(owners, f"m{i}-".encode(), via_mac=via)
        cells = []
        collateral = []
        for name, mode in b.layers:
            own = owners[name]
            if label.startswith("drain") and is_native(mode):
                cells.append("n/a")
                continue
            bad = [s for s, vm in own.items() if got.get(s) != [vm]]
            cells.append(fraction(len(bad), len(own)))
            if label.startswith("remove"):
                collateral.append(sum(1 for s in bad if own[s] != "vm2"))
        print(f"{label:24}" + "".join(f"{c:>{width}}" for c in cells)
              + f"   (native entries on gw1/gw2 before: {native_ct})", flush=True)
        if collateral:
            collateral_row = collateral
        revert()
    if collateral_row is not None:
        print(f"{'  collateral on removal':24}"
              + "".join(f"{c:>{width}}" for c in collateral_row))
        print("  (collateral: connections NOT on the removed backend that broke anyway)")


def native_dgp(b: Bench) -> str | None:
    """The DGP whose gateway holds the native LB's state in this run.

    With two DGPs, OVN 23.03 builds an LB's DNAT flows for one of them only, the
    first in the router's port set, which is in uuid order: it differs from run to
    run. When it is lr0-public2, traffic through gw1 is redirected to gw2 and the
    native LB's conntrack lives there.
    """
    vip = b.vip["native"]
    for line in b.sb.sbctl("lflow-list", "lr0").splitlines():
        found = re.search(r'is_chassis_resident[(]"cr-([^"]+)"[)]', line)
        if "lr_in_dnat" in line and f"ip4.dst == {vip}" in line and found:
            return found.group(1)
    return None


def gateway_ct(b: Bench, needle: str) -> str:
    """Conntrack entries on gw1/gw2 whose line contains `needle` (a VIP, or the client's
    "src=<ip>,"), as "n1/n2"."""
    return "/".join(str(len(conntrack_lines(b.sb.chassis[g], needle))) for g in ("gw1", "gw2"))


def run_cost(b: Bench, n: int) -> None:
    t = b.topo
    gw = b.sb.chassis["gw1"]
    print(f"\ngateway cost of {n} connections (SYN + ACK each) through gw1:")
    print(f"{'layer':22}{'conntrack gw1/gw2':>20}{'gw1 datapath flows':>20}")
    for name, _ in b.layers:
        for g in ("gw1", "gw2"):
            b.sb.chassis[g].appctl("dpctl/flush-conntrack")
        gw.appctl("revalidator/purge")
        base = b.next_sport
        b.next_sport += n
        pkts = []
        for s in range(base, base + n):
            pkts.append(P.tcp_syn(t.client_mac, t.dgp_mac, t.client_ip, b.vip[name], s, 80))
            pkts.append(P.tcp_ack(t.client_mac, t.dgp_mac, t.client_ip, b.vip[name], s, 80))
        b.client_send(pkts)
        time.sleep(0.5)
        flows = len([x for x in gw.dump_dp_flows().splitlines() if x.strip()])
        # Every entry of the client's: OVN's use_stateless_nat sets ip4.dst to a backend
        # before ct_lb_mark, so its entries do not name the VIP.
        ct = gateway_ct(b, f"src={t.client_ip},")
        print(f"{name:22}{ct:>20}{flows:>20}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=100)
    ap.add_argument("--cost", type=int, default=1000)
    args = ap.parse_args()
    t0 = time.monotonic()
    with running_sandbox(vms=4) as (sb, topo):
        dgp2 = add_second_dgp(sb, topo)
        b = Bench(sb, topo, dgp2, args.conns)
        b.create_lbs()
        print(f"sandbox: 2 gateways (lr0-public on gw1, lr0-public2 on gw2), 2 hypervisors, "
              f"backends vm1-vm3 (+vm4 when added); {args.conns} connections per LB "
              f"per change")
        dgp = native_dgp(b)
        where = {"lr0-public": "gw1", dgp2.name: "gw2"}.get(dgp or "", "?")
        print(f"OVN built the native LB's flows for {dgp} only: its state is on {where} "
              f"in this run (OVN picks one DGP, by port uuid order).")
        if where == "gw2":
            print("  So native traffic through gw1 is redirected to gw2, and an ECMP "
                  "shift to gw2 breaks no native connection in this run.")
        run_cost(b, args.cost)
        run_changes(b)
        print("\nNote: the sandbox runs the userspace dummy datapath, whose dp_hash is "
              "unseeded and the same on every chassis. OVN's native groups use dp_hash, so "
              "the native failover figure here is a lower bound: on kernel datapaths the "
              "hash differs per chassis and about (N-1)/N of native connections re-pick a "
              "different backend (REFERENCE.md section 2).")
        print(f"\ntotal {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
