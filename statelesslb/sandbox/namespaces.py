"""The Linux namespaces and veths a netns run created: recognised by their run id,
removed by name, nothing else touched. Needs no Sandbox: Sandbox.down() passes its
record (`sandbox.json`'s "netns").
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LOG = logging.getLogger(__name__)

NS_PREFIX = "slb-"
LINK_PREFIX = "sl"
ETC_NETNS = Path("/etc/netns")
_RUN_ID_RE = re.compile(r"^[0-9a-f]{6}$")


def _owned(name: str, run_id: str, kind: str) -> bool:
    if not _RUN_ID_RE.match(run_id or ""):
        return False
    prefix = f"{NS_PREFIX}{run_id}-" if kind == "netns" else f"{LINK_PREFIX}{run_id}"
    return name.startswith(prefix)


def cleanup(record: Mapping[str, Any] | None) -> list[str]:
    """Remove the namespaces and veths in `record` (and nothing else).

    Called by Sandbox.down() once the processes are stopped; safe to call again and
    after a failed run (whatever does not exist is skipped). Failures are logged, never
    raised. Returns what it removed.
    """
    rec = record or {}
    run_id = rec.get("run_id", "")
    removed: list[str] = []
    try:
        from pyroute2 import IPRoute, netns
    except ImportError as exc:  # pragma: no cover - pyroute2 is a dependency
        LOG.error("cannot remove namespaces %s: %s", rec.get("namespaces"), exc)
        return removed
    for link in rec.get("links", []):
        if not _owned(link, run_id, "link"):
            LOG.warning("not removing link %s: not of netns run %s", link, run_id)
            continue
        try:
            with IPRoute() as ipr:
                for name in (link, f"{link}p"):
                    idx = ipr.link_lookup(ifname=name)
                    if idx:
                        ipr.link("del", index=idx[0])
                        removed.append(name)
        except Exception as exc:  # noqa: BLE001 - keep removing the rest
            LOG.warning("cannot remove link %s: %s", link, exc)
    try:
        existing = set(netns.listnetns())
    except Exception as exc:  # noqa: BLE001
        LOG.warning("cannot list namespaces: %s", exc)
        existing = set(rec.get("namespaces", []))
    for name in rec.get("namespaces", []):
        if not _owned(name, run_id, "netns"):
            LOG.warning("not removing namespace %s: not of netns run %s", name, run_id)
            continue
        if (ETC_NETNS / name).is_dir():
            shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
        if name not in existing:
            continue
        try:
            netns.remove(name)
            removed.append(name)
        except Exception as exc:  # noqa: BLE001
            LOG.warning("cannot remove namespace %s: %s", name, exc)
    if removed:
        LOG.info("netns run %s: removed %s", run_id, ", ".join(removed))
    return removed


def leftovers(record: Mapping[str, Any] | None) -> list[str]:
    """Recorded namespaces and links that still exist (empty after cleanup())."""
    from pyroute2 import IPRoute, netns

    rec = record or {}
    existing = set(netns.listnetns())
    left = [n for n in rec.get("namespaces", []) if n in existing]
    left += [str(ETC_NETNS / n) for n in rec.get("namespaces", []) if (ETC_NETNS / n).exists()]
    with IPRoute() as ipr:
        left += [ln for ln in rec.get("links", []) if ipr.link_lookup(ifname=ln)]
    return left
