"""The two-phase bucket change is acknowledged, not timed: a backend chassis whose agent
is paused (SIGSTOP) holds the gateways on the old bucket set until it acknowledges the
previous set, or until the bound ([statelesslb] ack_timeout) runs out."""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import contextmanager

import pytest

from statelesslb.nb.acks import EXT_INSTALLED, parse_installed
from statelesslb.nb.model import EXT_PREVIOUS
from statelesslb.sandbox import agents
from statelesslb.sandbox.processes import wait_until
from statelesslb.sandbox.traffic import (
    broken,
    create_lb,
    lb_external_ids,
    lb_ids,
    lb_status,
    midstream,
    open_connections,
    our_groups,
    wait_lb_ready,
)

TOPOLOGY_KWARGS = {"vms": 4}     # vm1, vm3 on hv1; vm2, vm4 on hv2
THREE = ["10.0.0.11:8080", "10.0.0.12:8080", "10.0.0.13:8080"]
FOUR = THREE + ["10.0.0.14:8080"]
ACK_TIMEOUT = 6.0


@pytest.fixture(scope="module")
def running(sandbox, topo):
    agents.start_agents(sandbox, extra_config=f"ack_timeout = {ACK_TIMEOUT}\n")
    try:
        agents.wait_agents_ready(sandbox)
        yield sandbox
    finally:
        for chassis in sandbox.chassis.values():
            agents.stop_agent(sandbox, chassis)


def _writer(sandbox) -> str:
    def find():
        for name in sandbox.agents:
            if json.loads(agents.agent_ctl(sandbox, name, "status")).get("nb_writer"):
                return name
        return None
    return wait_until(find, 20, 0.1, "an NB writer")


def _paused_chassis(sandbox) -> str:
    """vm4's chassis (it gets the new backend), unless its agent is the NB writer."""
    writer = _writer(sandbox)
    return "hv2" if writer != "hv2" else "hv1"


@contextmanager
def _paused(sandbox, chassis: str):
    pid = sandbox.agents[chassis]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _gateway_buckets(sandbox, gid: int) -> set[int]:
    group = our_groups(sandbox.chassis["gw1"], known=(gid,)).get(gid)
    return set(group.buckets) if group is not None else set()


def _phase1(sandbox, name: str, old_since: float | None) -> float:
    def published():
        previous = lb_external_ids(sandbox, name).get(EXT_PREVIOUS)
        since = json.loads(previous)["since"] if previous else None
        return since if since is not None and since != old_since else None
    return wait_until(published, 10, 0.05, f"{name}'s previous set published")


def _acknowledged(sandbox, chassis: str, lb_uuid: str, since: float) -> bool:
    rows = sandbox.sb_rows("Chassis_Private", f"name={chassis}", columns=["external_ids"])
    text = rows[0]["external_ids"].get(EXT_INSTALLED) if rows else None
    return abs(parse_installed(text).get(lb_uuid, -1) - since) < 0.001


def _second_chance_lb(sandbox, topo, name: str, vip: str) -> int:
    """A second-chance LB over THREE; its gateway group id once it is ready."""
    create_lb(sandbox, name, f"{vip}:80", THREE)
    sandbox.nbctl("set", "load_balancer", name, "options:stateless_persistence=second-chance")
    return wait_lb_ready(sandbox, name, f"{vip}:80", 3, topo=topo)


def _lb_uuid(sandbox, name: str) -> str:
    return sandbox.nbctl("--bare", "--columns=_uuid", "find", "load_balancer",
                         f"name={name}").strip()


def test_the_gateways_wait_for_a_paused_backend_agent(running, topo):
    sandbox, vip, name = running, "172.16.0.110", "lbk"
    gid = _second_chance_lb(sandbox, topo, name, vip)
    uuid = _lb_uuid(sandbox, name)
    conns = open_connections(sandbox, topo, vip, range(48000, 48040))
    assert len(conns) == 40
    old = _gateway_buckets(sandbox, gid)
    paused = _paused_chassis(sandbox)

    with _paused(sandbox, paused):
        sandbox.nbctl("set", "load_balancer", name, f'vips:"{vip}:80"="{",".join(FOUR)}"')
        since = _phase1(sandbox, name, None)
        # Everybody else acknowledges at once; the paused chassis cannot.
        for other in ("gw1", "gw2", "hv1", "hv2"):
            if other != paused:
                wait_until(lambda o=other: _acknowledged(sandbox, o, uuid, since), 10, 0.05,
                           f"{other}'s acknowledgement")
        # Half the bound: the gateways have not moved, and sessions are intact.
        while time.time() < since + ACK_TIMEOUT / 2:
            assert _gateway_buckets(sandbox, gid) == old, "moved without the paused chassis"
            time.sleep(0.1)
        assert f"waiting for {paused} " in (lb_status(sandbox, name) or "")
        assert broken(conns, midstream(sandbox, topo, vip, conns, b"k1")) == []
        assert _gateway_buckets(sandbox, gid) == old
        resumed = time.time()

    ids = lb_ids(sandbox, name)[1]
    want = {ids[b] for b in FOUR}
    wait_until(lambda: _gateway_buckets(sandbox, gid) == want, ACK_TIMEOUT, 0.02,
               "the gateways on the new set")
    moved = time.time()
    assert _acknowledged(sandbox, paused, uuid, since)
    # Moved on the acknowledgement, well before the bound.
    assert resumed < moved < since + ACK_TIMEOUT, (resumed - since, moved - since)
    print(f"paused {resumed - since:.2f} s after phase 1; gateways moved "
          f"{moved - resumed:.2f} s after the resumption (bound {ACK_TIMEOUT} s)")
    wait_until(lambda: lb_status(sandbox, name) == "ok", 5, 0.05, "status ok")
    # The established connections survive the move (some now hash to vm4, on the
    # chassis that was paused: it redirects them to their owners).
    assert broken(conns, midstream(sandbox, topo, vip, conns, b"k2")) == []
    fresh = open_connections(sandbox, topo, vip, range(48100, 48140))
    assert any(c.vm == "vm4" for c in fresh)


def test_the_wait_is_bounded_and_a_late_chassis_is_named(running, topo):
    sandbox, vip, name = running, "172.16.0.111", "lbl"
    gid = _second_chance_lb(sandbox, topo, name, vip)
    old = _gateway_buckets(sandbox, gid)
    paused = _paused_chassis(sandbox)
    writer_log = sandbox.agents[_writer(sandbox)]["log"]

    with _paused(sandbox, paused):
        sandbox.nbctl("set", "load_balancer", name, f'vips:"{vip}:80"="{",".join(FOUR)}"')
        since = _phase1(sandbox, name, None)
        ids = lb_ids(sandbox, name)[1]
        want = {ids[b] for b in FOUR}

        def moved():
            buckets = _gateway_buckets(sandbox, gid)
            assert buckets in (old, want), buckets
            return buckets == want
        wait_until(moved, ACK_TIMEOUT + 5, 0.05, "the gateways on the new set")
        at = time.time()
        # Not before the bound (less the polling and the NB round trip), not much after.
        assert since + ACK_TIMEOUT - 0.2 <= at < since + ACK_TIMEOUT + 3, at - since
        print(f"kept paused: gateways moved {at - since:.2f} s after phase 1")
        assert lb_status(sandbox, name) == (
            f"ok (previous bucket set not held by {paused}: sessions there may break)")
        with open(writer_log) as log:
            assert any(f"LB {name}: gateways moved to the new bucket set without the "
                       f"acknowledgement of {paused}" in line for line in log)

    # Once it catches up, the status says all is well again.
    wait_until(lambda: lb_status(sandbox, name) == "ok", 10, 0.05, "status ok")


def _other_gateway_buckets(sandbox, gateway: str, gid: int) -> set[int]:
    group = our_groups(sandbox.chassis[gateway], known=(gid,)).get(gid)
    return set(group.buckets) if group is not None else set()


@pytest.mark.parametrize("persistence", ["hash", "second-chance"])
def test_plain_hashing_does_not_wait_for_the_nb_writer(running, topo, persistence):
    """Without second chance the NB holds no active set: a gateway drops a removed
    backend's bucket on the NB change itself, even with the NB writer paused. With
    second chance it waits for the writer's two phases."""
    sandbox = running
    vip, name = ("172.16.0.120", "lbh") if persistence == "hash" else ("172.16.0.121", "lbs")
    create_lb(sandbox, name, f"{vip}:80", THREE)
    sandbox.nbctl("set", "load_balancer", name,
                  f"options:stateless_persistence={persistence}")
    gid = wait_lb_ready(sandbox, name, f"{vip}:80", 3, topo=topo)
    ids = lb_ids(sandbox, name)[1]
    assert ("statelesslb:active" in lb_external_ids(sandbox, name)) == (
        persistence == "second-chance")
    writer = _writer(sandbox)
    gateway = "gw2" if writer == "gw1" else "gw1"   # one whose agent is not paused
    wait_until(lambda: _other_gateway_buckets(sandbox, gateway, gid) == set(ids.values()),
               10, 0.05, f"{gateway}'s group")
    kept = {ids[b] for b in THREE[:2]}
    with _paused(sandbox, writer):
        sandbox.nbctl("set", "load_balancer", name, f'vips:"{vip}:80"="{",".join(THREE[:2])}"')
        if persistence == "hash":
            wait_until(lambda: _other_gateway_buckets(sandbox, gateway, gid) == kept,
                       10, 0.02, f"{gateway} without the removed backend")
        else:
            time.sleep(2)
            assert _other_gateway_buckets(sandbox, gateway, gid) == set(ids.values())
        # The writer did nothing meanwhile: the removed backend still has its id.
        assert lb_ids(sandbox, name)[1] == ids
    wait_until(lambda: lb_ids(sandbox, name)[1] == {b: ids[b] for b in THREE[:2]}, 10, 0.05,
               "the NB writer's ids after the resumption")
    wait_until(lambda: _other_gateway_buckets(sandbox, gateway, gid) == kept, 15, 0.05,
               f"{gateway} on the new set")
    sandbox.nbctl("lb-del", name)
