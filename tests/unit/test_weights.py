"""Backend weights as slots (options:stateless_weights): parsing, validation, groups,
shares and how little a weight change moves."""

from __future__ import annotations

import random

import pytest

from statelesslb.nb.hashing import FULL_FIELDS
from statelesslb.nb.weights import SLOT_BASE, WEIGHTS_OPTION, base_id, slot_ids
from statelesslb.observe.predict import FlowTuple, predict_bucket
from statelesslb.plan.planner import plan
from statelesslb.plan.specs import STATE_ERROR, STATE_OK, PlanConfig

from .factories import basic_topo

CONFIG = PlanConfig()
GID = CONFIG.group_id_base + 1


def weighted_topo(weights: str | None, backends="10.0.0.11:8080,10.0.0.12:8080"):
    topo = basic_topo(with_lb=False)
    topo.add_lb("lb0", {"172.16.0.100:80": backends})
    lb = topo.lb("lb0")
    options = dict(lb.options)
    if weights is not None:
        options[WEIGHTS_OPTION] = weights
    topo.update_lb("lb0", options=options)
    topo.assign_ids()
    return topo


def test_slot_ids_follow_the_nb_id():
    assert slot_ids(3, 1) == [3]
    assert slot_ids(3, 3) == [3, 3 + SLOT_BASE, 3 + 2 * SLOT_BASE]
    assert [base_id(b) for b in slot_ids(7, 4)] == [7] * 4


def test_a_weight_is_that_many_buckets_in_the_gateway_group():
    topo = weighted_topo("10.0.0.12:8080=3")
    result = plan(topo.snapshot("gw1"), CONFIG, now=topo.clock)
    assert result.lb_status["uuid-lb-lb0"].state == STATE_OK
    group = result.groups[GID]
    assert sorted(group.buckets) == [1, 2, 2 + SLOT_BASE, 2 + 2 * SLOT_BASE]
    # Every slot of a backend steers to it.
    assert len({group.buckets[b] for b in slot_ids(2, 3)}) == 1
    assert group.buckets[1] != group.buckets[2]


@pytest.mark.parametrize("value, needle", [
    ("10.0.0.12:8080=0", "is not a comma-separated list of BACKEND=WEIGHT"),
    ("10.0.0.12:8080=65", "is not a comma-separated list of BACKEND=WEIGHT"),
    ("10.0.0.12:8080", "is not a comma-separated list of BACKEND=WEIGHT"),
    ("10.0.0.12:8080=2,", "is not a comma-separated list of BACKEND=WEIGHT"),
    ("10.0.0.12=2", "has no port"),
    ("10.0.0.12:8080=2,10.0.0.12:8080=3", "is listed twice"),
    ("10.0.0.99:8080=2", "10.0.0.99:8080, not a backend of this load balancer"),
    ("10.0.0.12:8080=2);drop", "is not a comma-separated list"),
])
def test_bad_weights_are_an_error_status_and_harm_no_other_lb(value, needle):
    topo = weighted_topo(value)
    topo.add_lb("other", {"172.16.0.101:80": "10.0.0.11:8080"})
    topo.assign_ids()
    result = plan(topo.snapshot("gw1"), CONFIG, now=topo.clock)
    status = result.lb_status["uuid-lb-lb0"]
    assert status.state == STATE_ERROR and needle in status.message, status.message
    assert result.lb_status["uuid-lb-other"].state == STATE_OK


def test_weights_adding_up_beyond_one_group_are_refused():
    topo = basic_topo(with_lb=False)
    for i in range(20):
        topo.add_vif("ls0", f"vm{100 + i}", f"50:54:00:00:01:{i:02x}", f"10.0.1.{i + 1}")
    topo.add_lb("lb0", {"172.16.0.100:80": ",".join(f"10.0.1.{i + 1}:80" for i in range(20))})
    weights = ",".join(f"10.0.1.{i + 1}:80=64" for i in range(10))
    topo.update_lb("lb0", options={**topo.lb("lb0").options, WEIGHTS_OPTION: weights})
    topo.assign_ids()
    status = plan(topo.snapshot("gw1"), CONFIG, now=topo.clock).lb_status["uuid-lb-lb0"]
    assert status.state == STATE_ERROR and "weights add up to 650 buckets" in status.message


def _shares(bucket_ids, tuples):
    counts = {}
    for pkt in tuples:
        backend = base_id(predict_bucket(bucket_ids, 100, FULL_FIELDS, pkt))
        counts[backend] = counts.get(backend, 0) + 1
    return counts


def test_shares_follow_weights_and_a_weight_change_moves_only_what_it_must():
    rng = random.Random(5)
    tuples = [FlowTuple(4, f"198.51.{rng.randrange(256)}.{rng.randrange(256)}",
                        "172.16.0.100", 6, rng.randrange(1024, 65536), 80)
              for _ in range(30_000)]
    ids = {1: 1, 2: 2, 3: 4}      # NB bucket id -> weight (1:2:4)
    buckets = [s for b, w in ids.items() for s in slot_ids(b, w)]
    counts = _shares(buckets, tuples)
    for b, w in ids.items():
        assert abs(counts[b] / len(tuples) - w / 7) < 0.02, (b, counts)
    # Weight of backend 2 from 2 to 3: one slot more; only flows landing on it move.
    before = {p: predict_bucket(buckets, 100, FULL_FIELDS, p) for p in tuples}
    after_ids = [*buckets, 2 + 2 * SLOT_BASE]
    after = {p: predict_bucket(after_ids, 100, FULL_FIELDS, p) for p in tuples}
    moved = [p for p in tuples if base_id(after[p]) != base_id(before[p])]
    assert moved and all(after[p] == 2 + 2 * SLOT_BASE for p in moved)
    # The minimum: backend 2's share grows from 2/7 to 3/8, so 3/8 - 2/7 = 5/56 of the
    # flows must move to it, and no more do.
    shares = {b: round(c / len(tuples), 4) for b, c in sorted(counts.items())}
    print(f"\nweight 2 -> 3 in 1:2:4: {len(moved) / len(tuples):.4f} of the flows moved, "
          f"minimum {5 / 56:.4f}; shares {shares}")
    assert abs(len(moved) / len(tuples) - 5 / 56) < 0.01
