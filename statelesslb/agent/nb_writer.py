"""The NB side: validate marked load balancers, keep their ids, report status.

Every agent runs this, but only the one holding the OVSDB lock writes (as
ovn-northd does with its own lock), and python-ovs adds an assertion of that
lock to every transaction: two agents starting at once cannot both allocate.
The logic is the pure `bucket_ids.reconcile_nb`; this module only writes its result.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Set

from statelesslb.agent.watchers import Watcher
from statelesslb.nb import bucket_ids
from statelesslb.nb.acks import DEFAULT_ACK_TIMEOUT
from statelesslb.nb.model import EXT_ACTIVE, EXT_PREVIOUS, NbView, SbView
from statelesslb.nb.topology import TopologyCache
from statelesslb.nb.validate import ValidationMemo

LOG = logging.getLogger(__name__)
# Above this many LBs in one pass, each LB's line goes to DEBUG and INFO gets a summary.
LOG_EACH_MAX = 50


class NbWriter:
    def __init__(self, watcher: Watcher, validation: ValidationMemo | None = None,
                 ack_timeout: float = DEFAULT_ACK_TIMEOUT,
                 topology: TopologyCache | None = None):
        self.watcher = watcher
        self.reconciler = bucket_ids.NbReconciler(validation, ack_timeout, topology)
        self.writes = 0
        self.last_error: str | None = None

    def next_due(self) -> float | None:
        """Unix time at which some LB's result may change by time alone (a wait for
        acknowledgements runs out, a second-chance window closes)."""
        return self.reconciler.next_due()

    def reconcile(self, nb: NbView, changed: Set[str] | None = None,
                  sb: SbView | None = None, installed: Mapping[str, str] | None = None) -> int:
        """Write what reconcile_nb says; returns the number of LBs changed.

        `changed`: uuids of the LBs changed since the last call (None: unknown);
        `sb`, `installed`: bindings and acknowledgements the phase change waits for.
        """
        started = time.perf_counter()
        changes = self.reconciler.reconcile(nb, time.time(), changed, sb, installed)
        if not changes:
            return 0
        computed = time.perf_counter()
        api_idl = self.watcher.idl
        from ovs.db import idl as ovs_idl

        level = logging.INFO if len(changes) <= LOG_EACH_MAX else logging.DEBUG
        ok = (ovs_idl.Transaction.SUCCESS, ovs_idl.Transaction.UNCHANGED)

        def build(_txn) -> None:
            # In the NB connection's thread, with its lock held (Watcher.commit).
            rows = api_idl.tables["Load_Balancer"].rows
            for uuid_text, delta in changes.items():
                row = rows.get(uuid.UUID(uuid_text))
                if row is None:
                    continue
                for key, value in delta.items():
                    if value is None:
                        row.delkey("external_ids", key)
                    else:
                        row.setkey("external_ids", key, value)
                lb = nb.load_balancers[uuid_text]
                late = self.reconciler.moved_late.get(uuid_text)
                if late:
                    LOG.warning("LB %s: gateways moved to the new bucket set without the "
                                "acknowledgement of %s (late or gone): sessions there may "
                                "break", lb.name, ", ".join(late))
                # One line per LB at INFO for a few; a batch of thousands is summed up
                # below (10,000 lines cost the agent seconds, docs/scale.md).
                if LOG.isEnabledFor(level):   # _describe costs, even when not logged
                    LOG.log(level, "LB %s: %s", lb.name, _describe(delta))
                LOG.debug("LB %s: full values %s", lb.name, delta)

        def done(status: str) -> None:
            if status in ok:
                # Logged under the connection lock, so before the IDL's thread can log
                # a lock loss that came after the commit (the failover checks read
                # both lines).
                LOG.info("NB writer: %d LBs written in %.0f ms (%.0f ms to compute, "
                         "%.0f ms to commit)", len(changes),
                         (time.perf_counter() - started) * 1000,
                         (computed - started) * 1000, (time.perf_counter() - computed) * 1000)

        status, error = self.watcher.commit(build, done)
        written = status in ok
        if not written:
            self.last_error = f"NB write failed: {status} {error}"
            LOG.warning("%s", self.last_error)
            return 0
        self.writes += 1
        self.last_error = None
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
