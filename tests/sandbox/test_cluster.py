"""NB and SB as 3-member RAFT clusters (issue 15): the agents follow a leader failure and
the NB writer lock moves to exactly one other agent, with churn running.

The kills are SIGKILLs of recorded pids; the figures (election, convergence, time with no
writer) are printed by bench/cluster_failover.py. Here: no change lost, every gateway's
groups equal to the NB, never two holders of the NB writer lock (from the lines each
agent's IDL thread logs as the server grants the lock or the session loses it), and no
bucket or VIP id changed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from statelesslb.sandbox import Sandbox, Topology
from statelesslb.sandbox import agents as sandbox_agents
from statelesslb.sandbox.cluster import MEMBERS
from statelesslb.sandbox.failover import FailoverRun

SANDBOX_KWARGS = {"clustered": True}
TOPOLOGY_KWARGS = {"vms": 4}
LBS = 12
RATE = 5.0   # bench/churn.py's


@pytest.fixture(scope="module")
def agents(sandbox: Sandbox, topo: Topology):
    sandbox_agents.start_agents(sandbox, debug=False)
    sandbox_agents.wait_agents_ready(sandbox)
    yield sandbox.agents
    for chassis in sandbox.chassis.values():
        sandbox_agents.stop_agent(sandbox, chassis)


def test_clusters_and_remotes(sandbox: Sandbox, agents) -> None:
    """Three members each, one leader, and every client given every member."""
    for db, cluster in sandbox.clusters.items():
        assert len(cluster.running()) == MEMBERS
        assert cluster.healthy(), db
        statuses = [cluster.status(m) for m in cluster.members]
        assert sum(s.role == "leader" for s in statuses) == 1, statuses
        assert len({s.server_id for s in statuses}) == MEMBERS
        assert len(cluster.remote.split(",")) == MEMBERS
    manifest = json.loads(sandbox.manifest_path.read_text())
    assert manifest["nb"] == sandbox.nb == sandbox.clusters["nb"].remote
    assert [m["index"] for m in manifest["clusters"]["sb"]["members"]] == [1, 2, 3]
    for name, info in agents.items():
        conf = Path(info["config"]).read_text()
        assert f"ovn_nb_connection = {sandbox.nb}\n" in conf, name
        # The agent's SB remote is ovn-controller's: external_ids:ovn-remote.
        remote = sandbox.chassis[name].vsctl("get", "Open_vSwitch", ".",
                                             "external_ids:ovn-remote").strip().strip('"')
        assert remote == sandbox.sb
    assert Sandbox.load(sandbox.run_dir).clusters["nb"].ports == sandbox.clusters["nb"].ports


def test_leader_and_writer_failover_under_churn(sandbox: Sandbox, topo: Topology,
                                                agents) -> None:
    backends = [f"{vm.ip}:8080" for vm in topo.vms]
    macs = {f"{vm.ip}:8080": vm.mac for vm in topo.vms}
    with FailoverRun(sandbox, backends, macs, lbs=LBS, rate=RATE, timeout=30) as run:
        time.sleep(2.0)   # some churn before the first kill
        nb = run.kill_db_leader("nb")
        sb = run.kill_db_leader("sb")
        writer = run.kill_writer_agent()
        time.sleep(1.0)
        result = run.finish()
    print(f"NB {nb}\nSB {sb}\nwriter {writer}\n"   # pytest -s shows the figures
          f"churn: {result['changes']} changes, {result['retried']} ovn-nbctl retries")
    assert nb["new_leader"] != nb["killed"] and sb["new_leader"] != sb["killed"]
    # Every kill was followed by convergence (kill_* wait for it), with changes
    # committed after it: the churn went on through every failover.
    for figures in (nb, sb, writer):
        assert figures["converged"] is not None
    assert result["changes"] >= RATE * 5
    # No change lost: each one reached the gateway, or a later change of its LB did.
    assert result["never_seen"] == []
    assert result["nb_problems"] == []
    assert result["group_problems"] == []
    # The writer's successor kept every id (of the backends no change removed meanwhile),
    # and the backend the churn never touches has its first id through every kill.
    assert writer["new_writer"] != writer["killed"].split()[0]
    assert writer["ids_changed"] == []
    assert result["ids_changed"] == []
    # One writer at a time, and writes only from the holder.
    assert result["lock_overlaps"] == []
    assert result["writes_outside_lock"] == []
    holders = [name for name, ivs in result["lock_intervals"].items() if ivs]
    assert len(holders) >= 2, result["lock_intervals"]
