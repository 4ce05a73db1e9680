"""One LB's wants on this chassis before they are merged with the others', and the ids the
NB writer stored for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from statelesslb.nb.model import (
    EXT_ACTIVE,
    EXT_DRAIN,
    EXT_PREVIOUS,
    NbLoadBalancer,
)
from statelesslb.nb.stored import (
    MAX_BUCKET_ID,
    MAX_VIP_ID,
    parse_active,
    parse_drain,
    parse_previous,
    stored_ids,
)
from statelesslb.nb.validate import (
    ValidLb,
)
from statelesslb.nb.weights import SLOT_BASE
from statelesslb.ofstrings import (
    is_plain_int,
)
from statelesslb.plan.specs import STATE_ERROR, STATE_PENDING, FlowSpec, GroupSpec, LbPlanStatus

# ---------------------------------------------------------------------------
# Planning


@dataclass
class Candidate:
    """Everything one LB wants on this chassis, accepted or rejected as a whole."""

    flows: dict[tuple[int, int, str], tuple[FlowSpec, str]] = field(default_factory=dict)
    groups: dict[int, tuple[GroupSpec, str]] = field(default_factory=dict)
    roles: set[str] = field(default_factory=set)
    vip_keys: set[str] = field(default_factory=set)
    pending: list[str] = field(default_factory=list)
    # Said in an accepted LB's status: what works differently here, and why.
    notes: list[str] = field(default_factory=list)
    self_conflict: str | None = None

    def add_flow(self, flow: FlowSpec, vip_key: str) -> None:
        key = flow.key
        known = self.flows.get(key)
        if known is None:
            self.flows[key] = (flow, vip_key)
        elif known[0] is not flow and known[0] != flow:
            # validate_lb should rule this out (one backend port per VIP).
            self.self_conflict = f"VIPs {known[1]} and {vip_key} need clashing flows"
        self.vip_keys.add(vip_key)


@dataclass(frozen=True, slots=True)
class StoredIds:
    vip_ids: Mapping[str, int]
    bucket_ids: Mapping[str, int]
    drained: frozenset[str]
    # The gateways' bucket set before the last change, while its window is open.
    previous: Mapping[str, Mapping[str, tuple[int, str, str]]] = field(default_factory=dict)
    previous_until: float | None = None
    # The NB writer's `statelesslb:active`: what the gateways' groups hold (second
    # chance only; empty: the VIP's backends with ids, less the drained ones).
    active: Mapping[str, Mapping[str, tuple[int, str, str]]] = field(default_factory=dict)
    # Backends the NB lists but the NB writer has not given an id yet (just added):
    # planned without them meanwhile, so the others keep serving.
    unassigned: tuple[str, ...] = ()


def name_text(value: object) -> str:
    return value if isinstance(value, str) else ""


def read_ids(lb: NbLoadBalancer, valid: ValidLb, now: float) -> StoredIds | LbPlanStatus:
    """The NB writer's ids for this LB, or why they cannot be used yet."""
    name = name_text(lb.name)
    ext = lb.external_ids if isinstance(lb.external_ids, Mapping) else {}
    vip_ids, bucket_ids = stored_ids(ext)
    if vip_ids is None or bucket_ids is None:
        return LbPlanStatus(name, STATE_PENDING,
                            "stored ids are malformed; waiting for the NB writer")
    missing = [k for k in valid.vip_keys if k not in vip_ids]
    unassigned = tuple(k for k in valid.backend_keys if k not in bucket_ids)
    if missing or len(unassigned) == len(valid.backend_keys):
        # A VIP without its id has no group yet; an LB none of whose backends has an id
        # has nothing to serve. A backend just added to a working LB does not stop the
        # others: the LB is planned without it until the writer gives it an id (taking
        # every flow away meanwhile reset the connections those flows carried).
        missing += list(unassigned)
        return LbPlanStatus(name, STATE_PENDING, unassigned_text(missing))
    present = [k for k in valid.backend_keys if k in bucket_ids]
    for key in valid.vip_keys:
        if vip_ids[key] > MAX_VIP_ID:
            return LbPlanStatus(name, STATE_ERROR,
                                f"VIP id {vip_ids[key]} of {key} is above {MAX_VIP_ID:#x}")
    for key in present:
        if bucket_ids[key] > MAX_BUCKET_ID:
            return LbPlanStatus(
                name, STATE_ERROR,
                f"bucket id {bucket_ids[key]} of {key} is above {MAX_BUCKET_ID:#x}")
    if valid.weights and any(is_plain_int(b) and b >= SLOT_BASE for b in bucket_ids.values()):
        # Slot k of bucket B is B + k * 2**20: NB ids must stay below that to stay apart.
        return LbPlanStatus(name, STATE_ERROR,
                            f"options:stateless_weights needs bucket ids below {SLOT_BASE}")
    own_vip_ids = [vip_ids[k] for k in valid.vip_keys]
    own_bucket_ids = [bucket_ids[k] for k in present]
    if (len(set(own_vip_ids)) != len(own_vip_ids)
            or len(set(own_bucket_ids)) != len(own_bucket_ids)):
        return LbPlanStatus(name, STATE_PENDING,
                            "stored ids repeat; waiting for the NB writer to re-assign them")
    if not valid.second_chance:
        # The gateways use the backends as the NB lists them: a stale `active` or
        # `previous` (left from second chance, or by an older writer) is not in force.
        return StoredIds(vip_ids, bucket_ids, parse_drain(ext.get(EXT_DRAIN)),
                         unassigned=unassigned)
    previous = parse_previous(ext.get(EXT_PREVIOUS))
    active = parse_active(ext.get(EXT_ACTIVE))
    if previous is not None and now < previous[0] + valid.window:
        return StoredIds(vip_ids, bucket_ids, parse_drain(ext.get(EXT_DRAIN)), previous[1],
                         previous[0] + valid.window, active, unassigned)
    return StoredIds(vip_ids, bucket_ids, parse_drain(ext.get(EXT_DRAIN)), active=active,
                     unassigned=unassigned)


def unassigned_text(keys: list[str]) -> str:
    more = len(keys) - 5
    return (f"ids not yet assigned by the NB writer for {', '.join(keys[:5])}"
            + (f" and {more} more" if more > 0 else ""))
