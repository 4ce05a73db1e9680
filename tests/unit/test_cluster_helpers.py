"""The pure parts of the clustered sandbox and the failover checks."""

from __future__ import annotations

from statelesslb.openflow.tables import split_remotes
from statelesslb.sandbox.cluster import parse_cluster_status
from statelesslb.sandbox.failover import (
    Change,
    LockHistory,
    changed_ids,
    convergence,
    resolved_at,
)

# ovs-appctl cluster/status OVN_Northbound, OVS 3.1 (a follower).
FOLLOWER = """\
Name: OVN_Northbound
Cluster ID: f80d (f80d6415-0923-4b2b-8d93-867d73138689)
Server ID: 2515 (25156141-3f89-45db-a4d9-648d318b371b)
Address: tcp:127.0.0.1:46642
Status: cluster member
Role: follower
Term: 1
Leader: e399
Vote: unknown

Election timer: 1000
Log: [2, 6]
Entries not yet committed: 0
Entries not yet applied: 0
Connections: ->0000 <-e399 <-29a3 ->29a3
Disconnections: 0
Servers:
    e399 (e399 at tcp:127.0.0.1:46641) last msg 3 ms ago
    2515 (2515 at tcp:127.0.0.1:46642) (self)
    29a3 (29a3 at tcp:127.0.0.1:46643)
"""


def test_parse_cluster_status() -> None:
    st = parse_cluster_status(FOLLOWER)
    assert (st.server_id, st.role, st.term, st.leader, st.member, st.servers) == (
        "2515", "follower", 1, "e399", True, 3)
    candidate = FOLLOWER.replace("Role: follower", "Role: candidate").replace(
        "Leader: e399", "Leader: unknown")
    assert parse_cluster_status(candidate).leader is None


def test_split_remotes() -> None:
    assert split_remotes("unix:/a.sock,tcp:10.0.0.1:6642, ssl:[::1]:6642") == [
        "unix:/a.sock", "tcp:10.0.0.1:6642", "ssl:[::1]:6642"]
    assert split_remotes("unix:/a.sock") == ["unix:/a.sock"]


def _c(lb: str, committed: float, seen: float | None, superseded: bool = False,
       members: tuple[str, ...] = ("a",)) -> Change:
    return Change(lb, members, committed, committed, seen=seen, superseded=superseded)


def test_convergence_waits_for_every_earlier_change() -> None:
    changes = [
        _c("x", 9.0, None, superseded=True),  # before the kill, stuck, then superseded
        _c("y", 10.5, 10.7),                  # after the kill (10.0), quick: not enough
        _c("x", 11.0, 14.0),                  # x's next change: only now is x past both
        _c("z", 12.0, 12.2),
    ]
    assert resolved_at(changes) == [14.0, 10.7, 14.0, 12.2]
    conv = convergence(changes, 10.0)
    assert conv["converged"] == 4.0        # y showed at +0.7, but x only at +4
    assert abs(conv["first_change_after"] - 0.7) < 1e-9
    assert abs(conv["worst_latency"] - 5.0) < 1e-9   # x's first change: 9.0 -> 14.0


def test_convergence_unknown_while_a_change_is_outstanding() -> None:
    changes = [_c("x", 9.0, None), _c("y", 10.5, 10.7)]
    assert convergence(changes, 10.0)["converged"] is None


def test_lock_overlaps_and_writes() -> None:
    hist = LockHistory(intervals={"gw1": [(0.0, 5.0)], "gw2": [(5.0, 9.0)],
                                  "hv1": [(8.5, 10.0)]},
                       writes={"gw1": [1.0, 4.9], "gw2": [9.5]})
    assert hist.overlaps() == [("gw2", "hv1", 8.5, 9.0)]
    assert hist.writes_outside() == [("gw2", 9.5)]
    assert hist.holder_at(6.0) == "gw2"
    assert hist.first_held_after(4.0) == ("gw2", 5.0)


def test_changed_ids_skips_backends_removed_meanwhile() -> None:
    before = {"c0": ({"v": 1}, {"a": 1, "b": 2, "c": 3})}
    after = {"c0": ({"v": 1}, {"a": 1, "b": 4, "c": 5})}
    # b left and came back (a new backend): its new id is fine; c never left: not fine.
    changes = [Change("c0", ("a", "c"), 1.0, 1.0), Change("c0", ("a", "b", "c"), 2.0, 2.0)]
    assert changed_ids(before, after, changes, since=0.5) == ["c0 c: bucket id 3 -> 5"]
    assert changed_ids(before, {"c0": ({"v": 2}, {"a": 1})}) == ["c0 VIP v: id 1 -> 2"]


def test_a_write_racing_a_kill_is_inside_only_for_a_kill():
    # gw1's interval ended by a kill at 5.0: a write logged 2 ms later raced the signal.
    killed = LockHistory(intervals={"gw1": [(0.0, 5.0)]}, writes={"gw1": [5.002, 5.1]},
                         deaths={"gw1": [5.0]})
    assert killed.writes_outside() == [("gw1", 5.1)]
    # A later grant to another agent bounds the dying agent's lines instead: the server
    # grants it only once the dead agent's session closed.
    granted = LockHistory(intervals={"gw1": [(0.0, 5.0)], "gw2": [(5.02, 9.0)]},
                          writes={"gw1": [5.015, 5.03], "gw2": [5.05]},
                          deaths={"gw1": [5.0]})
    assert granted.writes_outside() == [("gw1", 5.03)]
    # The same interval ended by a logged loss of the lock: no slack.
    lost = LockHistory(intervals={"gw1": [(0.0, 5.0)]}, writes={"gw1": [5.002]})
    assert lost.writes_outside() == [("gw1", 5.002)]
