"""statelesslb-agent: keeps this chassis' stateless-LB flows and groups in place.

One loop: any change in the NB, the SB or the local OVS database wakes it; it
takes a snapshot of NB and SB, plans the desired flows and groups (pure), diffs
them against what is installed and applies the difference as one atomic
OpenFlow bundle. The work follows what changed: the watchers say which LB rows
changed, the NB writer and the planner look at those LBs only, and the diff at
the flows and groups the planner says moved. A reconnect, a wipe of br-int or
the periodic resync re-reads everything and compares it all.
"""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import logging
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from types import MappingProxyType

from oslo_config import cfg

from statelesslb import config
from statelesslb.agent import nb_writer, watchers
from statelesslb.agent.control import CtlServer
from statelesslb.agent.state import AgentState
from statelesslb.agent.uplinks import UplinkError, Uplinks, vsctl_binary
from statelesslb.nb import acks
from statelesslb.nb.model import LocalChassis, Snapshot, TableLayout
from statelesslb.nb.parse import parse_local_chassis
from statelesslb.nb.topology import TopologyCache
from statelesslb.nb.validate import ValidationMemo, ValidLb
from statelesslb.openflow import diff, tables
from statelesslb.openflow.ofctl import (
    BULK_DUMP_MAX_BUCKETS,
    InstalledState,
    Ofctl,
    OfctlError,
)
from statelesslb.openflow.wipe import WipeMonitor
from statelesslb.plan import specs
from statelesslb.plan.planner import IncrementalPlanner

LOG = logging.getLogger("statelesslb.agent")
# Seconds between attempts to set up the direct-return uplinks after a failure.
UPLINK_RETRY_S = 10

NB_LOCK = "statelesslb_nb_writer"


@dataclass
class AgentStatus:
    chassis: str = ""
    bridge_target: str = ""
    started_at: float = field(default_factory=time.time)
    last_full_sync: float | None = None
    last_apply: float | None = None
    last_error: str | None = None
    iterations: int = 0
    bundles_applied: int = 0
    wipes_seen: int = 0
    flows_expected: int = 0
    groups_expected: int = 0
    flows_installed: int | None = None
    groups_installed: int | None = None
    nb_writer: bool = False
    layout: dict | None = None
    # NB rows found changed by a full re-read without a change notice (should stay 0).
    missed_changes: int = 0
    # Where the last iteration that changed the bridge spent its time, in ms.
    last_apply_ms: dict[str, float] | None = None
    # Previous bucket sets this chassis holds, as published in the SB ({LB uuid: since}).
    acknowledged: dict[str, float] = field(default_factory=dict)
    # Why the direct-return uplinks could not be set up (None: fine, or none needed).
    uplink_error: str | None = None
    # Physical network -> br-int port of its direct-return uplink.
    uplinks: dict[str, int] = field(default_factory=dict)


class Agent:
    def __init__(self, conf: cfg.ConfigOpts):
        self.conf = conf
        self.status = AgentStatus()
        self.plan: specs.Plan | None = None
        self.snapshot: Snapshot | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._full_resync = True
        self._layout_stale = True
        self._layout: TableLayout | None = None
        self._installed: InstalledState | None = None
        # The plan installed last: a full re-read where the one bridge-wide dump is not
        # trusted checks its group ids even when OVS's group stats leave them out (see
        # Ofctl.groups); after a failed bundle, the next read does so in any case.
        self._recorded: specs.Plan | None = None
        self._bundle_failed = False
        # LB uuids changed since the planner / the NB writer last looked (None: all).
        self._plan_changes: frozenset[str] | None = None
        self._writer_changes: frozenset[str] | None = None
        self._noticed_at: float | None = None   # first NB change notice not yet applied
        self._next_periodic = 0.0
        self._retry_at: float | None = None
        # The plan whose acknowledgement was published last, and its text.
        self._acked_plan: specs.Plan | None = None
        self._published: str | None = None
        slb = conf.statelesslb
        self.plan_config = specs.PlanConfig(
            group_id_base=slb.group_id_base,
            cookie_prefix=slb.cookie_prefix,
            gateway_priority=slb.gateway_priority,
            backend_priority=slb.backend_priority,
            sentinel_table=slb.sentinel_table,
            private_table_base=slb.private_table_base,
            gateway_zone=slb.gateway_zone,
            backend_zone=slb.backend_zone,
        )
        # One validation memo and one topology index for the NB writer and the planner:
        # validated and indexed once per change, held once in memory.
        self.validation = ValidationMemo()
        self.topology = TopologyCache()
        self.planner = IncrementalPlanner(self.plan_config, self.validation, self.topology)
        self.ovs = self.nb = self.sb = None
        self.ofctl: Ofctl | None = None
        self.monitor: WipeMonitor | None = None
        self.ctl: CtlServer | None = None
        self.bridge: str | None = None
        self.writer: nb_writer.NbWriter | None = None
        self._local: LocalChassis | None = None
        self.uplinks: Uplinks | None = None
        self._uplinks_retry_at: float | None = None   # set after a failed sync

    # -- change notifications (called from other threads) --------------------
    def _on_change(self, source: str, reconnected: bool) -> None:
        if reconnected:
            with self._mutex:
                self._full_resync = True
        self._wake.set()

    def _on_wipe(self, reason: str) -> None:
        LOG.info("full resync requested: %s", reason)
        with self._mutex:
            self._full_resync = True
            self._layout_stale = True
            self.status.wipes_seen += 1
        self._wake.set()

    def request_resync(self) -> None:
        self._on_wipe("requested")

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        conf = self.conf
        self.ovs = watchers.Watcher(
            "ovs", "Open_vSwitch", conf.ovs.ovsdb_connection, watchers.OVS_TABLES,
            self._on_change, timeout=conf.ovn.ovsdb_timeout,
        )
        self.ovs.start()
        ext = self._wait_for_chassis_settings()
        self.status.chassis = ext["system-id"]
        sb_remote = conf.ovn.ovn_sb_connection or ext.get("ovn-remote")
        if not sb_remote:
            raise SystemExit("no SB remote: set [ovn] ovn_sb_connection or ovn-remote")
        bridge = conf.ovs.bridge or ext.get("ovn-bridge") or "br-int"
        self.bridge = bridge
        target = conf.ovs.ofctl_target or f"unix:{conf.ovs.ovs_rundir}/{bridge}.mgmt"
        self.status.bridge_target = target
        _configure_ssl(conf)
        self.sb_remote = sb_remote
        self.nb = watchers.Watcher(
            "nb", "OVN_Northbound", conf.ovn.ovn_nb_connection, watchers.NB_TABLES,
            self._on_change, timeout=conf.ovn.ovsdb_timeout,
            lock_name=NB_LOCK if conf.statelesslb.nb_writer else None,
            max_backoff=conf.ovn.ovsdb_max_backoff,
        )
        # Any SB member, as ovn-controller does: no lock is taken there, and a writer
        # on a follower has its transaction forwarded to the leader.
        self.sb = watchers.Watcher(
            "sb", "OVN_Southbound", sb_remote, watchers.SB_TABLES,
            self._on_change, timeout=conf.ovn.ovsdb_timeout,
            max_backoff=conf.ovn.ovsdb_max_backoff, leader_only=False,
        )
        self.nb.start()
        self.sb.start()
        self.nb_reader = watchers.NbReader(self.nb)
        self.sb_reader = watchers.SbReader(self.sb)
        if conf.statelesslb.nb_writer:
            self.writer = nb_writer.NbWriter(self.nb, self.validation,
                                            conf.statelesslb.ack_timeout, self.topology)
        self.ofctl = Ofctl(target, conf.ovs.ofctl_path, conf.ovs.ofctl_timeout)
        self.uplinks = Uplinks(conf.ovs.ovsdb_connection, bridge,
                               vsctl_binary(conf.ovs.ofctl_path), conf.ovs.ofctl_timeout)
        self.monitor = WipeMonitor(
            target, conf.statelesslb.sentinel_table, self._on_wipe, conf.ovs.ofctl_path,
            run_dir=os.path.dirname(conf.unixctl_path) if conf.unixctl_path else None,
        )
        self.monitor.start()
        if conf.unixctl_path:
            self.ctl = CtlServer(conf.unixctl_path, conf, self.state, self.request_resync)
            self.ctl.start()
        LOG.info("statelesslb-agent started on chassis %s (bridge %s, SB %s)",
                 self.status.chassis, target, sb_remote)

    def _local_chassis(self, full: bool) -> LocalChassis:
        """The chassis' reach from the local OVS; the uplink ports brought in line with it
        when it changed, and on every full resync (someone may have removed them)."""
        mappings = parse_local_chassis(watchers.read_local_ovs(self.ovs))
        previous = self._local
        retry_due = (self._uplinks_retry_at is not None
                     and time.monotonic() >= self._uplinks_retry_at)
        if (not full and not retry_due and previous is not None
                and previous.bridges == mappings.bridges
                and previous.chassis_macs == mappings.chassis_macs):
            return previous
        try:
            ports = self.uplinks.sync(mappings) if self.uplinks is not None else {}
            self._uplinks_retry_at = None
            self.status.uplink_error = None
        except UplinkError as exc:
            LOG.warning("cannot set up the direct-return uplinks, replies keep going "
                        "through the gateway; trying again in %d s: %s",
                        UPLINK_RETRY_S, exc)
            self.status.uplink_error = str(exc)
            # Not on every iteration meanwhile: ovs-vsctl is a process per call.
            self._uplinks_retry_at = time.monotonic() + UPLINK_RETRY_S
            self._schedule_retry(UPLINK_RETRY_S)
            ports = {}
        self.status.uplinks = dict(ports)
        return replace(mappings, uplinks=ports)

    def _wait_for_chassis_settings(self) -> dict[str, str]:
        deadline = time.monotonic() + 300
        while True:
            ext = watchers.read_local_ovs(self.ovs)
            if ext.get("system-id"):
                return ext
            if time.monotonic() > deadline:
                raise SystemExit("Open_vSwitch external_ids:system-id is not set")
            LOG.info("waiting for external_ids:system-id in the local OVS database")
            time.sleep(1)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for part in (self.monitor, self.ctl):
            if part is not None:
                part.stop()
        for watcher in (self.nb, self.sb, self.ovs):
            if watcher is not None:
                watcher.stop()

    def run(self) -> None:
        self._wake.set()
        while not self._stop.is_set():
            timeout = max(0.0, self._next_periodic - time.monotonic())
            if self._retry_at is not None:
                timeout = min(timeout, max(0.0, self._retry_at - time.monotonic()))
            self._wake.wait(timeout)
            if self._stop.is_set():
                break
            # Gather a burst of changes into one recompute, unless all that changed is
            # load balancers that are valid as they are now (a backend change).
            try:
                hurry = self._valid_lb_changes_only()
            except Exception:  # only a guess at whether to wait: never stop the loop
                LOG.exception("could not tell whether to skip the debounce")
                hurry = False
            if not hurry:
                time.sleep(self.conf.statelesslb.debounce)
            self._wake.clear()
            now = time.monotonic()
            if now >= self._next_periodic:
                with self._mutex:
                    self._full_resync = True
                self._next_periodic = now + self.conf.statelesslb.resync_interval
            if self._retry_at is not None and time.monotonic() >= self._retry_at:
                self._retry_at = None
            try:
                self.iterate()
            except Exception as exc:  # keep serving; the next iteration retries
                LOG.exception("iteration failed: %s", exc)
                self.status.last_error = f"{type(exc).__name__}: {exc}"
                # What is installed is no longer known to match our records.
                self._installed = None
                self._schedule_retry(1.0)

    def _valid_lb_changes_only(self) -> bool:
        """Whether the changes noticed and not yet read are load balancers alone, each
        marked and valid as it is now against the topology indexed last (a backend
        change), maybe acknowledgements in the SB (Chassis_Private), or none: applied at once,
        they cannot show a transient error. Anything else (a topology row, a new or
        deleted LB, one that does not validate yet, say created and attached to its
        router in two transactions) waits `debounce` seconds for the rest of its burst.
        Only the wait depends on it: the iteration reads everything afresh.
        """
        latest = self.topology.latest()
        if (self.nb is None or self.sb is None or latest is None or self._full_resync
                or self.conf.statelesslb.debounce <= 0):
            return False
        nb, key, index = latest
        with self.sb.connection.lock:
            sb_changes = self.sb.idl.changes
            if sb_changes.everything or not set(sb_changes.rows) <= {"Chassis_Private"}:
                return False
        with self.nb.connection.lock:
            changes = self.nb.idl.changes
            if changes.everything or not set(changes.rows) <= {"Load_Balancer"}:
                return False
            rows = self.nb.idl.tables["Load_Balancer"].rows
            lbs = []
            for row_uuid in changes.rows.get("Load_Balancer", ()):
                row = rows.get(row_uuid)
                if row is None:
                    return False
                lbs.append(watchers.lb_model(row))
        # Nothing at all (a timer, or a wake for changes an iteration already read, such
        # as the NB writer's own update): no burst to gather either.
        validation = self.validation.scope(nb, key)
        return all(lb.uuid in nb.load_balancers
                   and isinstance(validation.validate(lb, nb, index), ValidLb) for lb in lbs)

    def _schedule_retry(self, delay: float) -> None:
        """Run an iteration `delay` seconds from now, or earlier if one is due sooner."""
        at = time.monotonic() + max(0.0, delay)
        if self._retry_at is None or at < self._retry_at:
            self._retry_at = at

    # -- one recompute ------------------------------------------------------------
    def iterate(self) -> None:
        self.status.iterations += 1
        clock = _PhaseClock()
        with self._mutex:
            full = self._full_resync
            layout_stale = self._layout_stale
            self._full_resync = False
            self._layout_stale = False
        nb_view = self._read_nb(everything=full)
        clock.lap("read_nb")
        if self.writer is not None:
            nb_view = self._write_nb(nb_view, self.sb_reader.read())
            clock.lap("nb_writer")
        if layout_stale or self._layout is None:
            self._refresh_layout()
        if self._layout is None:
            if full:
                with self._mutex:
                    self._full_resync = True   # still owed once there is a layout
            self._schedule_retry(0.2)
            return
        local = self._local_chassis(full)
        if local != self._local:
            # Every LB with direct return reads the chassis' reach: plan them all again.
            LOG.info("local chassis: bridge mappings %s, chassis MACs %s, uplinks %s",
                     dict(local.bridges), dict(local.chassis_macs), dict(local.uplinks))
            self._local, full = local, True
        snapshot = Snapshot(nb=nb_view, sb=self.sb_reader.read(),
                            chassis=self.status.chassis, tables=self._layout, local=local)
        clock.lap("read_sb")
        update = self.planner.update(snapshot, now=time.time(),
                                     changed=None if full else self._plan_changes)
        self._plan_changes = frozenset()
        clock.lap("plan")
        plan = update.plan
        if plan.expires_at is not None:
            # A second-chance window closes then: plan again to drop its flows.
            self._schedule_retry(plan.expires_at - time.time() + 0.05)
        self._log_status_changes(self.plan, plan, update.lbs)
        self.snapshot, self.plan = snapshot, plan
        self.status.flows_expected = len(plan.flows)
        self.status.groups_expected = len(plan.groups)
        touched_flows, touched_groups = update.flows, update.groups
        try:
            if full or self._installed is None:
                known = set(plan.groups)
                if self._recorded is not None:
                    known |= self._recorded.groups.keys()
                self._installed = self.ofctl.read_state(
                    self.plan_config.cookie_prefix, *self.plan_config.group_range,
                    known_groups=known,
                    bulk_ok=_largest_vip(nb_view) <= BULK_DUMP_MAX_BUCKETS,
                    thorough=self._bundle_failed)
                self.status.last_full_sync = time.time()
                touched_flows = touched_groups = None
                clock.lap("read_bridge")
            lines = diff.diff_lines(plan, self._installed, touched_flows, touched_groups)
            clock.lap("diff")
            if lines:
                self.ofctl.bundle(lines)
                clock.lap("bundle")
                if self._noticed_at is not None:
                    # From the first NB change notice it applies to: includes the debounce.
                    clock.laps["since_notice"] = round(
                        (time.monotonic() - self._noticed_at) * 1000, 2)
                self.status.last_apply_ms = clock.laps
                self.status.bundles_applied += 1
                self.status.last_apply = time.time()
                LOG.info("applied %d OpenFlow changes (%d flows, %d groups expected); "
                         "ms: %s", len(lines), len(plan.flows), len(plan.groups),
                         _LapsText(clock.laps))
                for line in lines:
                    LOG.debug("  %s", line)
            self._noticed_at = None
            self._bundle_failed = False
            diff.record(plan, self._installed, touched_flows, touched_groups)
            self._recorded = plan
            if touched_flows is None or len(update.lbs or ()) > 1000:
                release_memory()   # after a pass over everything or a large batch
            self.status.flows_installed = len(self._installed.flows)
            self.status.groups_installed = len(self._installed.groups)
            self.status.last_error = None
            self._acknowledge(plan, snapshot)
        except OfctlError as exc:
            # A rolled-back bundle changed nothing: re-read and try again shortly.
            LOG.warning("OpenFlow update failed, will re-read and retry: %s", exc)
            self.status.last_error = str(exc)
            self._installed = None
            self._bundle_failed = True   # the re-read checks every known group
            self._schedule_retry(0.2)

    def _acknowledge(self, plan: specs.Plan, snapshot: Snapshot) -> None:
        """Publish which previous bucket sets br-int now holds: the NB writer moves the
        gateways once every chassis concerned holds an LB's previous set.

        Only after the plan is installed; again when the plan changed (a window
        closing re-plans its LB) or the last attempt failed.
        """
        if plan is self._acked_plan:
            return
        held = acks.installed_previous(
            snapshot.nb.load_balancers,
            [u for u, s in plan.lb_status.items() if s.state != specs.STATE_ERROR],
            time.time())
        text = acks.dump_installed(held)
        if text != self._published:
            done = watchers.publish_installed(self.sb, self.status.chassis, text)
            if not done:
                # No Chassis_Private row yet (ovn-controller makes it), or a failed write.
                self._schedule_retry(1.0)
                return
            if held != self.status.acknowledged:
                LOG.info("holding the previous bucket sets of %d LBs (published)", len(held))
            self._published = text
        self.status.acknowledged = held
        self._acked_plan = plan

    def _read_nb(self, everything: bool = False):
        """The NB view; the LBs it changed are queued for the planner and the writer."""
        nb_view, changed = self.nb_reader.read(everything)
        self.status.missed_changes = self.nb_reader.missed_changes
        noticed = self.nb_reader.noticed_at
        if noticed is not None and (self._noticed_at is None or noticed < self._noticed_at):
            self._noticed_at = noticed
        self._plan_changes = _union(self._plan_changes, changed)
        self._writer_changes = _union(self._writer_changes, changed)
        return nb_view

    def _write_nb(self, nb_view, sb_view):
        """As the NB writer (if we hold its lock): write ids and status; the view after."""
        has_lock = self.nb.has_lock
        if has_lock != self.status.nb_writer:
            LOG.info("NB writer lock %s", "acquired: this agent writes bucket ids and "
                     "status" if has_lock else "not held: another agent writes")
        self.status.nb_writer = has_lock
        if not has_lock:
            # Whoever writes meanwhile, on getting the lock we look at every LB.
            self._writer_changes = None
            return nb_view
        changed = self.writer.reconcile(nb_view, self._writer_changes, sb_view,
                                        self.sb_reader.installed)
        self._writer_changes = frozenset()
        if self.writer.last_error:
            self._schedule_retry(1.0)   # the LBs it could not write are tried again
        if changed:
            nb_view = self._read_nb()   # we just changed it: plan from the new rows
        due = self.writer.next_due()
        if due is not None:
            # A wait for acknowledgements runs out, or a window closes, then.
            self._schedule_retry(due - time.time() + 0.05)
        return nb_view

    @staticmethod
    def _log_status_changes(old: specs.Plan | None, new: specs.Plan,
                            lbs: frozenset[str] | None) -> None:
        """Log the status of the LBs that changed (`lbs`; None: look at all)."""
        before = old.lb_status if old is not None else {}
        uuids = set(new.lb_status) | set(before) if lbs is None else lbs
        # A batch of thousands: OK lines at DEBUG and a count at INFO (warnings stay).
        quiet = len(uuids) > nb_writer.LOG_EACH_MAX
        quieted = 0
        for uuid in sorted(uuids, key=lambda u: (new.lb_status.get(u) or before[u]).name):
            status, prev = new.lb_status.get(uuid), before.get(uuid)
            if status is None:
                if prev is not None:
                    LOG.info("LB %s: no longer stateless", prev.name)
                continue
            if prev is not None and (prev.state, prev.message, prev.roles) == (
                    status.state, status.message, status.roles):
                continue
            level = logging.WARNING if status.state == specs.STATE_ERROR else logging.INFO
            if quiet and level == logging.INFO:
                level = logging.DEBUG
                quieted += 1
            LOG.log(level, "LB %s: %s%s (here: %s)", status.name, status.state,
                    f": {status.message}" if status.message else "",
                    ", ".join(status.roles) or "nothing")
        if quieted:
            LOG.info("%d LBs changed status (each at DEBUG)", quieted)

    def _refresh_layout(self) -> None:
        try:
            sb = tables.SbQuery(self.sb_remote)
            layout = tables.derive_layout(
                sb, lambda c: self.ofctl.run("dump-flows", f"cookie={c:#x}/-1", "--no-stats")
            )
        except (tables.LayoutError, OfctlError) as exc:
            LOG.info("OpenFlow table layout not known yet: %s", exc)
            if self._layout is not None:
                # Keep serving with the last layout; look again soon.
                with self._mutex:
                    self._layout_stale = True
                self._schedule_retry(1.0)
            return
        if layout != self._layout:
            LOG.info("table layout now %s", layout)
        self._layout = layout
        self.status.layout = asdict(layout)

    def state(self) -> AgentState:
        """An immutable copy of what the control socket may show."""
        status = asdict(self.status)
        status["connections"] = {
            name: bool(w is not None and w.connected)
            for name, w in (("nb", self.nb), ("sb", self.sb), ("ovs", self.ovs))
        }
        status["nb_writer_error"] = self.writer.last_error if self.writer else None
        status["monitor_restarts"] = self.monitor.restarts if self.monitor else 0
        return AgentState(MappingProxyType(status), self.snapshot, self.plan,
                          self.plan_config, self.bridge, self.ofctl)


class _PhaseClock:
    """Milliseconds spent per phase of one iteration."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = self._start = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = round((now - self._last) * 1000, 2)
        self.laps["total"] = round((now - self._start) * 1000, 2)
        self._last = now


class _LapsText:
    """An iteration's laps as `read_nb 1.2, plan 3.4, ...`, formatted only if logged."""

    def __init__(self, laps: dict[str, float]) -> None:
        self.laps = laps

    def __str__(self) -> str:
        laps = {k: v for k, v in self.laps.items() if k != "total"}
        laps["total"] = self.laps.get("total", 0.0)   # last, whatever the order
        return ", ".join(f"{phase} {ms:g}" for phase, ms in laps.items())


def _largest_vip(nb_view) -> int:
    """The most backends any VIP of any NB load balancer (native ones too) lists: a
    bound on the buckets of every LB group ovn-controller or we put on the bridge."""
    largest = 0
    for lb in nb_view.load_balancers.values():
        for backends in lb.vips.values():
            if isinstance(backends, str):
                largest = max(largest, backends.count(",") + 1)
    return largest


def _union(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    """Two sets of changed uuids, where None stands for "all"."""
    return None if a is None or b is None else a | b


def _configure_ssl(conf: cfg.ConfigOpts) -> None:
    """python-ovs keeps one global SSL identity: NB and SB share it when both use SSL."""
    import ovs.stream

    key = conf.ovn.ovn_sb_private_key or conf.ovn.ovn_nb_private_key
    cert = conf.ovn.ovn_sb_certificate or conf.ovn.ovn_nb_certificate
    ca = conf.ovn.ovn_sb_ca_cert or conf.ovn.ovn_nb_ca_cert
    if key and cert and ca:
        ovs.stream.Stream.ssl_set_private_key_file(key)
        ovs.stream.Stream.ssl_set_certificate_file(cert)
        ovs.stream.Stream.ssl_set_ca_cert_file(ca)


def setup_logging(conf: cfg.ConfigOpts) -> None:
    handler: logging.Handler
    if conf.log_file:
        handler = logging.FileHandler(conf.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(process)d %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if conf.debug else logging.INFO)
    # ovsdbapp and python-ovs are chatty at DEBUG; keep them at INFO unless asked.
    for noisy in ("ovsdbapp", "ovs"):
        logging.getLogger(noisy).setLevel(logging.INFO)


def tune_memory() -> None:
    """Settings for a process that holds ~10^6 long-lived objects at 10,000 LBs
    (docs/scale.md): young-generation collections less often (each one costs about the
    same however few objects died), and, with glibc, two malloc arenas instead of one per
    thread (python-ovs and ovsdbapp run several), which left freed memory scattered."""
    gc.set_threshold(20_000, 20, 20)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass   # not glibc


def release_memory() -> None:
    """Hand memory freed after a large pass (a full read of every row) back to the OS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_M_ARENA_MAX = -8


def main(argv: list[str] | None = None) -> int:
    tune_memory()
    conf = cfg.ConfigOpts()
    config.register_opts(conf)
    conf(argv if argv is not None else sys.argv[1:], project="statelesslb",
         prog="statelesslb-agent")
    setup_logging(conf)
    agent = Agent(conf)
    import signal

    def _terminate(signum, frame):
        LOG.info("signal %d: stopping", signum)
        agent._stop.set()
        agent._wake.set()

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    # `kill -USR2 <pid>`: every thread's stack on stderr, for an agent that seems stuck.
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    try:
        agent.start()
        agent.run()
    finally:
        agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
