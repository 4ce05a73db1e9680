"""What the NB writer stores in an LB's external_ids, read and written - id maps, the drain
list, the active and previous bucket sets. Every reader of those keys goes through here;
malformed text reads as None or empty, never raises.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from statelesslb.nb.model import (
    EXT_BUCKETS,
    EXT_VIP_IDS,
)
from statelesslb.nb.parse import canonical_endpoint_key
from statelesslb.ofstrings import is_plain_int

# backend key -> (bucket id, MAC, logical switch port), per VIP key.
ActiveSet = dict[str, dict[str, tuple[int, str, str]]]

MAX_BUCKET_ID = 0xFFFFFF00   # OFPG15_BUCKET_MAX
MAX_VIP_ID = 0x0FFFFFFF      # keeps group_id_base + id below OFPG_MAX


def _json_or_none(text: str) -> object:
    """The JSON value of `text`, or None when it is not JSON. Nesting too deep for the
    parser (RecursionError) is malformed input too: NB text must never crash a pass."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def parse_id_map(text: str | None) -> dict[str, int] | None:
    """Parse a persisted id map. Absent (None) -> {}; malformed -> None."""
    if text is None:
        return {}
    if not isinstance(text, str):
        return None
    data = _json_or_none(text)
    if not isinstance(data, dict):
        return None
    if not all(isinstance(k, str) and is_plain_int(v) and v >= 1 for k, v in data.items()):
        return None
    return data


def stored_ids(external_ids: object) -> tuple[dict[str, int] | None, dict[str, int] | None]:
    """An LB's VIP ids and bucket ids as the NB writer stored them in its external_ids
    (`statelesslb:vip_ids`, `statelesslb:buckets`): absent -> {}, malformed -> None.
    The one reader of those keys."""
    ext = external_ids if isinstance(external_ids, Mapping) else {}
    return parse_id_map(ext.get(EXT_VIP_IDS)), parse_id_map(ext.get(EXT_BUCKETS))


def dump_id_map(ids: Mapping[str, int]) -> str:
    """Deterministic compact JSON: same map, same bytes (no spurious NB writes)."""
    return json.dumps(dict(ids), sort_keys=True, separators=(",", ":"))


def parse_drain_checked(text: str | None) -> tuple[frozenset[str], list[object]]:
    """(canonical drained backend keys, what was dropped as malformed).

    Wholly malformed text (not a JSON list) drains nothing and is dropped whole;
    otherwise the entries that are not IP:port strings are dropped.
    """
    if text is None:
        return frozenset(), []
    data = _json_or_none(text) if isinstance(text, str) else None
    if not isinstance(data, list):
        return frozenset(), [text]
    keys, dropped = set(), []
    for entry in data:
        key = canonical_endpoint_key(entry)
        if key is None:
            dropped.append(entry)
        else:
            keys.add(key)
    return frozenset(keys), dropped


def parse_drain(text: str | None) -> frozenset[str]:
    return parse_drain_checked(text)[0]


def dump_drain(keys: Iterable[str]) -> str:
    return json.dumps(sorted(set(keys)), separators=(",", ":"))


def parse_active(text: object) -> ActiveSet:
    """{vip key: {backend key: (bucket id, mac, lsp)}}; {} for anything malformed.

    Only shapes are checked here: MACs and keys are validated again where used.
    """
    if not isinstance(text, str) or len(text) > 1_000_000:
        return {}
    data = _json_or_none(text)
    out: ActiveSet = {}
    if not isinstance(data, dict):
        return {}
    for vip, backends in data.items():
        if not isinstance(vip, str) or not isinstance(backends, dict):
            return {}
        entries = {}
        for key, value in backends.items():
            if not (isinstance(key, str) and isinstance(value, list) and len(value) == 3
                    and is_plain_int(value[0]) and 0 < value[0] <= MAX_BUCKET_ID
                    and isinstance(value[1], str) and isinstance(value[2], str)):
                return {}
            entries[key] = (value[0], value[1], value[2])
        out[vip] = entries
    return out


def parse_previous(text: object) -> tuple[float, ActiveSet] | None:
    """(since, active set) of `statelesslb:previous`, or None."""
    if not isinstance(text, str) or len(text) > 1_000_000:
        return None
    data = _json_or_none(text)
    if not isinstance(data, dict) or not isinstance(data.get("since"), int | float):
        return None
    vips = parse_active(json.dumps(data.get("vips")))
    return (float(data["since"]), vips) if vips else None
