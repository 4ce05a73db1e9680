"""The agent's exposure: its control socket, network listeners, and SSL to NB/SB."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from statelesslb.sandbox import agents
from statelesslb.sandbox.processes import wait_until
from statelesslb.sandbox.traffic import create_lb, find_arrival, send_syn, wait_lb_ready

TOPOLOGY_KWARGS = {"vms": 2}


@pytest.fixture(scope="module")
def running(sandbox, topo):
    agents.start_agents(sandbox)
    agents.wait_agents_ready(sandbox)
    return sandbox


def test_control_socket_is_private(running):
    for info in running.agents.values():
        mode = stat.S_IMODE(os.stat(info["ctl"]).st_mode)
        assert mode == 0o600, oct(mode)


def test_flow_monitor_socket_is_private_and_left_by_no_dead_agent(running):
    """ovs-ofctl monitor's control socket takes `ofctl/send` (any OpenFlow message to
    br-int): it sits in a 0700 directory of the agent's run dir, and an agent killed
    with SIGKILL leaves nothing behind once the next one starts."""
    info = running.agents["hv1"]
    run_dir = Path(info["ctl"]).parent
    mine = run_dir / f"statelesslb-monitor.{info['pid']}"
    wait_until(lambda: (mine / "monitor.ctl").exists(), 10, 0.05, "the monitor's socket")
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700
    old_pid = info["pid"]
    os.kill(old_pid, 9)
    wait_until(lambda: not running.processes["hv1/statelesslb-agent"].running(), 5, 0.01,
               "the agent to die")
    assert mine.exists()     # SIGKILL: no chance to clean up
    new = agents.start_agent(running, running.chassis["hv1"])
    assert new["pid"] != old_pid
    assert not mine.exists()
    assert (run_dir / f"statelesslb-monitor.{new['pid']}").is_dir()


def _socket_inodes(pid: int, *, may_exit: bool = False) -> set[str]:
    """Inodes of pid's sockets; a short-lived child (an ovs-ofctl run) may exit meanwhile."""
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except FileNotFoundError:
        if may_exit:
            return inodes
        raise
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def test_agent_listens_on_no_network_port(running):
    """No TCP/UDP socket of the agent (or its children) is listening or bound."""
    for name, info in running.agents.items():
        children = [int(p) for p in subprocess.run(
            ["pgrep", "-P", str(info["pid"])], capture_output=True, text=True).stdout.split()]
        inodes = _socket_inodes(info["pid"]).union(
            *(_socket_inodes(p, may_exit=True) for p in children))
        for table in ("tcp", "tcp6", "udp", "udp6"):
            for line in Path(f"/proc/{info['pid']}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                state, inode = fields[3], fields[9]
                # 0A = LISTEN for TCP; any UDP socket would be a bound endpoint.
                if inode in inodes and (table.startswith("udp") or state == "0A"):
                    pytest.fail(f"{name}'s agent has a {table} socket in state {state}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ssl_to_nb_and_sb_with_the_sandboxes_own_ca(running, topo, tmp_path):
    sb = running
    pki = tmp_path / "pki"
    subprocess.run(["ovs-pki", f"--dir={pki}", "init", "--force"], check=True,
                   capture_output=True, cwd=tmp_path)
    for who in ("db", "agent"):
        subprocess.run(["ovs-pki", f"--dir={pki}", "req+sign", who, "controller"], check=True,
                       capture_output=True, cwd=tmp_path)
    ca = pki / "controllerca" / "cacert.pem"
    ports = {}
    for db in ("nb", "sb"):
        ports[db] = _free_port()
        sb.stop_process(f"{db}/ovsdb-server")
        sb.start_again(f"{db}/ovsdb-server", [
            f"--private-key={tmp_path}/db-privkey.pem", f"--certificate={tmp_path}/db-cert.pem",
            f"--ca-cert={ca}", f"--remote=pssl:{ports[db]}:127.0.0.1"])
    gw = sb.chassis["gw1"]
    agents.stop_agent(sb, gw)
    agents.start_agent(sb, gw, ovn={
        "ovn_nb_connection": f"ssl:127.0.0.1:{ports['nb']}",
        "ovn_sb_connection": f"ssl:127.0.0.1:{ports['sb']}",
        "ovn_nb_private_key": f"{tmp_path}/agent-privkey.pem",
        "ovn_nb_certificate": f"{tmp_path}/agent-cert.pem",
        "ovn_nb_ca_cert": str(ca),
        "ovn_sb_private_key": f"{tmp_path}/agent-privkey.pem",
        "ovn_sb_certificate": f"{tmp_path}/agent-cert.pem",
        "ovn_sb_ca_cert": str(ca),
    })
    wait_until(lambda: all(json.loads(agents.agent_ctl(sb, "gw1", "status"))
                           ["connections"].values()), 30, 0.2, "gw1's agent on SSL")
    log = Path(sb.agents["gw1"]["log"]).read_text()
    assert f"nb: (re)connected to ssl:127.0.0.1:{ports['nb']}" in log
    assert f"sb: (re)connected to ssl:127.0.0.1:{ports['sb']}" in log
    # It works end to end over SSL: the (SSL) agent on the gateway installs a new LB.
    create_lb(sb, "lbssl", "172.16.0.140:80", ["10.0.0.11:8080", "10.0.0.12:8080"])
    wait_lb_ready(sb, "lbssl", "172.16.0.140:80", 2, topo=topo)
    send_syn(sb, topo, "172.16.0.140", 48000)
    assert find_arrival(sb, topo, topo.client_ip, 48000) is not None
