"""ovsdbapp clients for the NB, the SB and the local Open vSwitch database.

Each watcher keeps ovsdbapp's in-memory copy of the tables it needs and, through
ovsdbapp row events, tells the agent that something changed. The readers turn
that copy into model views: a row is converted again only when the IDL reported
a change to it (so one changed LB costs one row, not a thousand), and everything
is re-read after a reconnect, when the IDL may have replaced its whole copy
without reporting deletions (python-ovs clears it silently).
"""

from __future__ import annotations

import logging
import queue
import time
import uuid as uuid_lib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import tenacity
from ovs.db import idl as ovs_idl
from ovsdbapp.backend.ovs_idl import connection, idlutils

from statelesslb.nb import model
from statelesslb.nb.parse import parse_ip
from statelesslb.ofstrings import ip_text, is_plain_int

LOG = logging.getLogger(__name__)

# on_change(source, reconnected): called from ovsdbapp's threads; must be cheap.
ChangeCallback = Callable[[str, bool], None]

# The tables, and in them the columns, the agent reads (or writes): python-ovs keeps
# every registered column of every row in memory, and unregistered ones are never
# sent. A column a schema lacks (Service_Monitor.type before 24.09) is left out.
NB_TABLES: dict[str, tuple[str, ...]] = {
    "Load_Balancer": ("name", "protocol", "vips", "options", "external_ids",
                      "ip_port_mappings"),
    "Load_Balancer_Group": ("load_balancer",),
    "Logical_Router": ("name", "ports", "load_balancer", "load_balancer_group"),
    "Logical_Router_Port": ("name", "mac", "networks", "gateway_chassis",
                            "ha_chassis_group", "options"),
    "Logical_Switch": ("name", "ports"),
    "Logical_Switch_Port": ("name", "type", "addresses", "options", "tag_request"),
    "Gateway_Chassis": ("chassis_name",),
    "HA_Chassis_Group": ("ha_chassis",),
    "HA_Chassis": ("chassis_name",),
}
# Chassis_Private: where each agent acknowledges the previous bucket sets it holds.
SB_TABLES: dict[str, tuple[str, ...]] = {
    "Chassis": ("name",),
    "Chassis_Private": ("name", "external_ids"),
    "Datapath_Binding": ("external_ids", "tunnel_key"),
    "Port_Binding": ("logical_port", "tunnel_key", "datapath", "chassis"),
    "Service_Monitor": ("type", "ip", "port", "protocol", "status"),
}
# SB tables the SbView is built from (acknowledgements are read on their own).
_SB_VIEW_TABLES = frozenset(SB_TABLES) - {"Chassis_Private"}
# NB tables the LB-independent part of the view (routers, ports, switches) comes from.
NB_TOPOLOGY_TABLES = frozenset(NB_TABLES) - {"Load_Balancer"}
OVS_TABLES: dict[str, tuple[str, ...]] = {"Open_vSwitch": ("external_ids",)}


@dataclass
class Changes:
    """Rows the IDL reported changed since the last take_changes()."""

    rows: dict[str, set[uuid_lib.UUID]] = field(default_factory=dict)   # table -> uuids
    # Row -> the columns its updates changed (None: created, deleted, or not known).
    columns: dict[uuid_lib.UUID, set[str] | None] = field(default_factory=dict)
    everything: bool = True    # reconnected (or never read): re-read every row
    first_at: float | None = None   # time.monotonic() of the first notice among them


class WatchedIdl(connection.OvsdbIdl):
    """An IDL that reports row changes and reconnects to the agent, and notes changed rows.

    No ovsdbapp row events: their matching formats every row for a debug message
    and copies it for the event thread, which at 1,000 LBs was a third of the
    agent's CPU time (docs/scale.md); the agent only needs "something changed".
    """

    def __init__(self, source, remote, helper, on_change, leader_only=True):
        super().__init__(remote, helper, leader_only=leader_only)
        self.source = source
        self._on_change = on_change
        self._seqno = None
        self._was_connected = False
        self._held = False
        self._notified = False
        self.changes = Changes()

    def notify(self, event, row, updates=None):
        # Runs inside Idl.run(), under the connection lock: a reader holding the lock
        # sees rows and marks agree. The callback only wakes the agent.
        changes = self.changes
        changes.rows.setdefault(row._table.name, set()).add(row.uuid)
        # Which columns changed: an update carries the old values of those alone.
        old = getattr(updates, "_data", None) if event == ovs_idl.ROW_UPDATE else None
        if not isinstance(old, dict):
            changes.columns[row.uuid] = None
        elif row.uuid not in changes.columns:
            changes.columns[row.uuid] = set(old)
        else:
            known = changes.columns[row.uuid]
            if known is not None:
                known.update(old)
        if self.changes.first_at is None:
            self.changes.first_at = time.monotonic()
        self._notified = True   # run() wakes the agent once for all of its rows

    def cooperative_yield(self):
        # ovsdbapp sleeps(0) per row for eventlet's sake; the agent uses real threads.
        pass

    def run(self):
        monitoring_before = self.state == self.IDL_S_MONITORING
        try:
            changed = super().run()
        finally:
            if self._notified:
                self._notified = False
                self._on_change(self.source, False)
        if not monitoring_before and self.state == self.IDL_S_MONITORING:
            # A monitor reply just (re)filled the copy, maybe after clearing it
            # without a delete notice per row: only a full re-read is safe.
            self.changes.everything = True
        connected = self._session.is_connected()
        if self._was_connected and not connected:
            LOG.warning("%s: lost the connection to %s; reconnecting with backoff",
                        self.source, self._session.get_name())
        self._was_connected = connected
        seqno = self._session.get_seqno()
        if seqno != self._seqno:
            # A new session: the server sends its whole content again.
            self._seqno = seqno
            self.changes.everything = True
            LOG.info("%s: (re)connected to %s", self.source, self._session.get_name())
            self._on_change(self.source, True)
        if self.lock_name:
            held = self.holds_lock
            if held != self._held:
                # Logged from the IDL's thread as it happens (the failover checks read
                # these lines), before the agent may act on it (lock_announced); a lock
                # granted without any row change wakes the agent too.
                LOG.info("%s: lock %s %s at %s", self.source, self.lock_name,
                         "held" if held else "not held", self._session.get_name())
                self._held = held
                self._on_change(self.source, False)
        return changed

    @property
    def holds_lock(self) -> bool:
        """The server granted our lock on this session, and the session is one we may
        write on: connected and monitoring (with leader_only, on the cluster leader).

        python-ovs keeps `has_lock` True while disconnected, and asks for the lock on a
        new session before it checked that the server leads (a follower grants it: locks
        are per server); neither may count as holding it.
        """
        return (bool(self.has_lock) and self._session.is_connected()
                and self.state == self.IDL_S_MONITORING)

    @property
    def lock_announced(self) -> bool:
        """The lock as last logged: the agent writes only once the log says it holds it,
        so no write is ever logged before the lock that allowed it."""
        return self._held

    @property
    def connected(self) -> bool:
        return self._session.is_connected()


@tenacity.retry(
    wait=tenacity.wait_exponential(multiplier=0.2, max=10),
    stop=tenacity.stop_after_delay(300),
    retry=tenacity.retry_if_exception_type(Exception),
    before_sleep=lambda rs: LOG.warning(
        "cannot reach %s yet (%s); retrying", rs.args[1], rs.outcome.exception()
    ),
    reraise=True,
)
def _schema_helper(schema: str, remote: str) -> ovs_idl.SchemaHelper:
    return idlutils.get_schema_helper(remote, schema)


class _CommitJob:
    """One python-ovs transaction, built and committed by the connection's own thread.

    Only that thread may run the IDL: ovsdbapp's loop computes what to poll for
    without the connection lock, so a commit_block() elsewhere (which runs the IDL
    too) can reconnect the session under it and leave it polling for a session that
    is gone, deaf to the new one until something else wakes it (seen: a gateway's
    agent hearing nothing for 30 s after an NB leader died during its write, while
    its new session held the writer lock). ovsdbapp wakes its thread for a queued
    job and runs do_commit() with the connection lock held.
    """

    commands: tuple = ()   # ovsdbapp's queue-full error reads it

    def __init__(self, idl: ovs_idl.Idl, build: Callable[[ovs_idl.Transaction], None],
                 done: Callable[[str], None] | None):
        self.idl, self.build, self.done = idl, build, done
        self.results: queue.Queue = queue.Queue(maxsize=1)

    def do_commit(self) -> tuple[str, str | None]:
        txn = ovs_idl.Transaction(self.idl)
        try:
            self.build(txn)
        except BaseException:
            txn.abort()   # else the IDL keeps it as open and refuses to run
            raise
        status = txn.commit_block()
        if self.done is not None:
            self.done(status)
        return status, txn.get_error()


class Watcher:
    """One database: its IDL, the ovsdbapp connection thread and a lock on reads."""

    def __init__(
        self,
        source: str,
        schema: str,
        remote: str,
        tables: Mapping[str, tuple[str, ...]],
        on_change: ChangeCallback,
        timeout: int = 60,
        lock_name: str | None = None,
        max_backoff: float | None = None,
        leader_only: bool = True,
    ):
        helper = _schema_helper(schema, remote)
        known = helper.schema_json["tables"]
        for table, columns in tables.items():
            present = [c for c in columns if c in known[table]["columns"]]
            helper.register_columns(table, present)
        self.idl = WatchedIdl(source, remote, helper, on_change, leader_only=leader_only)
        if max_backoff is not None:
            # python-ovs: at least 1 s between attempts after the free ones (one per remote).
            self.idl._session.reconnect.set_backoff(1000, int(max_backoff * 1000))
        if lock_name:
            self.idl.set_lock(lock_name)
        self.connection = connection.Connection(self.idl, timeout)
        self.source = source
        self.remote = remote

    def start(self) -> None:
        self.connection.start()

    def stop(self) -> None:
        self.connection.stop(timeout=5)

    def rows(self, table: str):
        return list(self.idl.tables[table].rows.values())

    def take_changes(self) -> Changes:
        """The changes noted since the last call (call with connection.lock held)."""
        changes, self.idl.changes = self.idl.changes, Changes(everything=False)
        return changes

    def commit(self, build: Callable[[ovs_idl.Transaction], None],
               done: Callable[[str], None] | None = None,
               timeout: float | None = None) -> tuple[str, str | None]:
        """Commit one transaction from the connection's thread (see _CommitJob):
        `build(txn)` makes the changes and `done(status)` runs after the commit, both
        there with the connection lock held. Returns (status, error text); status
        "timed out" if no result came within `timeout` seconds (the job may still run).
        """
        job = _CommitJob(self.idl, build, done)
        self.connection.queue_txn(job)
        try:
            result = job.results.get(timeout=timeout or self.connection.timeout)
        except queue.Empty:
            return "timed out", None
        if isinstance(result, idlutils.ExceptionResult):
            raise result.ex
        return result

    @property
    def connected(self) -> bool:
        return self.idl.connected

    @property
    def has_lock(self) -> bool:
        # Announced (logged) and still held now: a lost lock stops writes at once.
        return bool(self.idl.lock_name) and self.idl.lock_announced and self.idl.holds_lock


def _opt(value):
    """Optional OVSDB columns come as 0- or 1-element lists."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _gateway_chassis_names(lrp_row) -> tuple[str, ...]:
    names = [gc.chassis_name for gc in lrp_row.gateway_chassis]
    for group in lrp_row.ha_chassis_group:
        names.extend(ha.chassis_name for ha in group.ha_chassis)
    redirect = lrp_row.options.get("redirect-chassis")
    if redirect:
        names.append(redirect)
    return tuple(sorted(set(names)))


def read_local_ovs(watcher: Watcher) -> dict[str, str]:
    with watcher.connection.lock:
        rows = watcher.rows("Open_vSwitch")
        return dict(rows[0].external_ids) if rows else {}


def lb_model(row) -> model.NbLoadBalancer:
    """A Load_Balancer row as the model (call with the connection lock held)."""
    return model.NbLoadBalancer(
        uuid=str(row.uuid),
        name=row.name,
        protocol=_opt(row.protocol),
        vips=dict(row.vips),
        options=dict(row.options),
        external_ids=dict(row.external_ids),
        ip_port_mappings=dict(row.ip_port_mappings),
    )


def referenced_uuids(row, column: str, targets: Mapping) -> list[str]:
    """`[str(r.uuid) for r in row.<column>]` for a set of references to `targets`'
    rows, in the same order (by uuid), without python-ovs's conversion: that makes a
    Row of each reference and sorts them with Python-level comparisons, O(n log n)
    calls on every read of a router with 10,000 LBs (a quarter of a gateway agent's
    time in a 10,000-LB install, docs/scale.md). The text of uuids sorts as the uuids
    do. A row with changes of our own pending is read the usual way (the agent never
    changes the rows read here)."""
    datum = row._data.get(column) if row._data is not None else None
    if datum is None or row._changes or row._mutations:
        return [str(r.uuid) for r in getattr(row, column)]
    return sorted(str(atom.value) for atom in datum.values if atom.value in targets)


def _topology(watcher: Watcher) -> tuple[dict, dict, dict, dict]:
    """(routers, router ports, switches, switch ports): the NB but its LBs."""
    routers = {}
    lb_rows = watcher.idl.tables["Load_Balancer"].rows
    for row in watcher.rows("Logical_Router"):
        lb_ids = referenced_uuids(row, "load_balancer", lb_rows)
        for group in row.load_balancer_group:
            lb_ids.extend(referenced_uuids(group, "load_balancer", lb_rows))
        routers[str(row.uuid)] = model.NbRouter(
            uuid=str(row.uuid),
            name=row.name,
            ports=tuple(p.name for p in row.ports),
            load_balancers=tuple(dict.fromkeys(lb_ids)),
        )
    router_ports = {}
    for row in watcher.rows("Logical_Router_Port"):
        router_ports[row.name] = model.NbRouterPort(
            uuid=str(row.uuid),
            name=row.name,
            mac=row.mac,
            networks=tuple(row.networks),
            is_gateway=bool(
                row.gateway_chassis
                or row.ha_chassis_group
                or row.options.get("redirect-chassis")
            ),
            gateway_chassis=_gateway_chassis_names(row),
        )
    switches = {
        str(row.uuid): model.NbSwitch(
            uuid=str(row.uuid), name=row.name, ports=tuple(p.name for p in row.ports)
        )
        for row in watcher.rows("Logical_Switch")
    }
    switch_ports = {
        row.name: model.NbSwitchPort(
            uuid=str(row.uuid),
            name=row.name,
            type=row.type,
            addresses=tuple(row.addresses),
            options=dict(row.options),
            tag_request=_opt(row.tag_request),
        )
        for row in watcher.rows("Logical_Switch_Port")
    }
    return routers, router_ports, switches, switch_ports


class NbReader:
    """The NB view, converted again only where the IDL reported changed rows.

    Each read hands out new top-level mappings and never mutates one it handed
    out; the topology mappings stay the very same objects while no topology row
    changed, which lets the planner and the NB writer skip comparing them.

    A read with `everything=True` (the agent's periodic resync) converts every
    row again and checks the change tracking against it: rows that differ
    without a notice are counted in `missed_changes` and logged.
    """

    def __init__(self, watcher: Watcher):
        self.watcher = watcher
        self.missed_changes = 0
        # time.monotonic() of the first change notice behind the last read, if any.
        self.noticed_at: float | None = None
        self._lbs: dict[str, model.NbLoadBalancer] = {}
        self._topology: tuple[dict, dict, dict, dict] | None = None

    def read(self, everything: bool = False) -> tuple[model.NbView, frozenset[str] | None]:
        """(the view, uuids of the LBs changed since the last read; None: maybe all)."""
        with self.watcher.connection.lock:
            changes = self.watcher.take_changes()
            self.noticed_at = changes.first_at
            lb_rows = self.watcher.idl.tables["Load_Balancer"].rows
            touched = changes.rows.get("Load_Balancer", set())
            changed: frozenset[str] | None
            if changes.everything or everything:
                lbs = {str(row.uuid): lb_model(row) for row in lb_rows.values()}
                if not changes.everything:
                    self._check_lbs(lbs, {str(u) for u in touched})
                self._lbs, changed = lbs, None
            else:
                for row_uuid in touched:
                    row = lb_rows.get(row_uuid)
                    key = str(row_uuid)
                    if row is None:
                        self._lbs.pop(key, None)
                        continue
                    old = self._lbs.get(key)
                    columns = changes.columns.get(row_uuid)
                    if old is not None and columns is not None and columns <= {"external_ids"}:
                        # Only its external_ids (the NB writer's own update, typically):
                        # the other columns are converted already.
                        self._lbs[key] = model.NbLoadBalancer(
                            old.uuid, old.name, old.protocol, old.vips, old.options,
                            dict(row.external_ids), old.ip_port_mappings)
                    else:
                        self._lbs[key] = lb_model(row)
                changed = frozenset(str(u) for u in touched)
            topology_touched = not NB_TOPOLOGY_TABLES.isdisjoint(changes.rows)
            if changes.everything or everything or topology_touched or self._topology is None:
                topology = _topology(self.watcher)
                if (everything and not changes.everything and not topology_touched
                        and topology != self._topology):
                    self._missed("the NB topology (routers, ports, switches)")
                self._topology = topology
        return model.NbView(dict(self._lbs), *self._topology), changed

    def _check_lbs(self, fresh: dict[str, model.NbLoadBalancer], notified: set[str]) -> None:
        for uuid in sorted(fresh.keys() | self._lbs.keys()):
            if uuid not in notified and fresh.get(uuid) != self._lbs.get(uuid):
                self._missed(f"Load_Balancer {uuid}")

    def _missed(self, what: str) -> None:
        # Should never happen; if it does, this full read has repaired it.
        self.missed_changes += 1
        LOG.warning("%s changed without a change notice from the IDL; re-read in full",
                    what)


def _sb_view(watcher: Watcher) -> model.SbView:
    datapath_keys = {}
    for row in watcher.rows("Datapath_Binding"):
        ext = row.external_ids
        nb_uuid = ext.get("logical-router") or ext.get("logical-switch")
        if nb_uuid:
            datapath_keys[nb_uuid] = row.tunnel_key
    port_bindings = {}
    for row in watcher.rows("Port_Binding"):
        chassis = _opt(row.chassis)
        datapath = row.datapath
        port_bindings[row.logical_port] = model.SbPortBinding(
            logical_port=row.logical_port,
            tunnel_key=row.tunnel_key,
            datapath_key=datapath.tunnel_key if datapath is not None else 0,
            chassis=chassis.name if chassis is not None else None,
        )
    return model.SbView(datapath_keys, port_bindings, _service_monitors(watcher))


def _service_monitors(watcher: Watcher) -> dict[tuple[str, int, str], str]:
    """OVN's health check results, by backend; rows that are not an LB backend's
    probe, or are malformed, are left out (that backend counts as unchecked)."""
    out = {}
    for row in watcher.rows("Service_Monitor"):
        kind = _opt(getattr(row, "type", None))   # 24.09+: load-balancer / network-function
        if kind not in (None, "", "load-balancer"):
            continue
        ip = parse_ip(row.ip)
        port = row.port
        protocol = _opt(row.protocol) or "tcp"
        status = _opt(row.status) or ""
        if ip is None or not is_plain_int(port) or not 0 < port <= 0xFFFF \
                or protocol not in ("tcp", "udp") or not isinstance(status, str):
            continue
        out[(ip_text(ip), port, protocol)] = status
    return out


class SbReader:
    """The SB view, rebuilt only after the SB changed (the same object otherwise).

    `installed` is every chassis' `statelesslb:installed` text (by chassis name),
    rebuilt from Chassis_Private (and the same object while it did not change).
    """

    def __init__(self, watcher: Watcher):
        self.watcher = watcher
        self._view: model.SbView | None = None
        self.installed: dict[str, str] = {}

    def read(self) -> model.SbView:
        with self.watcher.connection.lock:
            changes = self.watcher.take_changes()
            if (self._view is None or changes.everything
                    or not _SB_VIEW_TABLES.isdisjoint(changes.rows)):
                self._view = _sb_view(self.watcher)
            if changes.everything or "Chassis_Private" in changes.rows:
                installed = _installed(self.watcher)
                if installed != self.installed:
                    self.installed = installed
            return self._view


def _installed(watcher: Watcher) -> dict[str, str]:
    from statelesslb.nb.acks import EXT_INSTALLED

    out = {}
    for row in watcher.rows("Chassis_Private"):
        text = row.external_ids.get(EXT_INSTALLED)
        if isinstance(row.name, str) and text is not None:
            out[row.name] = text
    return out


def publish_installed(watcher: Watcher, chassis: str, text: str) -> bool | None:
    """Set `statelesslb:installed` on this chassis' Chassis_Private row (only that key).

    True: written (or already so); None: no row yet (ovn-controller creates it);
    False: the transaction failed (try again later).
    """
    from statelesslb.nb.acks import EXT_INSTALLED

    with watcher.connection.lock:
        row = next((r for r in watcher.rows("Chassis_Private") if r.name == chassis), None)
        if row is None:
            return None
        if row.external_ids.get(EXT_INSTALLED) == text:
            return True

    def build(txn: ovs_idl.Transaction) -> None:
        # Looked up again: the row may have gone meanwhile (then nothing to write).
        for r in watcher.rows("Chassis_Private"):
            if r.name == chassis:
                r.setkey("external_ids", EXT_INSTALLED, text)
    status, _error = watcher.commit(build)
    if status in (ovs_idl.Transaction.SUCCESS, ovs_idl.Transaction.UNCHANGED):
        return True
    LOG.warning("could not publish %s on Chassis_Private %s: %s", EXT_INSTALLED, chassis,
                status)
    return False
