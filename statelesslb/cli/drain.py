"""Drain and undrain - the edit of an LB's drain list, checked before it is written to the NB."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from statelesslb.cli.errors import CtlError
from statelesslb.nb.parse import (
    show,
    vip_backend_keys,
)
from statelesslb.nb.stored import parse_drain_checked

# ---------------------------------------------------------------------------
# Drain list editing (pure)


@dataclass(frozen=True)
class DrainEdit:
    drain: list[str]          # the whole list after the edit, sorted
    changed: bool
    dropped: list[str]        # malformed entries of the old list, not written back


def edit_drain(lb_name: str, vips: Mapping[str, str], drain_text: str | None,
               backend: str, drain: bool, force: bool = False) -> DrainEdit:
    """The drain list after draining (or undraining) canonical `backend`."""
    current, malformed = parse_drain_checked(drain_text)
    dropped = [show(entry) for entry in malformed]
    by_vip = vip_backend_keys(vips)
    known = sorted({b for _, backends in by_vip for b in backends})
    if drain:
        if backend not in known:
            raise CtlError(f"{backend} is not a backend of {show(lb_name)} "
                           f"(its backends: {', '.join(known) or 'none'})")
        new = current | {backend}
        if not force:
            for vip, backends in by_vip:
                if backend in backends and all(b in new for b in backends):
                    raise CtlError(
                        f"draining {backend} would leave VIP {vip} of {show(lb_name)} with "
                        "no backend (its traffic would be dropped); use --force to do it")
    else:
        if backend not in current and backend not in known:
            raise CtlError(f"{backend} is neither drained nor a backend of {show(lb_name)}")
        new = current - {backend}
    return DrainEdit(sorted(new), new != current or bool(malformed), dropped)
