"""Several gateways at once: two DGPs of lr0 on gw1 and gw2 serve one VIP together."""

from __future__ import annotations

import pytest

from statelesslb.sandbox import agents
from statelesslb.sandbox import packets as P
from statelesslb.sandbox.processes import wait_until
from statelesslb.sandbox.topology import add_second_dgp
from statelesslb.sandbox.traffic import (
    conntrack_lines,
    create_lb,
    find_arrival,
    our_groups,
    reply_from,
    wait_lb_ready,
)

TOPOLOGY_KWARGS = {"vms": 3}
VIP = "172.16.0.100"
BACKENDS = ["10.0.0.11:8080", "10.0.0.12:8080", "10.0.0.13:8080"]


@pytest.fixture(scope="module")
def two_dgps(sandbox, topo):
    dgp2 = add_second_dgp(sandbox, topo)
    agents.start_agents(sandbox)
    agents.wait_agents_ready(sandbox)
    create_lb(sandbox, "lb1", f"{VIP}:80", BACKENDS)
    gid = wait_lb_ready(sandbox, "lb1", f"{VIP}:80", 3, topo=topo)
    wait_lb_ready(sandbox, "lb1", f"{VIP}:80", 3, gateway="gw2")
    return dgp2, gid


def _syn_via(sandbox, topo, dgp_mac, src_ip, sport):
    sandbox.client_inject(P.tcp_syn(topo.client_mac, dgp_mac, src_ip, VIP, sport, 80))


def test_same_group_on_both_gateways(sandbox, topo, two_dgps):
    _, gid = two_dgps
    g1 = our_groups(sandbox.chassis["gw1"])[gid]
    g2 = our_groups(sandbox.chassis["gw2"])[gid]
    assert g1.header == g2.header
    # In the same order too: ties go to the bucket listed later.
    assert list(g1.buckets.items()) == list(g2.buckets.items())


def test_every_gateway_picks_the_same_backend(sandbox, topo, two_dgps):
    dgp2, _ = two_dgps
    # Distinct client addresses per gateway so the backends' conntrack cannot steer:
    # the choice is the gateways' alone. Same 5-tuple shape, different source IP.
    mismatches = []
    for n in range(24):
        src = f"172.16.0.{60 + n}"
        sport = 44000 + n
        _syn_via(sandbox, topo, topo.dgp_mac, src, sport)
        first = find_arrival(sandbox, topo, src, sport)
        assert first is not None, f"{src}:{sport} via gw1 not delivered"
        # The same tuple again, now through gw2 (after its conntrack entry on the backend
        # exists, which would keep it on the same VM only if gw2 sends it there).
        n_before = {vm.name: len(sandbox.chassis[vm.chassis].sent(vm.name)) for vm in topo.vms}
        _syn_via(sandbox, topo, dgp2.mac, src, sport)

        def second(n_before=n_before, src=src, sport=sport):
            for vm in topo.vms:
                for pkt in sandbox.chassis[vm.chassis].sent(vm.name)[n_before[vm.name]:]:
                    ip, l4 = P.ip(pkt), P.l4(pkt)
                    if ip is not None and ip.src == src and l4 is not None and l4.sport == sport:
                        return vm.name
            return None
        got = wait_until(second, 3, 0.02, f"{src}:{sport} via gw2")
        if got != first.vm.name:
            mismatches.append((src, sport, first.vm.name, got))
    assert mismatches == []
    # Neither gateway kept state for any of it.
    for gw in ("gw1", "gw2"):
        assert conntrack_lines(sandbox.chassis[gw], f"dst={VIP}") == []


def test_reply_may_leave_through_the_other_gateway(sandbox, topo, two_dgps):
    dgp2, _ = two_dgps
    sport = 44500
    _syn_via(sandbox, topo, dgp2.mac, topo.client_ip, sport)   # in through gw2
    arrival = find_arrival(sandbox, topo, topo.client_ip, sport)
    assert arrival is not None
    pkt = reply_from(sandbox, topo, arrival, sport)
    # Out through lr0-public (gw1): the client's subnet. From the VIP all the same.
    assert pkt.src == topo.dgp_mac and P.ip(pkt).src == VIP
