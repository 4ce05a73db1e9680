"""The incremental paths give exactly what computing from scratch gives.

The agent plans and writes from change sets (the LBs whose rows changed since
it last looked). These property tests drive random sequences of NB and SB
changes through both paths and compare every step:
- IncrementalPlanner.update(snapshot, changed) == plan(snapshot), and the
  cookies and groups it names are enough for the diff to reach that plan;
- NbReconciler.reconcile(nb, changed) == reconcile_nb(every LB, nb).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from statelesslb.nb.acks import dump_installed
from statelesslb.nb.bucket_ids import NbReconciler, reconcile_nb
from statelesslb.nb.model import (
    EXT_ACTIVE,
    EXT_BUCKETS,
    EXT_DRAIN,
    EXT_PREVIOUS,
    EXT_VIP_IDS,
    MODE_OPTION,
    PERSISTENCE_OPTION,
    WINDOW_OPTION,
    NbLoadBalancer,
    NbView,
    SbPortBinding,
    SbView,
    Snapshot,
)
from statelesslb.nb.stored import dump_drain
from statelesslb.nb.topology import TopologyCache
from statelesslb.nb.validate import ValidationMemo
from statelesslb.openflow import diff
from statelesslb.openflow.ofctl import InstalledState
from statelesslb.plan.planner import IncrementalPlanner, plan
from statelesslb.plan.specs import PlanConfig

from .factories import TABLES, basic_topo
from .test_planner import STRICT_LINE, lines_of
from .test_validate import garbage, text_maps, vip_maps

VMS = ["vm1", "vm2", "vm3", "vm4"]
VM_IPS = {"vm1": "10.0.0.11", "vm2": "10.0.0.12", "vm3": "10.0.0.13", "vm4": "10.0.0.14"}
CHASSIS = ["hv1", "hv2", "gw1", None]
PERSISTENCE = [
    {PERSISTENCE_OPTION: "hash"},
    {PERSISTENCE_OPTION: "second-chance", WINDOW_OPTION: "30"},
    {PERSISTENCE_OPTION: "affinity"},
    {PERSISTENCE_OPTION: "affinity,second-chance", WINDOW_OPTION: "60"},
]
OPS = ["backends", "backends", "remove", "drain", "persistence", "write", "write",
       "tamper", "rename", "time", "bind", "unmark", "detach",
       "port", "second_switch", "router_mac", "standby", "ack", "ack"]

steps = st.lists(
    st.tuples(st.sampled_from(OPS), st.integers(0, 3), st.integers(0, 15),
              st.integers(0, 3), st.booleans()),
    min_size=1, max_size=25,
)


class World:
    """A small NB/SB that random operations change, as the databases would."""

    def __init__(self):
        self.topo = basic_topo(with_lb=False)
        self.topo.add_vif("ls0", "vm3", "50:54:00:00:00:03", "10.0.0.13", "gw1")
        self.topo.add_vif("ls0", "vm4", "50:54:00:00:00:04", "10.0.0.14", "hv1")
        self.now = 1000.0
        # Each chassis' statelesslb:installed text (acks.py); absent: no agent.
        self.installed: dict[str, str] = {}
        self._nb: NbView | None = None
        self._sb: SbView | None = None

    def populated(self) -> World:
        """Two working LBs with their ids written: every step then acts on live state."""
        self.apply("backends", 0, 0b0011, 1)
        self.apply("backends", 1, 0b1100, 2)
        self.topo.writer_pass(self.now)
        return self

    def uuid(self, index: int) -> str:
        return f"uuid-lb-lb{index}"

    def _replace(self, index: int, **changes) -> None:
        uuid = self.uuid(index)
        lb = self.topo.load_balancers.get(uuid)
        if lb is not None:
            self.topo.load_balancers[uuid] = dataclasses.replace(lb, **changes)

    def apply(self, op: str, a: int, b: int, c: int) -> None:
        topo, uuid = self.topo, self.uuid(a)
        lb = topo.load_balancers.get(uuid)
        if op == "backends":
            members = [VMS[i] for i in range(4) if b & (1 << i)] or [VMS[a]]
            backends = ",".join(f"{VM_IPS[vm]}:8080" for vm in members)
            # c == 0 puts the LB on a VIP another LB may hold too: a clash.
            vip = "172.16.0.100:80" if c == 0 else f"172.16.0.{101 + a}:80"
            if lb is None:
                topo.add_lb(f"lb{a}", {vip: backends})
                self._replace(a, options={**topo.load_balancers[uuid].options,
                                          **PERSISTENCE[(a + c) % 4]})
            else:
                self._replace(a, vips={next(iter(lb.vips), vip): backends})
        elif op == "time":
            self.now += b * 5.0
        elif op == "ack":        # a chassis publishes what it holds (or stops publishing)
            chassis = CHASSIS[b % 3]
            held = {u: json.loads(lb.external_ids[EXT_PREVIOUS])["since"]
                    for u, lb in topo.load_balancers.items()
                    if c % 2 and EXT_PREVIOUS in lb.external_ids}
            if c == 2:
                # A new mapping, as the agent's SbReader hands one on every change (the
                # writer compares the mapping it saw last by identity first).
                self.installed = {k: v for k, v in self.installed.items() if k != chassis}
            else:
                self.installed = {**self.installed, chassis: dump_installed(held)}
        elif op == "bind":       # an SB change only: a VM moves to another chassis
            old = topo.port_bindings[VMS[c]]
            topo.port_bindings[VMS[c]] = SbPortBinding(
                old.logical_port, old.tunnel_key, old.datapath_key, CHASSIS[b % 4])
        elif op in ("port", "second_switch", "router_mac", "standby"):
            self.change_topology(op, b, c)
        elif lb is None:
            return
        elif op == "remove":
            del topo.load_balancers[uuid]
            router = topo.routers[topo.router_uuid("lr0")]
            topo.routers[router.uuid] = dataclasses.replace(
                router, load_balancers=tuple(u for u in router.load_balancers if u != uuid))
        elif op == "drain":
            ext = {**lb.external_ids, EXT_DRAIN: dump_drain([f"{VM_IPS[VMS[c]]}:8080"])}
            self._replace(a, external_ids=ext)
        elif op == "persistence":
            self._replace(a, options={**lb.options, **PERSISTENCE[c]})
        elif op == "tamper":
            vip = next(iter(lb.vips))
            self._replace(a, external_ids={**lb.external_ids, EXT_VIP_IDS: f'{{"{vip}":{c + 1}}}'})
        elif op == "rename":
            self._replace(a, name=f"x{c}")
        elif op == "detach":     # off the router or back on: the LB row stays as it is
            router = topo.routers[topo.router_uuid("lr0")]
            attached = tuple(u for u in router.load_balancers if u != uuid)
            if attached == router.load_balancers:
                attached += (uuid,)
            topo.routers[router.uuid] = dataclasses.replace(router, load_balancers=attached)
        elif op == "unmark":
            options = dict(lb.options)
            if options.pop(MODE_OPTION, None) is None:
                options[MODE_OPTION] = "mac"
            self._replace(a, options=options)

    def change_topology(self, op: str, b: int, c: int) -> None:
        """NB topology changes no LB row sees: ports, switches, router ports."""
        topo = self.topo
        if op == "port":
            # A new VIF; with b odd it announces a backend's IP too: that backend
            # becomes ambiguous.
            name = f"port{len(topo.switch_ports)}"
            ip = VM_IPS[VMS[c]] if b % 2 else f"10.0.9.{len(topo.switch_ports)}"
            topo.add_vif("ls0", name, f"50:54:00:00:09:{len(topo.switch_ports):02x}", ip,
                         CHASSIS[b % 3])
        elif op == "second_switch":
            # A switch no router plugs into; it lists (or stops listing) a VM's port.
            uuid = topo.switch_uuid("ls9")
            if uuid not in topo.switches:
                topo.add_switch("ls9", 9, router=None)
            switch = topo.switches[uuid]
            ports = tuple(p for p in switch.ports if p != VMS[c])
            if ports == switch.ports:
                ports += (VMS[c],)
            topo.switches[uuid] = dataclasses.replace(switch, ports=ports)
        elif op == "router_mac":
            port = topo.router_ports["lr0-ls0"]
            topo.router_ports["lr0-ls0"] = dataclasses.replace(
                port, mac=f"00:00:00:00:ff:{2 + b % 3:02x}")
        elif op == "standby":
            port = topo.router_ports["lr0-public"]
            chassis = ("gw1",) if port.gateway_chassis != ("gw1",) else ("gw1", "hv1")
            topo.router_ports["lr0-public"] = dataclasses.replace(
                port, gateway_chassis=chassis)

    def nb(self) -> NbView:
        """Like the NbReader: the topology mappings stay the same objects while unchanged."""
        fresh = self.topo.nb()
        if self._nb is not None and (fresh.routers, fresh.router_ports, fresh.switches,
                                     fresh.switch_ports) == (
                self._nb.routers, self._nb.router_ports, self._nb.switches,
                self._nb.switch_ports):
            fresh = dataclasses.replace(self._nb, load_balancers=fresh.load_balancers)
        self._nb = fresh
        return fresh

    def sb(self) -> SbView:
        fresh = self.topo.sb()
        if self._sb is None or fresh != self._sb:
            self._sb = fresh
        return self._sb


def changed_between(before: dict, after: dict) -> frozenset[str]:
    return frozenset(u for u in before.keys() | after.keys() if before.get(u) is not after.get(u))


def assert_installed_matches(installed: InstalledState, expected_plan) -> None:
    fresh = diff.state_after(expected_plan)
    assert installed.flows == fresh.flows
    assert installed.groups == fresh.groups


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_incremental_planner_equals_planning_from_scratch(ops):
    world = World().populated()
    config = PlanConfig()
    planners = {c: IncrementalPlanner(config) for c in ("gw1", "hv1", "hv2")}
    installed = {c: InstalledState(set(), {}, {}) for c in planners}
    seen: dict = {}
    for op, a, b, c, write_all in ops:
        if op == "write":
            changes = reconcile_nb(world.topo.load_balancers.values(), world.topo.nb(),
                                   now=world.now)
            if not write_all:   # a write that reached only some rows
                changes = dict(list(changes.items())[: len(changes) // 2])
            world.topo.write(changes)
        else:
            world.apply(op, a, b, c)
        nb, sb = world.nb(), world.sb()
        changed = changed_between(seen, nb.load_balancers)
        seen = dict(nb.load_balancers)
        for chassis, planner in planners.items():
            snapshot = Snapshot(nb, sb, chassis, TABLES)
            update = planner.update(snapshot, world.now, changed)
            expected = plan(snapshot, config, world.now)
            assert update.plan == expected
            before = installed[chassis]
            lines = diff.diff_lines(update.plan, before, update.flows, update.groups)
            assert lines == diff.diff_lines(expected, before)
            diff.record(update.plan, before, update.flows, update.groups)
            assert_installed_matches(before, expected)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps, st.integers(1, 12))
def test_writer_and_planner_sharing_one_topology_index_stay_exact(ops, every):
    """As in the agent: the NB writer and the planner share one TopologyCache and one
    validation memo, and each is told what changed since its own last look, however many
    topology versions the other made meanwhile (the planner here looks only every
    `every` steps: beyond the cache's history it must plan everything again)."""
    world = World().populated()
    cache, memo = TopologyCache(), ValidationMemo()
    cache.HISTORY = 3     # a short history, so that lagging past it is exercised
    reconciler = NbReconciler(memo, 10.0, cache)
    planner = IncrementalPlanner(PlanConfig(), memo, cache)
    seen_writer: dict = {}
    seen_planner: dict = {}
    for step, (op, a, b, c, _write_all) in enumerate(ops):
        if op != "write":
            world.apply(op, a, b, c)
        nb = world.nb()
        got = reconciler.reconcile(nb, world.now, changed_between(seen_writer,
                                                                  nb.load_balancers))
        assert got == reconcile_nb(nb.load_balancers.values(), nb, world.now, None, None,
                                   10.0)
        world.topo.write(got)
        seen_writer = dict(nb.load_balancers)
        # The writer's write comes back as a new view: its changes are the writer's too.
        nb = world.nb()
        reconciler.reconcile(nb, world.now, changed_between(seen_writer, nb.load_balancers))
        seen_writer = dict(nb.load_balancers)
        if step % every == 0:
            snapshot = Snapshot(nb, world.sb(), "gw1", TABLES)
            update = planner.update(snapshot, world.now,
                                    changed_between(seen_planner, nb.load_balancers))
            seen_planner = dict(nb.load_balancers)
            assert update.plan == plan(snapshot, PlanConfig(), world.now)
        world.now += 0.6


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_nb_reconciler_equals_reconciling_every_lb(ops):
    world = World().populated()
    reconciler = NbReconciler(ack_timeout=10.0)
    seen: dict = {}
    for op, a, b, c, write_all in ops:
        if op != "write":
            world.apply(op, a, b, c)
        nb, sb, installed = world.nb(), world.sb(), world.installed
        changed = changed_between(seen, nb.load_balancers)
        got = reconciler.reconcile(nb, world.now, changed, sb, installed)
        assert got == reconcile_nb(nb.load_balancers.values(), nb, world.now, sb, installed,
                                   10.0)
        seen = dict(nb.load_balancers)
        # The writer's own writes (all, or part of one that failed half-way), and
        # writes that never happened: quiet LBs then wait for acknowledgements or time.
        if write_all:
            world.topo.write(got)
        elif op == "write":
            world.topo.write(dict(list(got.items())[: len(got) // 2]))
        world.now += 0.6   # and a wait for acknowledgements runs out after 10 s


def test_incremental_planner_names_only_what_moved():
    """One backend change of one LB among many touches that LB's group and flows only."""
    world = World()
    for index in range(4):
        world.apply("backends", index, 0b0011, 1)
        world.apply("persistence", index, 0, 0)    # hashing only: one group per VIP
    world.topo.writer_pass(world.now)
    planner = IncrementalPlanner(PlanConfig())
    nb = world.nb()
    first = planner.update(Snapshot(nb, world.sb(), "gw1", TABLES), world.now)
    assert first.flows is None and len(first.plan.groups) == 4
    before = dict(nb.load_balancers)
    world.apply("backends", 2, 0b0111, 1)
    world.topo.writer_pass(world.now)
    nb = world.nb()
    update = planner.update(Snapshot(nb, world.sb(), "gw1", TABLES), world.now,
                            changed_between(before, nb.load_balancers))
    assert update.lbs == {world.uuid(2)}
    assert len(update.groups) == 1
    (gid,) = update.groups
    assert len(update.plan.groups[gid].buckets) == 3
    # The other LBs' groups are the very objects planned before (not even re-diffed).
    for other, group in first.plan.groups.items():
        if other != gid:
            assert update.plan.groups[other] is group


@pytest.mark.parametrize("chassis", ["hv1", "gw1"])
def test_a_moved_vm_re_plans_only_the_lbs_it_backs(chassis):
    """An SB change (a VM bound elsewhere) re-plans the LBs whose plans read that binding,
    on a backends' chassis and on a gateway alike: no lookup of a plan (a health check
    in an empty Service_Monitor map, say) may count as reading the whole SB."""
    world = World()
    world.apply("backends", 0, 0b0011, 1)     # vm1, vm2
    world.apply("backends", 1, 0b1000, 1)     # vm4
    world.apply("backends", 2, 0b0001, 1)     # vm1
    world.topo.writer_pass(world.now)
    planner = IncrementalPlanner(PlanConfig())
    nb = world.nb()
    first = planner.update(Snapshot(nb, world.sb(), chassis, TABLES), world.now)
    world.apply("bind", 0, 1, 3)              # vm4: hv1 -> hv2
    update = planner.update(Snapshot(world.nb(), world.sb(), chassis, TABLES), world.now,
                            frozenset())
    assert update.lbs == {world.uuid(1)}
    assert update.plan == plan(Snapshot(world.nb(), world.sb(), chassis, TABLES),
                               PlanConfig(), world.now)
    if chassis == "hv1":
        assert len(update.plan.flows) < len(first.plan.flows)   # vm4's DNAT left hv1
    else:
        assert len(first.plan.groups) == 3    # the gateway serves all three


@pytest.mark.parametrize("key", [EXT_ACTIVE, EXT_PREVIOUS, EXT_VIP_IDS, EXT_BUCKETS, EXT_DRAIN])
@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 100_000], ids=["list", "object"])
def test_json_nested_too_deep_for_the_parser_harms_no_other_lb(key, text):
    """json.loads raises RecursionError, not ValueError, on such text: it is malformed
    input like any other, never an exception out of the writer or the planner."""
    world = World().populated()
    config = PlanConfig()
    planner, reconciler = IncrementalPlanner(config), NbReconciler()
    before = planner.update(Snapshot(world.nb(), world.sb(), "gw1", TABLES), world.now).plan
    reconciler.reconcile(world.nb(), world.now)
    bad, good = world.uuid(0), world.uuid(1)
    lb = world.topo.load_balancers[bad]
    world.topo.load_balancers[bad] = dataclasses.replace(
        lb, external_ids={**lb.external_ids, key: text})
    nb = world.nb()
    written = reconciler.reconcile(nb, world.now, frozenset({bad}))
    assert written == reconcile_nb(nb.load_balancers.values(), nb, now=world.now)
    assert good not in written
    snapshot = Snapshot(nb, world.sb(), "gw1", TABLES)
    after = planner.update(snapshot, world.now, frozenset({bad})).plan
    assert after == plan(snapshot, config, world.now)
    assert after.lb_status[good] == before.lb_status[good]
    assert after.lb_status[bad].state in ("ok", "pending")
    for line in lines_of(after):
        assert STRICT_LINE.match(line), line


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.one_of(st.text(max_size=20), garbage),
       protocol=st.one_of(st.none(), st.just("tcp"), garbage),
       vips=st.one_of(vip_maps, garbage, text_maps),
       ext=st.one_of(garbage, text_maps), mappings=st.one_of(garbage, text_maps),
       marked=st.booleans())
def test_a_hostile_row_arriving_as_a_change_harms_no_other_lb(
        name, protocol, vips, ext, mappings, marked):
    """Bad NB data reaching the incremental paths as one changed row: no exception, the
    same answer as from scratch, the working LBs untouched, no NB text in a line."""
    world = World().populated()
    config = PlanConfig()
    planner, reconciler = IncrementalPlanner(config), NbReconciler()
    nb = world.nb()
    before = planner.update(Snapshot(nb, world.sb(), "gw1", TABLES), world.now).plan
    reconciler.reconcile(nb, world.now)
    options = {MODE_OPTION: "mac"} if marked else {}
    uuid = "uuid-lb-hostile"
    world.topo.load_balancers[uuid] = NbLoadBalancer(uuid, name, protocol, vips, options, ext,
                                                     mappings)
    router = world.topo.routers[world.topo.router_uuid("lr0")]
    world.topo.routers[router.uuid] = dataclasses.replace(
        router, load_balancers=router.load_balancers + (uuid,))
    for _ in range(2):   # as it arrives, then once the NB writer wrote its ids
        nb = world.nb()
        written = reconciler.reconcile(nb, world.now, frozenset({uuid}))
        assert written == reconcile_nb(nb.load_balancers.values(), nb, now=world.now)
        snapshot = Snapshot(nb, world.sb(), "gw1", TABLES)
        after = planner.update(snapshot, world.now, frozenset({uuid})).plan
        assert after == plan(snapshot, config, world.now)
        for good in (world.uuid(0), world.uuid(1)):
            assert after.lb_status[good] == before.lb_status[good]
        assert before.groups.items() <= after.groups.items()
        assert before.flows.items() <= after.flows.items()
        for line in lines_of(after):
            assert STRICT_LINE.match(line), line
        if not isinstance(ext, dict):
            break        # nothing to merge the writer's keys into: the row stays as it is
        world.topo.write(written)
    event("hostile LB: " + after.lb_status[uuid].state if uuid in after.lb_status
          else "hostile LB: not marked")
