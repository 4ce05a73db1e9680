"""Direct return (options:stateless_return=direct) on real OVN: the backends' chassis are
on the external segment too (a bridge mapping and a chassis MAC), and a stateless VIP's
replies leave there instead of through the gateway that holds the DGP.

The evidence is the reply's source MAC at the client: a reply through the gateway
carries the DGP's MAC; one that left a hypervisor carries that hypervisor's chassis MAC
(OVN swaps it in, on a chassis where the DGP is not resident, when the packet leaves by
the localnet port). The gateway's own counters say it forwarded no reply.
"""

from __future__ import annotations

import json

import pytest

from statelesslb.sandbox import agents
from statelesslb.sandbox import packets as P
from statelesslb.sandbox.processes import wait_until
from statelesslb.sandbox.traffic import (
    broken,
    create_lb,
    lb_status,
    midstream,
    open_connections,
    our_flows,
    wait_lb_ready,
)

SANDBOX_KWARGS = {"external_hypervisors": True}
TOPOLOGY_KWARGS = {"vms": 2}        # vm1 on hv1, vm2 on hv2
BACKENDS = ["10.0.0.11:8080", "10.0.0.12:8080"]


@pytest.fixture(scope="module")
def running(sandbox, topo):
    # The sandbox fixture's down() stops the agents with everything else.
    agents.start_agents(sandbox)
    agents.wait_agents_ready(sandbox)
    return sandbox


def _lb(sandbox, topo, name: str, vip: str, direct: bool) -> None:
    create_lb(sandbox, name, f"{vip}:80", BACKENDS)
    if direct:
        sandbox.nbctl("set", "load_balancer", name, "options:stateless_return=direct")
    wait_lb_ready(sandbox, name, f"{vip}:80", len(BACKENDS), topo=topo)
    if direct:
        for hv in ("hv1", "hv2"):
            wait_until(lambda h=hv: any(f"nw_src={vip},tp_src=80" in f
                                        for f in our_flows(sandbox.chassis[h])),
                       10, 0.05, f"{hv}'s direct-return flow for {vip}")


def _replies(sandbox, vip: str, since: int) -> list:
    return [p for p in sandbox.client_received()[since:]
            if P.is_tcp(p) and P.ip(p).src == vip]


def test_replies_leave_the_backends_chassis_with_its_chassis_mac(running, topo):
    sandbox, vip = running, "172.16.0.120"
    _lb(sandbox, topo, "lbd", vip, direct=True)
    assert lb_status(sandbox, "lbd") == "ok"
    seen = len(sandbox.client_received())
    gw_sent = sandbox.chassis["gw1"].sent_to_external()
    conns = open_connections(sandbox, topo, vip, range(47000, 47020))
    assert len(conns) == 20 and {c.vm for c in conns} == {"vm1", "vm2"}
    replies = wait_until(lambda: (r := _replies(sandbox, vip, seen)) and len(r) >= 20 and r,
                         5, 0.05, "20 SYN-ACKs at the client")
    by_vm = {c.sport: c.vm for c in conns}
    for reply in replies:
        vm = next(v for v in topo.vms if v.name == by_vm[P.l4(reply).dport])
        chassis = sandbox.chassis[vm.chassis]
        assert reply.src == chassis.chassis_mac, (vm.name, reply.src)
        assert P.l4(reply).sport == 80 and P.is_tcp(reply, "SA")
    # The gateway sent none of them (a GARP at most).
    assert sandbox.chassis["gw1"].sent_to_external() - gw_sent < 10
    # Mid-stream packets still go client -> gateway -> backend, undisturbed.
    assert broken(conns, midstream(sandbox, topo, vip, conns, b"d1")) == []


def test_without_the_option_replies_go_through_the_gateway(running, topo):
    sandbox, vip = running, "172.16.0.121"
    _lb(sandbox, topo, "lbg", vip, direct=False)
    seen = len(sandbox.client_received())
    before = sandbox.chassis["gw1"].sent_to_external()
    conns = open_connections(sandbox, topo, vip, range(47100, 47110))
    assert len(conns) == 10
    replies = wait_until(lambda: (r := _replies(sandbox, vip, seen)) and len(r) >= 10 and r,
                         5, 0.05, "10 SYN-ACKs at the client")
    assert {r.src for r in replies} == {topo.dgp_mac}
    assert sandbox.chassis["gw1"].sent_to_external() - before >= 10


def test_a_chassis_without_a_chassis_mac_falls_back_to_the_gateway(running, topo):
    sandbox, vip = running, "172.16.0.120"
    hv2 = sandbox.chassis["hv2"]
    hv2.vsctl("remove", "Open_vSwitch", ".", "external_ids", "ovn-chassis-mac-mappings")
    try:
        wait_until(lambda: not any(f"nw_src={vip},tp_src=80" in f for f in our_flows(hv2)),
                   10, 0.05, "hv2's direct-return flow gone")
        entries = json.loads(agents.agent_ctl(sandbox, "hv2", "lb-list"))
        status = next(e for e in entries if e["name"] == "lbd")
        assert status["state"] == "ok" and "through the gateway" in status["message"], status
        seen = len(sandbox.client_received())
        conns = open_connections(sandbox, topo, vip, range(47200, 47240))
        assert {c.vm for c in conns} == {"vm1", "vm2"}
        replies = wait_until(lambda: (r := _replies(sandbox, vip, seen)) and len(r) >= 40 and r,
                             5, 0.05, "40 SYN-ACKs at the client")
        vm_of = {c.sport: c.vm for c in conns}
        sources = {vm_of[P.l4(r).dport]: r.src for r in replies}
        assert sources == {"vm1": sandbox.chassis["hv1"].chassis_mac, "vm2": topo.dgp_mac}
    finally:
        hv2.vsctl("set", "Open_vSwitch", ".",
                  f"external_ids:ovn-chassis-mac-mappings={sandbox.physnet}:{hv2.chassis_mac}")
    wait_until(lambda: any(f"nw_src={vip},tp_src=80" in f for f in our_flows(hv2)),
               10, 0.05, "hv2's direct-return flow back")


def test_an_uplink_that_cannot_be_made_keeps_replies_on_the_gateway(running, topo):
    """A bridge mapping to a bridge that does not exist: ovs-vsctl cannot add the patch
    port. The agent says so and keeps serving; the mapping mended, direct return is back."""
    sandbox, vip = running, "172.16.0.120"
    hv2 = sandbox.chassis["hv2"]
    good = f"{sandbox.physnet}:br-ext"
    hv2.vsctl("set", "Open_vSwitch", ".",
              f"external_ids:ovn-bridge-mappings={sandbox.physnet}:br-nope")
    try:
        wait_until(lambda: not any(f"nw_src={vip},tp_src=80" in f for f in our_flows(hv2)),
                   10, 0.05, "hv2's direct-return flow gone")
        status = json.loads(agents.agent_ctl(sandbox, "hv2", "status"))
        assert "br-nope" in (status["uplink_error"] or ""), status["uplink_error"]
        assert any("direct-return uplinks" in p for p in status["problems"])
        entries = json.loads(agents.agent_ctl(sandbox, "hv2", "lb-list"))
        lbd = next(e for e in entries if e["name"] == "lbd")
        assert lbd["state"] == "ok" and "through the gateway" in lbd["message"], lbd
        # Still serving, through the gateway.
        conns = open_connections(sandbox, topo, vip, range(47300, 47320))
        assert {c.vm for c in conns} == {"vm1", "vm2"}
    finally:
        hv2.vsctl("set", "Open_vSwitch", ".", f"external_ids:ovn-bridge-mappings={good}")
    wait_until(lambda: any(f"nw_src={vip},tp_src=80" in f for f in our_flows(hv2)),
               10, 0.05, "hv2's direct-return flow back")
    status = json.loads(agents.agent_ctl(sandbox, "hv2", "status"))
    assert status["uplink_error"] is None and set(status["uplinks"]) == {sandbox.physnet}
