"""Acknowledged phase changes: which chassis hold an LB's previous bucket set.

A second-chance bucket change has two phases (buckets.reconcile_nb): the NB writer
publishes the gateways' current set as `statelesslb:previous` (stamped `since`),
and moves the gateways to the new set (`statelesslb:active`) only once every
chassis that must hold the previous set says it does, or a bounded wait ran out.

Each agent says so in its SB `Chassis_Private` row, `external_ids:statelesslb:
installed` = {LB uuid: since} for the previous sets that the plan it last
installed on br-int was computed from (published after the bundle succeeded).
A chassis must hold an LB's previous set when a backend of the new or of the
previous set is bound there: it may receive a mid-stream packet to redirect,
or it serves a backend that keeps connections after leaving the set.

Everything here is pure: no I/O.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from statelesslb.nb.model import EXT_PREFIX, EXT_PREVIOUS, NbLoadBalancer, SbView
from statelesslb.nb.validate import parse_window
from statelesslb.ofstrings import is_plain_int

# On SB Chassis_Private external_ids (the agent's own chassis only).
EXT_INSTALLED = EXT_PREFIX + "installed"
# Default bound of the wait for acknowledgements ([statelesslb] ack_timeout).
DEFAULT_ACK_TIMEOUT = 30.0
_MAX_TEXT = 4_000_000
_NO_ACKS: Mapping[str, float] = MappingProxyType({})


def dump_installed(installed: Mapping[str, float]) -> str:
    """Deterministic compact JSON: same map, same bytes (no spurious SB writes)."""
    return json.dumps({k: round(v, 3) for k, v in installed.items()}, sort_keys=True,
                      separators=(",", ":"))


@functools.lru_cache(maxsize=4096)
def parse_installed(text: object) -> Mapping[str, float]:
    """{LB uuid: since} of a chassis' `statelesslb:installed`; {} when malformed.

    Read-only (shared by the cache). A malformed value acknowledges nothing: the
    writer then waits for that chassis as for one that is late.
    """
    if not isinstance(text, str) or len(text) > _MAX_TEXT:
        return _NO_ACKS
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return _NO_ACKS
    if not isinstance(data, dict):
        return _NO_ACKS
    out = {k: float(v) for k, v in data.items()
           if isinstance(k, str) and (is_plain_int(v) or isinstance(v, float))}
    return MappingProxyType(out)


def acknowledges(text: object, lb_uuid: str, since: float) -> bool:
    """Whether a chassis' published text says it holds the previous set stamped `since`.

    `since` went through JSON both ways (3 decimals): compare with that tolerance.
    """
    got = parse_installed(text).get(lb_uuid)
    return got is not None and abs(got - since) < 0.0005


@dataclass(frozen=True)
class AckState:
    """Who must acknowledge an LB's previous set, and who did not yet."""

    required: tuple[str, ...]     # chassis where a backend of either set is bound
    waiting: tuple[str, ...]      # required, publishing, but not (yet) for this since
    silent: tuple[str, ...]       # required, but publishing nothing: no agent there

    @property
    def complete(self) -> bool:
        return not self.waiting


def chassis_to_hold(lsp_names: Iterable[str], sb: SbView | None) -> tuple[str, ...]:
    """The chassis where these logical switch ports are bound (sorted)."""
    if sb is None or not isinstance(sb.port_bindings, Mapping):
        return ()
    found = set()
    for name in lsp_names:
        binding = sb.port_bindings.get(name)
        chassis = getattr(binding, "chassis", None)
        if isinstance(chassis, str) and chassis:
            found.add(chassis)
    return tuple(sorted(found))


def ack_state(lb_uuid: str, since: float, lsp_names: Iterable[str], sb: SbView | None,
              installed: Mapping[str, str] | None) -> AckState:
    """Who holds the previous set stamped `since` of LB `lb_uuid`.

    `installed`: {chassis name: its `statelesslb:installed` text}; a chassis with no
    text runs no agent (or one that predates acknowledgements): it is reported, not
    waited for, as nothing there could ever answer.
    """
    required = chassis_to_hold(lsp_names, sb)
    texts = installed if isinstance(installed, Mapping) else {}
    waiting, silent = [], []
    for chassis in required:
        text = texts.get(chassis)
        if text is None:
            silent.append(chassis)
        elif not acknowledges(text, lb_uuid, since):
            waiting.append(chassis)
    return AckState(required, tuple(waiting), tuple(silent))


def installed_previous(lbs: Mapping[str, NbLoadBalancer], planned: Iterable[str],
                       now: float) -> dict[str, float]:
    """The agent's acknowledgement: {LB uuid: since} for each LB in `planned` (the LBs
    whose plan it installed) whose previous set is published and in force at `now`."""
    out = {}
    for uuid in planned:
        lb = lbs.get(uuid)
        if not isinstance(lb, NbLoadBalancer) or not isinstance(lb.external_ids, Mapping):
            continue
        since = _since(lb.external_ids.get(EXT_PREVIOUS))
        if since is None:
            continue   # most LBs: no previous set (cheap, this runs over every LB)
        window = parse_window(lb.options)
        # The planner installs the previous set while now < since + window.
        if window is not None and now < since + window:
            out[uuid] = since
    return out


@functools.lru_cache(maxsize=65536)
def _since(text: object) -> float | None:
    from statelesslb.nb.stored import parse_previous

    previous = parse_previous(text)
    return previous[0] if previous is not None else None


def join(names: Iterable[str], shown: int = 5) -> str:
    """'a, b, c' (at most `shown` names, then how many more)."""
    names = list(names)
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")
