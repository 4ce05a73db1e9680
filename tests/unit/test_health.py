"""OVN health checks (SB Service_Monitor) in the plan: a backend down leaves the gateways'
groups, keeps its bucket id and comes back with it; nothing else moves."""

from __future__ import annotations

import dataclasses

from statelesslb.nb.model import SbView
from statelesslb.plan.planner import IncrementalPlanner, plan
from statelesslb.plan.specs import PlanConfig

from .factories import basic_topo

CONFIG = PlanConfig()
GID = CONFIG.group_id_base + 1


def with_health(snapshot, **status):
    """The snapshot with Service_Monitor statuses, e.g. vm2="offline"."""
    ips = {"vm1": "10.0.0.11", "vm2": "10.0.0.12"}
    monitors = {(ips[vm], 8080, "tcp"): st for vm, st in status.items()}
    sb = SbView(snapshot.sb.datapath_keys, snapshot.sb.port_bindings, monitors)
    return dataclasses.replace(snapshot, sb=sb)


def gateway_group(snapshot):
    return plan(snapshot, CONFIG).groups[GID]


def test_an_offline_backend_leaves_the_group_and_returns_with_its_bucket_id():
    topo = basic_topo()
    topo.assign_ids()
    snapshot = topo.snapshot("gw1")
    healthy = gateway_group(with_health(snapshot, vm1="online", vm2="online"))
    assert sorted(healthy.buckets) == [1, 2]
    assert gateway_group(snapshot).buckets == healthy.buckets   # unchecked = in the group
    for status in ("offline", "error"):
        down = gateway_group(with_health(snapshot, vm1="online", vm2=status))
        assert dict(down.buckets) == {1: healthy.buckets[1]}
    back = gateway_group(with_health(snapshot, vm1="online", vm2="online"))
    assert back == healthy
    # The backend side keeps the DNAT flows of a backend that is down: its chassis still
    # holds the connections it had.
    hv2 = topo.snapshot("hv2")
    assert plan(with_health(hv2, vm2="offline"), CONFIG).flows == plan(hv2, CONFIG).flows


def test_every_backend_down_leaves_an_empty_group_as_ovn_does():
    topo = basic_topo()
    topo.assign_ids()
    down = gateway_group(with_health(topo.snapshot("gw1"), vm1="offline", vm2="offline"))
    assert dict(down.buckets) == {}


def test_the_incremental_planner_follows_health_changes():
    topo = basic_topo()
    topo.assign_ids()
    snapshot = topo.snapshot("gw1")
    planner = IncrementalPlanner(CONFIG)
    planner.update(with_health(snapshot, vm2="online"), changed=None)
    update = planner.update(with_health(snapshot, vm2="offline"), changed=set())
    assert sorted(update.plan.groups[GID].buckets) == [1]
    assert update.groups is None or GID in update.groups
    update = planner.update(with_health(snapshot, vm2="online"), changed=set())
    assert sorted(update.plan.groups[GID].buckets) == [1, 2]
    assert update.plan == plan(with_health(snapshot, vm2="online"), CONFIG)
