"""The NB view the agent reads, against a real NB ovsdb-server."""

from __future__ import annotations

import subprocess

from statelesslb.agent.watchers import NB_TABLES, NbReader, Watcher, referenced_uuids
from statelesslb.sandbox.processes import wait_until


def nbctl(tool: str, remote: str, *args: str) -> str:
    return subprocess.run([tool, f"--db={remote}", *args], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_a_routers_lbs_read_without_rows_are_those_python_ovs_lists(nb_server):
    """referenced_uuids reads a router's LB set from the IDL's raw data (python-ovs
    sorts Row objects with Python comparisons): the same uuids in the same order as
    python-ovs's own conversion, after inserts and removals sent as diffs too, and for
    LBs reached through a Load_Balancer_Group."""
    remote, tool = nb_server
    nbctl(tool, remote, "lr-add", "lr0")
    for i in range(40):
        nbctl(tool, remote, "lb-add", f"lb{i}", f"10.0.0.{i + 1}:80", "10.0.1.2:8080")
    batch: list[str] = []
    for i in range(30):
        batch += ["--", "lr-lb-add", "lr0", f"lb{i}"]
    nbctl(tool, remote, *batch[1:])
    group = nbctl(tool, remote, "create", "load_balancer_group", "name=g1")
    for i in range(30, 40):
        nbctl(tool, remote, "add", "load_balancer_group", group, "load_balancer",
              nbctl(tool, remote, "get", "load_balancer", f"lb{i}", "_uuid"))
    nbctl(tool, remote, "add", "logical_router", "lr0", "load_balancer_group", group)
    watcher = Watcher("nb", "OVN_Northbound", remote, NB_TABLES, lambda *_: None)

    def sizes() -> tuple[int, int]:
        with watcher.connection.lock:   # not held while waiting: the IDL's thread takes it
            return (len(watcher.rows("Logical_Router")[0].load_balancer),
                    len(watcher.rows("Load_Balancer_Group")[0].load_balancer))
    watcher.start()
    try:
        reader = NbReader(watcher)
        for step in range(3):
            if step == 1:   # removals and an insert, each sent as a diff of the set
                nbctl(tool, remote, "lr-lb-del", "lr0", "lb3", "--", "lr-lb-del", "lr0",
                      "lb17", "--", "lr-lb-add", "lr0", "lb35")
            if step == 2:   # a group member leaves the group
                nbctl(tool, remote, "remove", "load_balancer_group", group,
                      "load_balancer", nbctl(tool, remote, "get", "load_balancer", "lb31",
                                             "_uuid"))
            wait_until(lambda counts=((30, 10), (29, 10), (29, 9))[step]: sizes() == counts,
                       10, 0.02, "the change in the IDL")
            with watcher.connection.lock:
                lbs = watcher.idl.tables["Load_Balancer"].rows
                router = watcher.rows("Logical_Router")[0]
                (lb_group,) = watcher.rows("Load_Balancer_Group")
                assert referenced_uuids(router, "load_balancer", lbs) == [
                    str(r.uuid) for r in router.load_balancer]
                assert referenced_uuids(lb_group, "load_balancer", lbs) == [
                    str(r.uuid) for r in lb_group.load_balancer]
                expected = [str(r.uuid) for r in router.load_balancer] + [
                    str(r.uuid) for r in lb_group.load_balancer
                    if r not in router.load_balancer]
            nb, _changed = reader.read(everything=True)
            (model,) = nb.routers.values()
            assert list(model.load_balancers) == expected
            assert len(expected) == (40, 38, 37)[step]
    finally:
        watcher.stop()
