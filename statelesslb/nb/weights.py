"""Backend weights as a number of buckets (slots) with stable ids.

OVS multiplies a bucket's hash score by its weight, so weights 1:2 give shares of
about 25:75, not 33:67 (shared/REFERENCE.md, section 2). A backend of weight W gets W
buckets of equal weight instead: slot k of the backend whose NB bucket id is B has the
id `B + k * 2**20`. The ids follow from the NB's, so every gateway builds the same ones,
and a weight change adds or removes slots only: just the flows of those slots move.

Operators write, per LB (unlisted backends weigh 1):

    ovn-nbctl set load_balancer lb1 options:stateless_weights='"10.0.0.11:8080=2,10.0.0.12:8080=4"'
"""

from __future__ import annotations

import re
from collections.abc import Mapping

WEIGHTS_OPTION = "stateless_weights"
MAX_WEIGHT = 64
SLOT_SHIFT = 20
SLOT_BASE = 1 << SLOT_SHIFT     # NB bucket ids of weighted LBs stay below this
_ENTRY = re.compile(r"(?P<endpoint>[0-9A-Fa-f.:\[\]]+)=(?P<weight>[1-9][0-9]?)", re.ASCII)


class WeightOptionError(ValueError):
    """options:stateless_weights is not a valid value (the message says why)."""


def parse_weights(options: object, canonical) -> dict[str, int]:
    """Backend key -> weight (only those not 1). `canonical(text)` turns an endpoint into
    the LB's backend key or raises ValueError with the reason."""
    opts = options if isinstance(options, Mapping) else {}
    raw = opts.get(WEIGHTS_OPTION)
    if raw is None:
        return {}
    usage = (f"options:{WEIGHTS_OPTION}={_show(raw)} is not a comma-separated list of "
             f"BACKEND=WEIGHT (IP:PORT or [IPv6]:PORT, weight 1..{MAX_WEIGHT})")
    if not isinstance(raw, str) or not raw:
        raise WeightOptionError(usage)
    weights: dict[str, int] = {}
    for entry in raw.split(","):
        m = _ENTRY.fullmatch(entry)
        if m is None or int(m["weight"]) > MAX_WEIGHT:
            raise WeightOptionError(usage)
        try:
            key = canonical(m["endpoint"])
        except ValueError as exc:
            raise WeightOptionError(f"options:{WEIGHTS_OPTION}: {exc}") from None
        if key in weights:
            raise WeightOptionError(f"options:{WEIGHTS_OPTION}: {key} is listed twice")
        weights[key] = int(m["weight"])
    return {key: w for key, w in weights.items() if w != 1}


def slot_ids(bucket_id: int, weight: int) -> list[int]:
    """The bucket ids of a backend's slots: its NB id first."""
    return [bucket_id + k * SLOT_BASE for k in range(weight)]


def base_id(bucket_id: int) -> int:
    """The NB bucket id a slot's id stands for."""
    return bucket_id % SLOT_BASE


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
