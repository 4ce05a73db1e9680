"""The two-phase bucket change is acknowledged: the gateways move once every chassis
that must hold the previous set says it does, or when a bounded wait runs out."""

from __future__ import annotations

import json

from statelesslb.nb.acks import (
    EXT_INSTALLED,
    ack_state,
    acknowledges,
    dump_installed,
    installed_previous,
    parse_installed,
)
from statelesslb.nb.bucket_ids import NbReconciler, reconcile_nb
from statelesslb.nb.model import (
    EXT_ACTIVE,
    EXT_PREVIOUS,
    EXT_STATUS,
    PERSISTENCE_OPTION,
    WINDOW_OPTION,
)

from .factories import basic_topo

LB = "uuid-lb-lb0"
T0 = 1000.0


def _topo(window: int | None = None):
    """lb0 (second chance) on vm1 (hv1) and vm2 (hv2), ids written; vm3 on gw1."""
    topo = basic_topo()
    topo.add_vif("ls0", "vm3", "50:54:00:00:00:03", "10.0.0.13", "gw1")
    options = {**topo.lb("lb0").options, PERSISTENCE_OPTION: "second-chance"}
    if window is not None:
        options[WINDOW_OPTION] = str(window)
    topo.update_lb("lb0", options=options)
    topo.writer_pass(T0 - 100)
    return topo


def _acks(since: float, *chassis: str, others: tuple[str, ...] = ()) -> dict[str, str]:
    """Each of `chassis` acknowledges lb0's previous set `since`; `others` publish {}."""
    out = {c: dump_installed({LB: since}) for c in chassis}
    out.update({c: dump_installed({}) for c in others})
    return out


def _pass(topo, now, installed, timeout=30.0):
    changes = reconcile_nb(topo.load_balancers.values(), topo.nb(), now, topo.sb(),
                           installed, timeout)
    topo.write(changes)
    return changes.get(LB, {})


def _phase1(topo, backends="10.0.0.11:8080,10.0.0.12:8080,10.0.0.13:8080"):
    """Change lb0's backends; the first pass publishes the previous set."""
    topo.update_lb("lb0", vips={"172.16.0.100:80": backends})
    delta = _pass(topo, T0, _acks(0.0, others=("hv1", "hv2", "gw1")))
    assert EXT_PREVIOUS in delta and EXT_ACTIVE not in delta
    return json.loads(delta[EXT_PREVIOUS])["since"]


def test_the_gateways_wait_for_every_backend_chassis_then_move():
    topo = _topo()
    active = topo.lb("lb0").external_ids[EXT_ACTIVE]
    since = _phase1(topo)
    assert since == T0
    # hv1 and gw1 hold the previous set, hv2 (vm2's chassis) does not yet.
    delta = _pass(topo, T0 + 1, _acks(since, "hv1", "gw1", others=("hv2",)))
    assert EXT_ACTIVE not in delta
    assert topo.lb("lb0").external_ids[EXT_STATUS] == (
        "ok (waiting for hv2 to install the previous bucket set (at most 30 s))")
    # Still waiting later on, and nothing more to write.
    assert _pass(topo, T0 + 20, _acks(since, "hv1", "gw1", others=("hv2",))) == {}
    assert topo.lb("lb0").external_ids[EXT_ACTIVE] == active
    # An acknowledgement of an older previous set is no acknowledgement.
    stale = _acks(since, "hv1", "gw1") | {"hv2": dump_installed({LB: since - 60})}
    assert _pass(topo, T0 + 21, stale) == {}
    delta = _pass(topo, T0 + 22, _acks(since, "hv1", "hv2", "gw1"))
    assert set(json.loads(delta[EXT_ACTIVE])["172.16.0.100:80"]) == {
        "10.0.0.11:8080", "10.0.0.12:8080", "10.0.0.13:8080"}
    assert delta[EXT_STATUS] == "ok"


def test_a_late_chassis_is_waited_for_at_most_the_bound_and_then_named():
    topo = _topo()
    since = _phase1(topo)
    late = _acks(since, "hv1", "gw1", others=("hv2",))
    assert EXT_ACTIVE not in _pass(topo, T0 + 9.9, late, timeout=10)
    delta = _pass(topo, T0 + 10, late, timeout=10)
    assert EXT_ACTIVE in delta
    status = "ok (previous bucket set not held by hv2: sessions there may break)"
    assert delta[EXT_STATUS] == status
    # The status says so while the previous set is in force (default window 240 s)...
    assert _pass(topo, T0 + 100, late, timeout=10) == {}
    # ...until hv2 catches up, or the window closes.
    assert _pass(topo, T0 + 101, _acks(since, "hv1", "hv2", "gw1"), timeout=10) == {
        EXT_STATUS: "ok"}
    _pass(topo, T0 + 102, late, timeout=10)
    assert _pass(topo, T0 + 240, late, timeout=10) == {EXT_STATUS: "ok"}


def test_the_wait_is_at_most_half_the_window():
    topo = _topo(window=8)
    since = _phase1(topo)
    late = _acks(since, "hv1", "gw1", others=("hv2",))
    assert EXT_ACTIVE not in _pass(topo, T0 + 3.9, late)
    assert topo.lb("lb0").external_ids[EXT_STATUS].endswith("(at most 4 s))")
    assert EXT_ACTIVE in _pass(topo, T0 + 4, late)


def test_a_chassis_without_an_agent_is_named_but_not_waited_for():
    topo = _topo()
    since = _phase1(topo)
    delta = _pass(topo, T0 + 0.1, _acks(since, "hv1", "hv2"))   # gw1 publishes nothing
    assert EXT_ACTIVE in delta
    assert delta[EXT_STATUS] == "ok (no statelesslb agent acknowledges on gw1)"


def test_a_removed_backends_chassis_must_hold_the_previous_set_too():
    """vm1 leaves the set: its chassis still serves its connections (and un-DNATs)."""
    topo = _topo()
    since = _phase1(topo, backends="10.0.0.12:8080")
    assert EXT_ACTIVE not in _pass(topo, T0 + 1, _acks(since, "hv2", others=("hv1", "gw1")))
    assert "waiting for hv1 " in topo.lb("lb0").external_ids[EXT_STATUS]
    assert EXT_ACTIVE in _pass(topo, T0 + 2, _acks(since, "hv1", "hv2", others=("gw1",)))


def test_unbound_backends_and_unrelated_chassis_are_not_required():
    topo = _topo()
    since = _phase1(topo)
    state = ack_state(LB, since, ["vm1", "vm2", "vm3", "nosuchport"], topo.sb(),
                      _acks(since, "hv1", others=("hv2", "hv9")))
    assert state.required == ("gw1", "hv1", "hv2")
    assert state.waiting == ("hv2",) and state.silent == ("gw1",)
    assert ack_state(LB, since, ["vm1"], None, {}).required == ()


def test_malformed_acknowledgements_acknowledge_nothing():
    for text in ("", "[", "[1]", '{"x": "1"}', "{" * 100_000, None, 5):
        assert acknowledges(text, LB, T0) is False
    assert parse_installed('{"a": 1, "b": "x", "c": true, "d": 2.5}') == {"a": 1.0, "d": 2.5}
    # JSON's three decimals both ways still match.
    assert acknowledges(dump_installed({LB: 1234.5678}), LB, 1234.568)


def test_no_second_chance_moves_at_once_and_waits_for_nobody():
    topo = _topo()
    topo.update_lb("lb0", options={**topo.lb("lb0").options, PERSISTENCE_OPTION: "hash"})
    topo.update_lb("lb0", vips={"172.16.0.100:80": "10.0.0.12:8080"})
    delta = _pass(topo, T0, _acks(0.0, others=("hv1", "hv2")))
    assert EXT_ACTIVE in delta and EXT_PREVIOUS not in delta


def test_the_agent_acknowledges_the_previous_sets_of_the_lbs_it_installed():
    topo = _topo(window=60)
    since = _phase1(topo)
    lbs = topo.nb().load_balancers
    assert installed_previous(lbs, [LB], T0 + 1) == {LB: since}
    assert installed_previous(lbs, [], T0 + 1) == {}              # not installed here
    assert installed_previous(lbs, [LB, "uuid-none"], T0 + 60) == {}   # window closed
    assert EXT_INSTALLED == "statelesslb:installed"


def test_the_incremental_writer_wakes_for_acknowledgements_and_for_the_bound():
    topo = _topo()
    reconciler = NbReconciler(ack_timeout=10)
    nb = topo.nb()
    assert reconciler.reconcile(nb, T0 - 50, None, topo.sb(), {}) == {}
    topo.update_lb("lb0", vips={"172.16.0.100:80": "10.0.0.12:8080,10.0.0.13:8080"})
    waiting = _acks(0.0, others=("hv1", "hv2", "gw1"))
    topo.write(reconciler.reconcile(topo.nb(), T0, {LB}, topo.sb(), waiting))
    since = json.loads(topo.lb("lb0").external_ids[EXT_PREVIOUS])["since"]
    topo.write(reconciler.reconcile(topo.nb(), T0 + 0.1, {LB}, topo.sb(), waiting))
    assert reconciler.reconcile(topo.nb(), T0 + 0.2, {LB}, topo.sb(), waiting) == {}
    assert reconciler.next_due() == T0 + 10
    # No LB row changed: an acknowledgement alone brings the LB back.
    some = _acks(since, "hv1", others=("hv2", "gw1"))
    got = reconciler.reconcile(topo.nb(), T0 + 1, frozenset(), topo.sb(), some)
    assert got == reconcile_nb(topo.load_balancers.values(), topo.nb(), T0 + 1, topo.sb(),
                               some, 10)
    assert "waiting for gw1, hv2 " in got[LB][EXT_STATUS]
    topo.write(got)
    assert reconciler.reconcile(topo.nb(), T0 + 2, {LB}, topo.sb(), some) == {}
    # The bound: no row and no acknowledgement changed, time alone.
    got = reconciler.reconcile(topo.nb(), T0 + 10, frozenset(), topo.sb(), some)
    assert EXT_ACTIVE in got[LB]
    assert reconciler.moved_late == {LB: ("gw1", "hv2")}
