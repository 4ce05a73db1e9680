"""The stateless MAC-mode datapath end to end: real OVN, real agents, real packets."""

from __future__ import annotations

import re
import time

import pytest
from scapy.contrib.geneve import GENEVE  # noqa: F401  (binds UDP 6081 for parsing)
from scapy.layers.inet import IP

from statelesslb.sandbox import agents
from statelesslb.sandbox import packets as P
from statelesslb.sandbox.processes import wait_until
from statelesslb.sandbox.traffic import (
    GROUP_BASE,
    conntrack_lines,
    create_lb,
    find_arrival,
    lb_ids,
    lb_status,
    our_flows,
    our_groups,
    ovn_state,
    reply_from,
    send_syn,
    wait_group,
    wait_lb_ready,
)

TOPOLOGY_KWARGS = {"vms": 3}
VIP = "172.16.0.100"
VIP_KEY = f"{VIP}:80"
BACKENDS = ["10.0.0.11:8080", "10.0.0.12:8080", "10.0.0.13:8080"]


@pytest.fixture(scope="module")
def lb1(sandbox, topo):
    agents.start_agents(sandbox)
    agents.wait_agents_ready(sandbox)
    create_lb(sandbox, "lb1", VIP_KEY, BACKENDS)
    gid = wait_lb_ready(sandbox, "lb1", VIP_KEY, 3, topo=topo)
    return gid


def _underlay_capture(sandbox, chassis: str) -> str:
    """Record what the underlay sends to `chassis` (its Geneve traffic)."""
    path = f"{sandbox.run_dir}/net/to-{chassis}.pcap"
    sandbox.net_vsctl("set", "Interface", chassis, f"options:tx_pcap={path}")
    return path


def test_syn_is_balanced_statelessly(sandbox, topo, lb1):
    gw = sandbox.chassis["gw1"]
    captures = {hv: _underlay_capture(sandbox, hv) for hv in ("hv1", "hv2")}
    sport = 41001
    send_syn(sandbox, topo, VIP, sport)
    arrival = find_arrival(sandbox, topo, topo.client_ip, sport)
    assert arrival is not None, gw.trace(
        f"in_port=1,tcp,dl_dst={topo.dgp_mac},nw_src={topo.client_ip},nw_dst={VIP},"
        f"tp_src={sport},tp_dst=80")
    ip = P.ip(arrival.packet)
    # At the VM port: DNATed to backend ip:port, routed (TTL decremented) by lr0.
    assert ip.dst == arrival.vm.ip and P.l4(arrival.packet).dport == 8080
    assert ip.ttl == 63
    assert arrival.packet.src == topo.router_port_mac and arrival.packet.dst == arrival.vm.mac

    # Between the chassis: still addressed to the VIP, steered only by the backend's MAC.
    def tunnelled():
        for pkt in P.read_pcap(captures[arrival.vm.chassis]):
            inner = pkt.getlayer(IP, 2)
            tcp = P.l4(inner) if inner is not None else None
            if inner is not None and tcp is not None and tcp.sport == sport:
                return pkt
        return None
    pkt = wait_until(tunnelled, 3, 0.02, "the Geneve packet on the underlay")
    assert pkt.getlayer(IP, 2).dst == VIP
    assert pkt[GENEVE].payload.dst == arrival.vm.mac

    # No conntrack on the gateway; the backend's chassis holds the DNAT entry.
    assert conntrack_lines(gw, f"sport={sport}") == []
    entries = conntrack_lines(sandbox.chassis[arrival.vm.chassis], f"sport={sport},")
    assert any(f"dst={VIP}" in e and f"src={arrival.vm.ip}" in e for e in entries), entries


def test_reply_leaves_from_the_vip(sandbox, topo, lb1):
    sport = 41002
    send_syn(sandbox, topo, VIP, sport)
    arrival = find_arrival(sandbox, topo, topo.client_ip, sport)
    assert arrival is not None
    pkt = reply_from(sandbox, topo, arrival, sport)
    assert P.ip(pkt).src == VIP and P.l4(pkt).sport == 80
    assert pkt.src == topo.dgp_mac and pkt.dst == topo.client_mac
    assert conntrack_lines(sandbox.chassis["gw1"], f"sport={sport}") == []


def test_backend_serving_two_vips_replies_from_each(sandbox, topo, lb1):
    vip2 = "172.16.0.101"
    create_lb(sandbox, "lb2", f"{vip2}:80", ["10.0.0.11:8080"])
    wait_lb_ready(sandbox, "lb2", f"{vip2}:80", 1, topo=topo)
    # Find a client port that lb1 sends to vm1 too, so vm1 holds both flows at once.
    sport = None
    for candidate in range(42000, 42064):
        send_syn(sandbox, topo, VIP, candidate)
        arrival = find_arrival(sandbox, topo, topo.client_ip, candidate)
        if arrival is not None and arrival.vm.name == "vm1":
            sport = candidate
            break
    assert sport is not None, "no client port of 64 hashed to vm1"
    vm1 = topo.vm("vm1")

    def syns_at_vm1():
        return [p for p in sandbox.chassis[vm1.chassis].sent("vm1")
                if P.is_tcp(p, "S") and P.ip(p).src == topo.client_ip]
    # lb1's SYN from `sport` (a SYN of an earlier candidate may also have landed late).
    lb1_syn = [p for p in syns_at_vm1() if P.l4(p).sport == sport][-1]
    known = len(syns_at_vm1())
    send_syn(sandbox, topo, vip2, sport)
    # lb2's SYN is the next one; conntrack may remap its source port (the backend side
    # of both connections would otherwise be the same tuple).
    lb2_syn = wait_until(lambda: syns_at_vm1()[known:], 3, 0.02, "lb2's SYN at vm1")[0]
    syns = [lb1_syn, lb2_syn]
    seen = len(sandbox.client_received())
    for syn in syns:
        sandbox.chassis[vm1.chassis].inject("vm1", P.tcp_synack(
            vm1.mac, topo.router_port_mac, vm1.ip, topo.client_ip, 8080, P.l4(syn).sport))

    def replies():
        got = [p for p in sandbox.client_received()[seen:] if P.is_tcp(p, "SA")]
        return got if len(got) >= 2 else None
    got = wait_until(replies, 3, 0.02, "two SYN-ACKs at the client")
    assert {P.ip(p).src for p in got} == {VIP, vip2}
    assert all(P.l4(p).sport == 80 and P.l4(p).dport == sport for p in got)


def test_backend_changes_keep_group_and_bucket_ids(sandbox, topo, lb1):
    gw = sandbox.chassis["gw1"]
    before = our_groups(gw)[lb1]
    _, buckets = lb_ids(sandbox, "lb1")
    assert set(before.buckets) == set(buckets.values())
    sandbox.nbctl("set", "load_balancer", "lb1",
                  f'vips:"{VIP_KEY}"="10.0.0.11:8080,10.0.0.13:8080"')
    kept = {buckets["10.0.0.11:8080"], buckets["10.0.0.13:8080"]}
    after = wait_group(gw, lb1, kept)
    for bid in kept:
        assert after.buckets[bid] == before.buckets[bid]
    sandbox.nbctl("set", "load_balancer", "lb1", f'vips:"{VIP_KEY}"="{",".join(BACKENDS)}"')
    _, buckets2 = wait_until(lambda: (ids := lb_ids(sandbox, "lb1"))[1].keys() >= {
        "10.0.0.12:8080"} and ids, 10, 0.05, "a bucket id for the re-added backend")
    assert {k: buckets2[k] for k in ("10.0.0.11:8080", "10.0.0.13:8080")} == {
        k: buckets[k] for k in ("10.0.0.11:8080", "10.0.0.13:8080")}
    wait_group(gw, lb1, set(buckets2.values()))
    assert lb1 in our_groups(gw)  # same group id throughout


def test_agent_never_touches_ovn_state(sandbox, topo, lb1):
    """Drain and undrain change only our group: every OVN flow and group stays as it was."""
    gw = sandbox.chassis["gw1"]
    _, buckets = lb_ids(sandbox, "lb1")
    flows_before, groups_before = ovn_state(gw)
    sandbox.nbctl("set", "load_balancer", "lb1",
                  'external_ids:"statelesslb:drain"="[\\"10.0.0.12:8080\\"]"')
    wait_group(gw, lb1, set(buckets.values()) - {buckets["10.0.0.12:8080"]})
    sandbox.nbctl("remove", "load_balancer", "lb1", "external_ids", '"statelesslb:drain"')
    wait_group(gw, lb1, set(buckets.values()))
    flows_after, groups_after = ovn_state(gw)
    assert groups_after == groups_before
    assert flows_after == flows_before


def test_ovn_controller_restart_on_gateway(sandbox, topo, lb1):
    gw = sandbox.chassis["gw1"]
    agent_pid = sandbox.agents["gw1"]["pid"]
    expected = sorted(our_flows(gw))
    _, buckets = lb_ids(sandbox, "lb1")
    gw.restart_ovn_controller()
    restarted = time.monotonic()
    wait_until(lambda: sorted(our_flows(gw)) == expected and lb1 in our_groups(gw),
               5, 0.01, "our flows and group back on gw1")
    back_after = time.monotonic() - restarted
    assert back_after < 1.0, f"flows came back {back_after:.2f}s after the restart"
    assert set(our_groups(gw)[lb1].buckets) == set(buckets.values())
    assert sandbox.processes["gw1/statelesslb-agent"].pid == agent_pid
    sport = 41003
    send_syn(sandbox, topo, VIP, sport)
    assert find_arrival(sandbox, topo, topo.client_ip, sport) is not None


def test_udp_vip(sandbox, topo, lb1):
    create_lb(sandbox, "lbu", "172.16.0.102:53", ["10.0.0.12:5353", "10.0.0.13:5353"], "udp")
    wait_lb_ready(sandbox, "lbu", "172.16.0.102:53", 2, topo=topo)
    sandbox.client_inject(P.udp(topo.client_mac, topo.dgp_mac, topo.client_ip,
                                "172.16.0.102", 43001, 53))
    arrival = find_arrival(sandbox, topo, topo.client_ip, 43001, proto="udp")
    assert arrival is not None and arrival.vm.name in ("vm2", "vm3")
    assert P.l4(arrival.packet).dport == 5353 and P.ip(arrival.packet).dst == arrival.vm.ip
    assert conntrack_lines(sandbox.chassis["gw1"], "sport=43001") == []


def _vip_dp_flows(chassis, vip: str) -> list[str]:
    return [f for f in chassis.dump_dp_flows().splitlines() if f"dst={vip}," in f]


def test_hash_classes_bound_the_gateways_datapath_flows(sandbox, topo, lb1):
    """256 new connections from 16 clients: with 5-tuple hashing the gateway makes a
    datapath flow for each; with 4 bits of classes (2 client bits, 2 port bits) the whole
    of OVN's gateway pipeline leaves the other bits wildcarded: at most 16 flows."""
    gw = sandbox.chassis["gw1"]
    lbs = {"172.16.0.105": "5-tuple", "172.16.0.106": "client-bits:2,port-bits:2"}
    for n, (vip, hashing) in enumerate(lbs.items()):
        create_lb(sandbox, f"lbh{n}", f"{vip}:80", BACKENDS)
        sandbox.nbctl("set", "load_balancer", f"lbh{n}", f'options:stateless_hash="{hashing}"')
        wait_lb_ready(sandbox, f"lbh{n}", f"{vip}:80", 3, topo=topo)
    # Clients 172.16.0.64-79 share every address bit OVN's own flows look at (the
    # router's 172.16.0.1 differs from them in the /26 prefix already).
    clients = [f"172.16.0.{64 + i}" for i in range(16)]
    for vip in lbs:
        for src in clients:
            for sport in range(42000, 42016):
                send_syn(sandbox, topo, vip, sport, src_ip=src)
    full = wait_until(lambda: len(f := _vip_dp_flows(gw, "172.16.0.105")) >= 250 and f,
                      10, 0.1, "the 5-tuple VIP's datapath flows")
    bounded = _vip_dp_flows(gw, "172.16.0.106")
    assert len(full) <= 256
    assert 1 <= len(bounded) <= 16, "\n".join(bounded)
    # Each bounded flow leaves all but the hashed source-port bits wildcarded.
    for line in bounded:
        assert re.search(r"tcp\(src=\d+/0x6,dst=80\)", line), line
    for n in range(len(lbs)):
        sandbox.nbctl("lb-del", f"lbh{n}")
    wait_until(lambda: not any(vip in f for vip in lbs for c in sandbox.chassis.values()
                               for f in our_flows(c)), 10, 0.05, "lbh0/lbh1's flows removed")


@pytest.mark.parametrize("name,setup,needle", [
    ("bad-backend", lambda sb: _raw_lb(sb, "bad-backend", "172.16.0.110:80",
                                        "10.0.0.99:8080", "lr0"), "10.0.0.99"),
    ("bad-vip", lambda sb: _raw_lb(sb, "bad-vip", "172.16.0.300:80", "10.0.0.11:8080",
                                    "lr0"), "172.16.0.300"),
    ("no-dgp", lambda sb: _raw_lb(sb, "no-dgp", "172.16.0.111:80", "10.0.0.11:8080",
                                   "lr-nodgp"), "gateway"),
    ("bad-hash", lambda sb: _raw_lb(sb, "bad-hash", "172.16.0.112:80", "10.0.0.11:8080",
                                     "lr0", 'options:stateless_hash="client-bits:20"'),
     "options:stateless_hash='client-bits:20' is not 5-tuple or client-bits:N,port-bits:M"),
])
def test_bad_input_is_reported_and_isolated(sandbox, topo, lb1, name, setup, needle):
    if name == "no-dgp" and "lr-nodgp" not in sandbox.nbctl("lr-list"):
        sandbox.nbctl("lr-add", "lr-nodgp")
    flows_before = {c: sorted(our_flows(sandbox.chassis[c])) for c in sandbox.chassis}
    setup(sandbox)
    status = wait_until(lambda: (s := lb_status(sandbox, name)) and s.startswith("error")
                        and s, 10, 0.05, f"an error status on {name}")
    assert needle in status, status
    # The agent says so in its log...
    log = sandbox.agents["gw1"]["log"]
    wait_until(lambda: name in open(log).read(), 5, 0.05, f"a log line about {name}")
    # ...installs nothing for it, and keeps serving lb1.
    time.sleep(0.3)
    for c, flows in flows_before.items():
        assert sorted(our_flows(sandbox.chassis[c])) == flows
    sport = 41100 + len(name)
    send_syn(sandbox, topo, VIP, sport)
    assert find_arrival(sandbox, topo, topo.client_ip, sport) is not None
    sandbox.nbctl("lb-del", name)


def _raw_lb(sb, name, vip, backends, router, *extra):
    # ovn-nbctl lb-add validates; `create` writes whatever an API client could.
    uuid = sb.nbctl("create", "load_balancer", f"name={name}", "protocol=tcp",
                    f'vips:"{vip}"="{backends}"', "options:stateless_mode=mac",
                    *extra).strip()
    sb.nbctl("add", "logical_router", router, "load_balancer", uuid)


def test_unmarking_restores_ovn_load_balancing(sandbox, topo, lb1):
    gw = sandbox.chassis["gw1"]
    sandbox.nbctl("remove", "load_balancer", "lb1", "options", "stateless_mode")
    wait_until(lambda: lb1 not in our_groups(gw), 10, 0.02, "lb1's group removed")
    assert not any(VIP in f for f in our_flows(gw))
    assert "statelesslb:status" not in sandbox.nbctl("get", "load_balancer", "lb1",
                                                      "external_ids")
    sport = 41200
    send_syn(sandbox, topo, VIP, sport)
    assert find_arrival(sandbox, topo, topo.client_ip, sport) is not None
    # OVN's own LB is back: conntrack on the gateway again.
    assert conntrack_lines(gw, f"sport={sport}") != []
    # OVN's own groups (its LB's among them) stay below our range.
    ovn_flows, _ = ovn_state(gw)
    ovn_groups = {int(g) for flow in ovn_flows for g in re.findall(r"group:(\d+)", flow)}
    assert ovn_groups, "no flow of OVN's uses a group: its LB is not back"
    assert all(gid < GROUP_BASE for gid in ovn_groups), sorted(ovn_groups)


def test_a_backend_change_skips_the_debounce_a_late_attach_does_not(sandbox, topo, lb1):
    """With a 2 s debounce: a backend change of a valid LB is applied without waiting for
    it (all that changed is an LB row that validates as it is, then the NB writer's own
    update of it); an LB created, then attached to its router in another transaction,
    waits for the debounce and so never shows the error of the moment in between."""
    debounce = 2.0
    for chassis in sandbox.chassis.values():
        agents.stop_agent(sandbox, chassis)
    try:
        agents.start_agents(sandbox, extra_config=f"debounce = {debounce}\n")
        agents.wait_agents_ready(sandbox)
        gw = sandbox.chassis["gw1"]
        create_lb(sandbox, "lbq", "172.16.0.121:80", BACKENDS)
        sandbox.nbctl("set", "load_balancer", "lbq", "options:stateless_persistence=hash")
        gid = wait_lb_ready(sandbox, "lbq", "172.16.0.121:80", 3, topo=topo)
        _vips, ids = lb_ids(sandbox, "lbq")
        for members in (BACKENDS[:2], BACKENDS):
            start = time.monotonic()
            sandbox.nbctl("set", "load_balancer", "lbq",
                          f'vips:"172.16.0.121:80"="{",".join(members)}"')
            wait_group(gw, gid, {ids[b] for b in members}, timeout=10)
            took = time.monotonic() - start
            assert took < debounce * 0.75, f"a backend change took {took:.2f} s"
        # Created, then attached: in between it is on no router.
        start = time.monotonic()
        _raw_lb(sandbox, "late-attach", "172.16.0.122:80", "10.0.0.11:8080", "lr0",
                "options:stateless_persistence=hash")
        seen = []
        deadline = time.monotonic() + debounce * 3
        while time.monotonic() < deadline and (not seen or seen[-1] is None
                                               or not seen[-1].startswith("ok")):
            seen.append(lb_status(sandbox, "late-attach"))
        took = time.monotonic() - start
        assert seen[-1] is not None and seen[-1].startswith("ok"), seen
        assert not any(s is not None and s.startswith("error") for s in seen), seen
        assert took >= debounce, f"the new LB was applied after {took:.2f} s"
        sandbox.nbctl("lb-del", "late-attach")
        sandbox.nbctl("lb-del", "lbq")
    finally:
        for chassis in sandbox.chassis.values():
            agents.stop_agent(sandbox, chassis)
        agents.start_agents(sandbox)
        agents.wait_agents_ready(sandbox)
