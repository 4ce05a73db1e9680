"""The sandbox itself, with real daemons and real packets on the dummy datapath."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from statelesslb.sandbox import (
    BinaryNotFoundError,
    DaemonFailedError,
    RunDirInUseError,
    Sandbox,
    SandboxError,
    Topology,
    processes,
    wait_until,
)
from statelesslb.sandbox import packets as P

pytestmark = pytest.mark.sandbox

VIP = "172.16.0.100"


def wait_packets(fetch: Callable[[], list[Any]], match: Callable[[Any], bool], what: str,
                 debug: Callable[[], str], timeout: float = 10.0) -> list[Any]:
    """Packets from fetch() that match; on timeout fail with debug() (a trace) attached."""
    try:
        return wait_until(lambda: [p for p in fetch() if match(p)], timeout, 0.05, what)
    except TimeoutError as exc:
        try:
            info = debug()
        except Exception as dexc:  # noqa: BLE001 - the trace is a bonus, keep the failure
            info = f"(debug failed: {dexc})"
        seen = "\n".join(repr(x) if isinstance(x, tuple) else x.summary() for x in fetch())
        raise AssertionError(f"{exc}\n--- seen:\n{seen}\n--- debug:\n{info}") from None


def client_trace(sbx: Sandbox, topo: Topology, pkt: Any) -> str:
    """ofproto/trace of a client packet on the resident gateway, as it enters br-int."""
    gw = sbx.chassis[topo.gateways[0]]
    return gw.trace(f"in_port={topo.localnet_patch}", pkt)


def roundtrip(sbx: Sandbox, topo: Topology, sport: int, vm_name: str = "vm1") -> None:
    """Client SYN reaches the VM through the gateway and the VM's SYN-ACK gets back."""
    vm = topo.vm(vm_name)
    hv = sbx.chassis[vm.chassis]
    syn = P.tcp_syn(topo.client_mac, topo.dgp_mac, topo.client_ip, vm.ip, sport, 80)
    sbx.client_inject(syn)
    wait_packets(lambda: hv.sent(vm.name), lambda p: P.is_tcp(p, "S", sport=sport),
                 f"SYN from the client at {vm.name}", lambda: client_trace(sbx, topo, syn))
    synack = P.tcp_synack(vm.mac, topo.router_port_mac, vm.ip, topo.client_ip, 80, sport)
    hv.inject(vm.name, synack)
    wait_packets(sbx.client_received, lambda p: P.is_tcp(p, "SA", dport=sport),
                 f"SYN-ACK from {vm.name} at the client",
                 lambda: hv.trace(f"in_port={vm.name}", synack))


def test_client_syn_routed_through_gateway_and_synack_back(sandbox: Sandbox,
                                                           topo: Topology) -> None:
    gw1, gw2 = sandbox.chassis["gw1"], sandbox.chassis["gw2"]
    vm1 = topo.vm("vm1")
    assert vm1.chassis == "hv1" and topo.vm("vm2").chassis == "hv2"
    hv1 = sandbox.chassis[vm1.chassis]

    syn = P.tcp_syn(topo.client_mac, topo.dgp_mac, topo.client_ip, vm1.ip, 40000, 80)
    sandbox.client_inject(syn)
    got = wait_packets(lambda: hv1.sent(vm1.name), lambda p: P.is_tcp(p, "S", sport=40000),
                       "SYN from the client at vm1", lambda: client_trace(sandbox, topo, syn))
    pkt = got[0]
    trace = client_trace(sandbox, topo, syn)
    assert pkt[IP].src == topo.client_ip and pkt[IP].dst == vm1.ip, trace
    assert pkt[IP].ttl == 63, trace
    assert pkt[Ether].src == topo.router_port_mac and pkt[Ether].dst == vm1.mac, trace
    # Routed on gw1 (the router rewrite happened there), dropped on the standby gw2.
    rewrite = f"set(eth(src={topo.router_port_mac},dst={vm1.mac}))"
    assert rewrite in gw1.dump_dp_flows(), trace
    assert rewrite not in gw2.dump_dp_flows()

    synack = P.tcp_synack(vm1.mac, topo.router_port_mac, vm1.ip, topo.client_ip, 80, 40000)
    hv1.inject(vm1.name, synack)
    got = wait_packets(sandbox.client_received, lambda p: P.is_tcp(p, "SA", dport=40000),
                       "SYN-ACK from vm1 at the client",
                       lambda: hv1.trace(f"in_port={vm1.name}", synack))
    pkt = got[0]
    assert pkt[IP].src == vm1.ip and pkt[IP].dst == topo.client_ip
    assert pkt[IP].ttl == 63
    assert pkt[Ether].src == topo.dgp_mac and pkt[Ether].dst == topo.client_mac
    assert pkt[TCP].sport == 80 and pkt[TCP].ack == 1001


def test_ovn_load_balancer_baseline_keeps_conntrack_on_gateway(sandbox: Sandbox,
                                                               topo: Topology) -> None:
    gw1, gw2 = sandbox.chassis["gw1"], sandbox.chassis["gw2"]
    backends = [topo.vm("vm1"), topo.vm("vm2")]
    sandbox.nbctl("lb-add", "lb0", f"{VIP}:80", ",".join(f"{b.ip}:8080" for b in backends),
                  "tcp")
    sandbox.nbctl("lr-lb-add", topo.router, "lb0")
    try:
        sandbox.wait_flows_installed()
        syn = P.tcp_syn(topo.client_mac, topo.dgp_mac, topo.client_ip, VIP, 41000, 80)
        sandbox.client_inject(syn)

        def at_backends() -> list[Any]:
            return [(b, p) for b in backends for p in sandbox.chassis[b.chassis].sent(b.name)]

        got = wait_packets(at_backends, lambda bp: P.is_tcp(bp[1], "S", sport=41000),
                           "LB SYN at a backend", lambda: client_trace(sandbox, topo, syn))
        trace = client_trace(sandbox, topo, syn)
        assert len(got) == 1, trace
        backend, pkt = got[0]
        assert pkt[IP].dst == backend.ip and pkt[TCP].dport == 8080, trace
        assert pkt[IP].src == topo.client_ip and pkt[Ether].dst == backend.mac, trace
        assert "type=select" in gw1.dump_groups()

        entries = [line for line in gw1.conntrack().splitlines()
                   if f"dst={VIP}" in line and "sport=41000" in line]
        assert entries, gw1.conntrack()
        assert f"reply=(src={backend.ip}" in entries[0] and "dport=80" in entries[0]
        assert f"dst={VIP}" not in gw2.conntrack()

        # The backend answers from itself; gateway conntrack un-DNATs it to the VIP.
        synack = P.tcp_synack(backend.mac, topo.router_port_mac, backend.ip, topo.client_ip,
                              8080, 41000)
        sandbox.chassis[backend.chassis].inject(backend.name, synack)
        got = wait_packets(sandbox.client_received, lambda p: P.is_tcp(p, "SA", dport=41000),
                           "LB SYN-ACK at the client",
                           lambda: gw1.conntrack())
        assert got[0][IP].src == VIP and got[0][TCP].sport == 80
    finally:
        sandbox.nbctl("--if-exists", "lr-lb-del", topo.router, "lb0")
        sandbox.nbctl("--if-exists", "lb-del", "lb0")
        sandbox.wait_flows_installed()


def test_restarts_keep_ports_and_tunnels_working(sandbox: Sandbox, topo: Topology) -> None:
    hv1, gw1 = sandbox.chassis["hv1"], sandbox.chassis["gw1"]
    old = hv1.pid_of("ovs-vswitchd")
    hv1.restart_vswitchd()
    assert hv1.pid_of("ovs-vswitchd") != old
    assert sandbox.is_running("hv1/ovs-vswitchd") and not processes.pid_alive(old)
    roundtrip(sandbox, topo, 42000)

    old = gw1.pid_of("ovn-controller")
    gw1.restart_ovn_controller()
    assert gw1.pid_of("ovn-controller") != old
    assert gw1.controller_appctl("connection-status").strip() == "connected"
    roundtrip(sandbox, topo, 42001)

    # A gateway's vswitchd: BFD drops, the DGP fails over to gw2 and comes back.
    gw1.restart_vswitchd()
    roundtrip(sandbox, topo, 42002)
    manifest = json.loads(sandbox.manifest_path.read_text())
    assert manifest["chassis"]["gw1"]["pids"]["ovs-vswitchd"] == gw1.pid_of("ovs-vswitchd")


def test_manifest_describes_the_sandbox(sandbox: Sandbox) -> None:
    doc = json.loads(sandbox.manifest_path.read_text())
    assert doc["nb"] == sandbox.nb and doc["sb"] == sandbox.sb
    assert set(doc["chassis"]) == {"gw1", "gw2", "hv1", "hv2"}
    gw1 = doc["chassis"]["gw1"]
    assert gw1["role"] == "gateway" and doc["chassis"]["hv1"]["role"] == "hypervisor"
    assert gw1["br_int"] == f"unix:{gw1['rundir']}/br-int.mgmt"
    assert set(gw1["pids"]) == {"ovsdb-server", "ovs-vswitchd", "ovn-controller"}
    assert doc["external"]["client"]["mac"] == sandbox.client_mac
    assert doc["agents"] == {}
    # Stock tools work from the manifest alone.
    out = subprocess.run(["ovs-ofctl", "-O", "OpenFlow15", "dump-flows", gw1["br_int"],
                          "table=0"], capture_output=True, text=True, check=True).stdout
    assert "actions=" in out
    out = subprocess.run(["ovs-appctl", "-t", gw1["ovn_controller_ctl"], "connection-status"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "connected"
    status = sandbox.status()
    assert status["running"]
    assert all(c["registered"] for c in status["chassis"].values())


def test_errors_are_clear(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RunDirInUseError, match="in use"):
        Sandbox(sandbox.run_dir, 1, 1).up()
    assert sandbox.status()["running"]

    bogus = sandbox.run_dir / "bogus"
    bogus.mkdir()
    argv = processes.ovs_daemon_argv(sandbox.bin["ovsdb-server"], bogus, f"{bogus}/none.db")
    with pytest.raises(DaemonFailedError, match="bogus/ovsdb-server failed to start"):
        sandbox.start_process("bogus/ovsdb-server", argv, pidfile=f"{bogus}/ovsdb-server.pid",
                              log=f"{bogus}/ovsdb-server.log")
    assert "bogus/ovsdb-server" not in sandbox.processes

    with pytest.raises(SandboxError, match="too long for unix sockets"):
        Sandbox(Path("/tmp") / ("x" * 100)).check_paths()

    monkeypatch.setattr(processes, "_TOOLS", (*processes._TOOLS, "no-such-ovs-tool"))
    with pytest.raises(BinaryNotFoundError, match="scripts/setup"):
        processes.Binaries.find()


def test_start_process_without_detach_stops_its_whole_group(sandbox: Sandbox) -> None:
    # The way agents are started: Popen in a session of its own, children included.
    d = sandbox.run_dir / "sleeper"
    d.mkdir()
    rec = sandbox.start_process("sleeper/sh", ["sh", "-c", "sleep 300 & exec sleep 301"],
                                detach=False, log=str(d / "sh.log"),
                                ready=lambda: len(_group_members(sandbox, "sleeper/sh")) == 2)
    members = _group_members(sandbox, "sleeper/sh")
    assert rec.pgid == rec.pid and rec.pid in members
    assert sandbox.is_running("sleeper/sh")
    assert sandbox.stop_process("sleeper/sh")
    assert not [p for p in members if processes.pid_alive(p)]
    assert not sandbox.is_running("sleeper/sh")
    assert sandbox.stop_process("sleeper/sh") is False


def _group_members(sandbox: Sandbox, name: str) -> list[int]:
    return list(processes.live_group_members(sandbox.processes[name].pgid))


def test_down_leaves_no_process(sandbox_run_dir: Path) -> None:
    sbx = Sandbox(sandbox_run_dir, gateways=1, hypervisors=1)
    with sbx:
        pids = dict(sbx.pids)
        assert len(pids) == 11 and all(processes.pid_alive(p) for p in pids.values())
        assert sbx.timings["registered"] > 0
    alive = {n: p for n, p in pids.items() if processes.pid_alive(p)}
    assert not alive
    recorded = json.loads((sandbox_run_dir / "sandbox.json").read_text())["pids"]
    assert recorded == pids
    assert sbx.down() == []


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "statelesslb.sandbox.cli", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_up_status_down(sandbox_run_dir: Path) -> None:
    d = str(sandbox_run_dir)
    r = _cli("up", "--dir", d, "--gateways", "1", "--hypervisors", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"export OVN_NB_DB=unix:{d}/nb/nb.sock",
                                     f"export OVN_SB_DB=unix:{d}/sb/sb.sock"]

    r = _cli("status", "--dir", d, "--format", "json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["running"] and set(st["chassis"]) == {"gw1", "hv1"}
    assert all(c["registered"] for c in st["chassis"].values())
    pids = json.loads((sandbox_run_dir / "sandbox.json").read_text())["pids"]
    assert pids and all(processes.pid_alive(p) for p in pids.values())

    r = _cli("up", "--dir", d)
    assert r.returncode == 1 and "in use" in r.stderr and "Traceback" not in r.stderr

    r = _cli("down", "--dir", d)
    assert r.returncode == 0, r.stderr
    assert not [p for p in pids.values() if processes.pid_alive(p)]

    r = _cli("down", "--dir", d)
    assert r.returncode == 0 and "nothing runs" in r.stderr
    r = _cli("status", "--dir", d)
    assert r.returncode == 3 and "NOT running" in r.stdout


def test_cli_up_with_agents(sandbox_run_dir: Path) -> None:
    """`up --agents`: an agent per chassis, in the manifest, answering statelesslb-ctl,
    and `down` stops them with everything else."""
    d = str(sandbox_run_dir)
    r = _cli("up", "--dir", d, "--gateways", "1", "--hypervisors", "1", "--topology",
             "--vms", "1", "--agents")
    pids: list[int] = []
    try:
        assert r.returncode == 0, r.stderr
        doc = json.loads((sandbox_run_dir / "sandbox.json").read_text())
        assert set(doc["agents"]) == {"gw1", "hv1"}
        pids = [a["pid"] for a in doc["agents"].values()]
        assert all(processes.pid_alive(p) for p in pids)
        for name, info in doc["agents"].items():
            assert f"statelesslb-ctl --socket {info['ctl']} status" in r.stderr
            ctl = subprocess.run([sys.executable, "-m", "statelesslb.cli.ctl", "--socket",
                                  info["ctl"], "--format", "json", "status"],
                                 capture_output=True, text=True, timeout=30, check=False)
            assert ctl.returncode == 0, ctl.stderr
            status = json.loads(ctl.stdout)
            assert status["chassis"] == name and status["last_full_sync"]
    finally:
        r = _cli("down", "--dir", d)
    assert r.returncode == 0, r.stderr
    assert not [p for p in pids if processes.pid_alive(p)]


def test_read_pcap_ignores_a_partial_last_record(tmp_path: Path) -> None:
    pkts = [P.tcp_syn("f0:00:00:00:00:01", "00:00:00:00:ff:01", "172.16.0.50", "10.0.0.11",
                      1000 + i, 80) for i in range(2)]
    data = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    for p in pkts:
        raw = bytes(p)
        data += struct.pack("<IIII", 0, 0, len(raw), len(raw)) + raw
    path = tmp_path / "x.pcap"
    path.write_bytes(data[:-5])
    got = P.read_pcap(path)
    assert len(got) == 1 and got[0][TCP].sport == 1000
    path.write_bytes(data)
    assert [p[TCP].sport for p in P.read_pcap(path)] == [1000, 1001]
    assert P.read_pcap(tmp_path / "missing.pcap") == []
    v6 = P.tcp_syn("f0:00:00:00:00:01", "00:00:00:00:ff:01", "fd00::50", "fd00::11", 1, 80)
    assert v6.haslayer("IPv6") and P.to_hex(v6) == bytes(v6).hex()
