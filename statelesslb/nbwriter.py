"""The NB side: validate marked load balancers, keep their ids, report status.

Every agent runs this, but only the one holding the OVSDB lock writes (as
ovn-northd does with its own lock), and python-ovs adds an assertion of that
lock to every transaction: two agents starting at once cannot both allocate.
The logic is the pure `buckets.reconcile_nb`; this module only writes its result.
"""

from __future__ import annotations

import logging
import time

from statelesslb import buckets
from statelesslb.model import EXT_ACTIVE, EXT_PREVIOUS, NbView
from statelesslb.watchers import Watcher

LOG = logging.getLogger(__name__)


class NbWriter:
    def __init__(self, watcher: Watcher):
        self.watcher = watcher
        self.writes = 0
        self.last_error: str | None = None

    def next_due(self, nb: NbView) -> float | None:
        """Unix time at which a settling LB may need its phase 2 written."""
        now = time.time()
        dues = [d for lb in nb.load_balancers.values()
                if (d := buckets.settling(lb, now)) is not None]
        return min(dues) if dues else None

    def reconcile(self, nb: NbView) -> int:
        """Write what reconcile_nb says; returns the number of LBs changed."""
        changes = buckets.reconcile_nb(nb.load_balancers.values(), nb, now=time.time())
        if not changes:
            return 0
        api_idl = self.watcher.idl
        from ovs.db import idl as ovs_idl

        with self.watcher.connection.lock:
            txn = ovs_idl.Transaction(api_idl)
            rows = api_idl.tables["Load_Balancer"].rows
            for uuid_text, delta in changes.items():
                row = next((r for r in rows.values() if str(r.uuid) == uuid_text), None)
                if row is None:
                    continue
                for key, value in delta.items():
                    if value is None:
                        row.delkey("external_ids", key)
                    else:
                        row.setkey("external_ids", key, value)
                lb = nb.load_balancers[uuid_text]
                LOG.info("LB %s: %s", lb.name, _describe(delta))
                LOG.debug("LB %s: full values %s", lb.name, delta)
            status = txn.commit_block()
        if status not in (ovs_idl.Transaction.SUCCESS, ovs_idl.Transaction.UNCHANGED):
            self.last_error = f"NB write failed: {status} {txn.get_error()}"
            LOG.warning("%s", self.last_error)
            return 0
        self.writes += 1
        return len(changes)


def _describe(delta: dict[str, str | None]) -> str:
    """Short: ids and status in full, the (large) active/previous sets by size."""
    parts = []
    for key, value in sorted(delta.items()):
        if value is None:
            parts.append(f"{key} removed")
        elif key in (EXT_ACTIVE, EXT_PREVIOUS) or len(value) > 200:
            parts.append(f"{key} updated ({len(value)} bytes)")
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts)
