"""Sessions survive backend changes: each persistence layer's guarantee, with real packets."""

from __future__ import annotations

import pytest

from statelesslb.observe.predict import FlowTuple, predict_bucket
from statelesslb.sandbox import agents
from statelesslb.sandbox.processes import wait_until
from statelesslb.sandbox.traffic import (
    GROUP_BASE,
    Conn,
    broken,
    conntrack_lines,
    create_lb,
    installed_fields,
    lb_ids,
    midstream,
    open_connections,
    our_groups,
    set_backends,
    wait_lb_ready,
)

TOPOLOGY_KWARGS = {"vms": 4}
THREE = ["10.0.0.11:8080", "10.0.0.12:8080", "10.0.0.13:8080"]
FOUR = THREE + ["10.0.0.14:8080"]


@pytest.fixture(scope="module")
def running(sandbox, topo):
    agents.start_agents(sandbox)
    agents.wait_agents_ready(sandbox)
    return sandbox


def _lb(sandbox, topo, name, vip, persistence):
    create_lb(sandbox, name, f"{vip}:80", THREE)
    sandbox.nbctl("set", "load_balancer", name, f"options:stateless_persistence={persistence}")
    return wait_lb_ready(sandbox, name, f"{vip}:80", 3, topo=topo)


def _set_backends(sandbox, topo, name, vip, backends, gid):
    got = set_backends(sandbox, topo, name, f"{vip}:80", backends)
    assert got == gid, f"{name}'s group id changed: {got:#x}, was {gid:#x}"


def test_hashing_alone_moves_only_what_must_move(running, topo):
    sandbox, vip = running, "172.16.0.100"
    gid = _lb(sandbox, topo, "lbh", vip, "hash")
    conns = open_connections(sandbox, topo, vip, range(45000, 45040))
    assert len(conns) == 40
    # Removal: only vm2's connections lose their backend; none of the others move.
    _set_backends(sandbox, topo, "lbh", vip, ["10.0.0.11:8080", "10.0.0.13:8080"], gid)
    arrivals = midstream(sandbox, topo, vip, conns, b"r1")
    lost = broken(conns, arrivals)
    assert {c.vm for c in lost} <= {"vm2"}
    assert len(lost) == sum(1 for c in conns if c.vm == "vm2")
    # Addition: the only flows that move are those the new backend now wins.
    fresh = open_connections(sandbox, topo, vip, range(45100, 45140))
    _set_backends(sandbox, topo, "lbh", vip, ["10.0.0.11:8080", "10.0.0.13:8080",
                                              "10.0.0.14:8080"], gid)
    arrivals = midstream(sandbox, topo, vip, fresh, b"r2")
    moved = broken(fresh, arrivals)
    assert all(arrivals[(c.src_ip, c.sport)] == ["vm4"] for c in moved), moved
    assert 0 < len(moved) < len(fresh)   # ~1/3 with 3 -> 3 backends + 1


def test_second_chance_keeps_sessions_when_a_backend_is_added(running, topo):
    sandbox, vip = running, "172.16.0.101"
    gid = _lb(sandbox, topo, "lbs", vip, "second-chance")
    conns = open_connections(sandbox, topo, vip, range(46000, 46040))
    assert len(conns) == 40
    _set_backends(sandbox, topo, "lbs", vip, FOUR, gid)
    # Not vacuous: the gateways now send some of these flows to vm4 (predicted with the
    # same hash OVS uses), which has no state for them.
    ids = lb_ids(sandbox, "lbs")[1]
    fields = installed_fields(sandbox.chassis["gw1"], gid)
    moved = [c for c in conns if predict_bucket(
        ids.values(), 100, fields,
        FlowTuple.make(c.src_ip, vip, "tcp", c.sport, 80)) == ids["10.0.0.14:8080"]]
    assert moved
    arrivals = midstream(sandbox, topo, vip, conns, b"s1")
    assert broken(conns, arrivals) == []
    # New connections do use the new backend.
    fresh = open_connections(sandbox, topo, vip, range(46100, 46140))
    assert any(c.vm == "vm4" for c in fresh)
    # The gateways stayed stateless throughout.
    assert conntrack_lines(sandbox.chassis["gw1"], f"dst={vip}") == []


def test_second_chance_drain_keeps_established_and_stops_new(running, topo):
    sandbox, vip = running, "172.16.0.101"
    gid = GROUP_BASE + lb_ids(sandbox, "lbs")[0][f"{vip}:80"]
    conns = open_connections(sandbox, topo, vip, range(46200, 46260))
    on_vm1 = [c for c in conns if c.vm == "vm1"]
    assert on_vm1, "no connection landed on vm1"
    sandbox.nbctl("set", "load_balancer", "lbs",
                  'external_ids:"statelesslb:drain"="[\\"10.0.0.11:8080\\"]"')
    ids = lb_ids(sandbox, "lbs")[1]
    wait_until(lambda: ids["10.0.0.11:8080"] not in our_groups(sandbox.chassis["gw1"])[gid]
               .buckets, 10, 0.02, "vm1's bucket out of the gateway group")
    arrivals = midstream(sandbox, topo, vip, conns, b"s2")
    assert broken(conns, arrivals) == []
    fresh = open_connections(sandbox, topo, vip, range(46300, 46340))
    assert fresh and all(c.vm != "vm1" for c in fresh)


def test_second_chance_redirects_at_most_once(running, topo):
    """A mid-stream packet nobody has state for goes to its previous owner once, and stops.

    Its own LB, so it depends on no earlier test. The gateways now pick vm4 for the
    flow and picked another VM before the change: vm4's chassis has no entry, asks the
    previous set and sends the packet to that VM, which has no entry either and must
    serve it, not send it on (again). Without second chance it would land at vm4.
    """
    sandbox, vip = running, "172.16.0.103"
    gid = _lb(sandbox, topo, "lbr", vip, "second-chance")
    _set_backends(sandbox, topo, "lbr", vip, FOUR, gid)
    ids = lb_ids(sandbox, "lbr")[1]
    by_id = {bid: topo.vm_by_ip(key.rsplit(":", 1)[0]).name for key, bid in ids.items()}
    fields = installed_fields(sandbox.chassis["gw1"], gid)

    def owner(sport, backends):
        pkt = FlowTuple.make(topo.client_ip, vip, "tcp", sport, 80)
        return by_id[predict_bucket([ids[b] for b in backends], 100, fields, pkt)]
    # Connections that never existed, moved by the change to vm4.
    ghosts = [Conn(topo.client_ip, s, owner(s, THREE)) for s in range(46400, 46700)
              if owner(s, FOUR) == "vm4"][:5]
    assert ghosts
    arrivals = midstream(sandbox, topo, vip, ghosts, b"s3", settle=2.0)
    assert {(g.sport, tuple(arrivals[(g.src_ip, g.sport)])) for g in ghosts} == {
        (g.sport, (g.vm,)) for g in ghosts}


def test_gateway_affinity_keeps_sessions_on_the_gateway(running, topo):
    sandbox, vip = running, "172.16.0.102"
    gid = _lb(sandbox, topo, "lba", vip, "affinity")
    conns = open_connections(sandbox, topo, vip, range(47000, 47040))
    assert len(conns) == 40
    gw = sandbox.chassis["gw1"]
    entries = [e for e in conntrack_lines(gw, f"dst={vip}") if "zone=64000" in e]
    assert len(entries) == 40
    _set_backends(sandbox, topo, "lba", vip, FOUR, gid)
    arrivals = midstream(sandbox, topo, vip, conns, b"a1")
    assert broken(conns, arrivals) == []
