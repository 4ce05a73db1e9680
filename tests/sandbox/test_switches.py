"""Backends on two switches of one router (sw0 and sw1), under every persistence layer.

Each test opens real handshakes to backends on both switches, changes the backends and
sends a mid-stream packet on every connection: it must reach the backend that holds it,
whichever switch that backend (and the one the gateways now pick) sits on.
"""

from __future__ import annotations

import pytest

from statelesslb.observe.predict import FlowTuple, predict_bucket
from statelesslb.sandbox import agents
from statelesslb.sandbox.processes import wait_until
from statelesslb.sandbox.topology import add_backend_switch, wait_bound
from statelesslb.sandbox.traffic import (
    GROUP_BASE,
    broken,
    conntrack_lines,
    create_lb,
    find_arrival,
    installed_fields,
    lb_ids,
    midstream,
    open_connections,
    reply_from,
    send_syn,
    set_backends,
    wait_group,
    wait_lb_ready,
)

TOPOLOGY_KWARGS = {"vms": 2}   # vm1 (hv1), vm2 (hv2) on sw0; sw1's vm3, vm4 added below
SW0 = ["10.0.0.11:8080", "10.0.0.12:8080"]
SW1 = ["10.0.1.11:8080", "10.0.1.12:8080"]


@pytest.fixture(scope="module")
def running(sandbox, topo):
    added = add_backend_switch(sandbox, topo, 2)
    assert [(vm.name, vm.ip, vm.chassis) for vm in added] == [
        ("vm3", "10.0.1.11", "hv1"), ("vm4", "10.0.1.12", "hv2")]
    agents.start_agents(sandbox)
    agents.wait_agents_ready(sandbox)
    return sandbox


def _switch(topo, vm_name: str) -> str:
    return "sw1" if topo.vm(vm_name).ip.startswith("10.0.1.") else "sw0"


def _lb(sandbox, topo, name, vip, persistence, backends):
    create_lb(sandbox, name, f"{vip}:80", backends)
    sandbox.nbctl("set", "load_balancer", name, f"options:stateless_persistence={persistence}")
    return wait_lb_ready(sandbox, name, f"{vip}:80", len(backends), topo=topo)


def _owner_after(sandbox, topo, name, vip, conn, backends) -> str:
    """The VM the gateways pick for `conn` among `backends` (same hash as OVS)."""
    vip_ids, ids = lb_ids(sandbox, name)
    live = [ids[b] for b in backends]
    fields = installed_fields(sandbox.chassis["gw1"], GROUP_BASE + vip_ids[f"{vip}:80"])
    bid = predict_bucket(live, 100, fields,
                         FlowTuple.make(conn.src_ip, vip, "tcp", conn.sport, 80))
    key = next(b for b in backends if ids[b] == bid)
    return topo.vm_by_ip(key.rsplit(":", 1)[0]).name


def _open_on_both_switches(sandbox, topo, vip, sports):
    conns = open_connections(sandbox, topo, vip, sports)
    assert len(conns) == len(sports)
    assert {_switch(topo, c.vm) for c in conns} == {"sw0", "sw1"}
    return conns


def test_hash_reaches_both_switches_and_moves_only_what_must(running, topo):
    sandbox, vip = running, "172.16.0.100"
    gid = _lb(sandbox, topo, "lbh", vip, "hash", [SW0[0], SW1[0]])
    conns = _open_on_both_switches(sandbox, topo, vip, range(45000, 45040))
    # A reply from sw1 leaves from the VIP.
    send_syn(sandbox, topo, vip, 45099)
    arrival = find_arrival(sandbox, topo, topo.client_ip, 45099)
    assert arrival is not None
    reply = reply_from(sandbox, topo, arrival, 45099)
    assert reply.src == topo.dgp_mac
    new = [SW0[0], SW1[0], SW1[1]]
    assert set_backends(sandbox, topo, "lbh", f"{vip}:80", new) == gid
    arrivals = midstream(sandbox, topo, vip, conns, b"h1")
    moved = [c for c in conns if _owner_after(sandbox, topo, "lbh", vip, c, new) != c.vm]
    assert moved and broken(conns, arrivals) == moved


def test_affinity_keeps_sessions_on_both_switches(running, topo):
    sandbox, vip = running, "172.16.0.102"
    gid = _lb(sandbox, topo, "lba", vip, "affinity", [SW0[0], SW1[0]])
    conns = _open_on_both_switches(sandbox, topo, vip, range(47000, 47040))
    new = SW0 + SW1
    assert set_backends(sandbox, topo, "lba", f"{vip}:80", new) == gid
    moved = [c for c in conns if _owner_after(sandbox, topo, "lba", vip, c, new) != c.vm]
    assert {_switch(topo, c.vm) for c in moved} == {"sw0", "sw1"}, "not every case moved"
    arrivals = midstream(sandbox, topo, vip, conns, b"a1")
    assert broken(conns, arrivals) == []


def test_second_chance_across_switches_and_gateways(running, topo):
    """The reported case: a backend added, traffic moved to the other gateway."""
    sandbox, vip = running, "172.16.0.101"
    _lb(sandbox, topo, "lbs", vip, "second-chance", [SW0[0], SW1[0]])
    conns = _open_on_both_switches(sandbox, topo, vip, range(46000, 46080))
    new = SW0 + SW1
    gid = set_backends(sandbox, topo, "lbs", f"{vip}:80", new)
    # Not vacuous: flows whose new backend is on the other switch than the one that
    # holds them, in both directions.
    crossing = {(_switch(topo, c.vm), _switch(topo, owner))
                for c in conns
                if (owner := _owner_after(sandbox, topo, "lbs", vip, c, new)) != c.vm}
    assert {("sw0", "sw1"), ("sw1", "sw0")} <= crossing, crossing
    arrivals = midstream(sandbox, topo, vip, conns, b"s1")
    assert broken(conns, arrivals) == []
    # Now through the other gateway (stateless gateways: nothing to lose there).
    sandbox.nbctl("lrp-set-gateway-chassis", topo.dgp, "gw2", "30")
    wait_bound(sandbox, topo, 30, chassis="gw2")
    # OVN 23.03 may leave gw1 routing the DGP's traffic too (Sandbox.recompute_gateways):
    # each packet flooded to both would then arrive twice.
    sandbox.recompute_gateways()
    ids = lb_ids(sandbox, "lbs")[1]
    wait_group(sandbox.chassis["gw2"], gid, {ids[b] for b in new})
    sandbox.wait_settled(30)
    sandbox.flush_external_fdb()
    probe = iter(range(46900, 46999))

    def through_gw2():
        sport = next(probe)
        send_syn(sandbox, topo, vip, sport)
        return find_arrival(sandbox, topo, topo.client_ip, sport, timeout=0.5)
    wait_until(through_gw2, 15, 0.05, "traffic through gw2")
    arrivals = midstream(sandbox, topo, vip, conns, b"s2")
    assert broken(conns, arrivals) == []
    assert conntrack_lines(sandbox.chassis["gw2"], f"dst={vip}") == []
