"""Failover under churn: the pieces bench/cluster_failover.py and tests/sandbox/test_cluster.py
share.

- `make_lbs` creates stateless LBs c0..cN-1 and waits for their groups on the gateways;
- `Churner` (a thread) removes or re-adds one backend of one LB every 1/rate seconds, round
  robin, as bench/churn.py does, retrying a change the NB refused (a leader was killed)
  until it is committed, and remembers every committed change;
- `Tracker` (a thread) notes when each committed change shows on a gateway's group;
- `lock_intervals` reads, from the agents' logs, when each agent held the NB writer lock
  (the lines watchers.WatchedIdl logs from the IDL thread as it happens);
- `check_groups` compares every gateway's groups with the bucket sets the NB puts in
  force (traffic.groups_in_force).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from statelesslb.nb.model import EXT_BUCKETS, EXT_VIP_IDS
from statelesslb.sandbox.chassis import Chassis
from statelesslb.sandbox.core import Sandbox
from statelesslb.sandbox.processes import CommandError, parse_ctl_json, wait_until
from statelesslb.sandbox.traffic import GROUP_BASE, groups_in_force, our_groups

LOG = logging.getLogger(__name__)

NB_LOCK = "statelesslb_nb_writer"
VIP = "172.22.{}.{}:80"
_LOCK_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \d+ INFO statelesslb\.\S*watchers nb: lock "
    + NB_LOCK + r" (held|not held) at ")
_WRITE_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \d+ INFO statelesslb\.\S+ NB writer: "
    r"(\d+) LBs written")


def vip_of(i: int) -> str:
    return VIP.format(i // 250, 1 + i % 250)


def make_lbs(sb: Sandbox, count: int, backends: list[str],
             timeout: float = 60.0) -> dict[str, int]:
    """Stateless LBs c0..c<count-1> on lr0, every one with `backends`; returns their
    group ids once every gateway holds every group."""
    cmd: list[str] = []
    for i in range(count):
        name = f"c{i}"
        cmd += ["--", "lb-add", name, vip_of(i), ",".join(backends), "tcp",
                "--", "lr-lb-add", "lr0", name,
                "--", "set", "load_balancer", name, "options:stateless_mode=mac"]
    sb.nbctl(*cmd[1:], timeout=timeout)

    def all_ids() -> dict[str, int] | None:
        ids = nb_ids(sb)
        if len(ids) < count or any(not vip for vip, _ in ids.values()):
            return None
        return {name: GROUP_BASE + next(iter(vip.values())) for name, (vip, _) in ids.items()}
    gids = wait_until(all_ids, timeout, 0.1, "bucket ids of every LB")
    for gw in sb.gateway_chassis:
        wait_until(lambda gw=gw: len(our_groups(gw, known=tuple(gids.values()))) == count,
                   timeout, 0.2, f"every group on {gw.name}")
    return gids


def nb_ids(sb: Sandbox) -> dict[str, tuple[dict[str, int], dict[str, int]]]:
    """{LB name: (VIP ids, bucket ids)} of every LB, in one NB read."""
    rows = parse_ctl_json(sb.nbctl("--format=json", "--columns=name,external_ids",
                                   "list", "load_balancer"))
    return {r["name"]: (json.loads(r["external_ids"].get(EXT_VIP_IDS, "{}")),
                        json.loads(r["external_ids"].get(EXT_BUCKETS, "{}"))) for r in rows}


def nb_vips(sb: Sandbox) -> dict[str, dict[str, str]]:
    rows = parse_ctl_json(sb.nbctl("--format=json", "--columns=name,vips",
                                   "list", "load_balancer"))
    return {r["name"]: r["vips"] for r in rows}


def bucket_count(chassis: Chassis, gid: int) -> int:
    """Buckets of one group: a dump of that group only, cheap enough to poll often."""
    return chassis.ofctl("dump-groups", str(gid)).count("bucket_id:")


@dataclass
class Change:
    lb: str
    members: tuple[str, ...]
    started: float       # time.time() before the first attempt
    committed: float     # time.time() once ovn-nbctl returned success
    attempts: int = 1
    seen: float | None = None      # on the tracked gateway
    superseded: bool = False       # a later change of the same LB came first


# Seconds from a writer agent's kill to its restart (systemd/statelesslb-agent.service's
# RestartSec).
RESTART_SEC = 2.0

# Seconds the churn's ovn-nbctl waits for a commit before it gives up and tries again.
CHURN_NBCTL_TIMEOUT = 5


class Churner(threading.Thread):
    """Change one backend of one LB every 1/rate seconds, round robin over c0..c<lbs-1>
    (bench/churn.py's rate). Each visit of an LB leaves out the next backend but the
    first (and so re-adds the one the visit before left out): every change gives the LB
    a member set its gateway group did not have just before, and a change the gateways
    never got cannot pass for the next one (as it could if the same backend were
    removed and re-added in turn). A backend re-added gets a bucket id anew (possibly
    another one); the first backend is never touched, so its id must never change."""

    def __init__(self, sb: Sandbox, lbs: int, backends: list[str], rate: float = 5.0):
        super().__init__(name="churner", daemon=True)
        self.sb, self.lbs, self.backends, self.rate = sb, lbs, backends, rate
        self.changes: list[Change] = []
        self.failed_attempts = 0
        self.last_set: dict[str, tuple[str, ...]] = {}   # LB -> backends last committed
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def stop(self) -> None:
        self._halt.set()
        self.join(60)

    def snapshot(self) -> list[Change]:
        with self._lock:
            return list(self.changes)

    def members(self, n: int) -> tuple[str, ...]:
        """Change n: backends[0] stays (its ids must never change), visit v of the LB
        leaves out backends[1 + v mod (len - 1)]."""
        rotating = self.backends[1:]
        out = rotating[(n // self.lbs) % len(rotating)]
        return tuple(b for b in self.backends if b != out)

    def run(self) -> None:
        start = time.monotonic()
        n = 0
        while not self._halt.is_set():
            i = n % self.lbs
            members = self.members(n)
            name = f"c{i}"
            started = time.time()
            attempts = 0
            while True:
                attempts += 1
                try:
                    # 5 s: after a leader's death ovn-nbctl sometimes waited out its whole
                    # timeout (20 s, then) before trying again; a CMS retries sooner.
                    self.sb.nbctl("set", "load_balancer", name,
                                  f'vips:"{vip_of(i)}"="{",".join(members)}"',
                                  timeout=CHURN_NBCTL_TIMEOUT)
                    break
                except CommandError as exc:
                    # ovn-nbctl gave up (it tried the dead leader, or no leader came
                    # within its timeout): the change is still owed, try it again.
                    self.failed_attempts += 1
                    LOG.info("churn: %s not committed (%s); again", name, exc)
                    if self._halt.wait(0.1):
                        return
            with self._lock:
                self.changes.append(Change(name, members, started, time.time(), attempts))
                self.last_set[name] = members
            n += 1
            self._halt.wait(max(0.0, start + n / self.rate - time.monotonic()))


_MAC_RE = re.compile(r"set_field:([0-9a-f:]{17})->eth_dst")


def group_macs(chassis: Chassis, gid: int) -> frozenset[str]:
    """The backend MACs one group's buckets steer to (a dump of that group only)."""
    return frozenset(_MAC_RE.findall(chassis.ofctl("dump-groups", str(gid))))


class Tracker(threading.Thread):
    """Notes when each committed change shows on `gateway`: its group steering to
    exactly the MACs of the change's backends (`macs`: backend "IP:port" -> MAC)."""

    def __init__(self, churner: Churner, gateway: Chassis, gids: dict[str, int],
                 macs: dict[str, str]):
        super().__init__(name="tracker", daemon=True)
        self.churner, self.gateway, self.gids, self.macs = churner, gateway, gids, macs
        self._halt = threading.Event()
        self._done: set[int] = set()

    def stop(self) -> None:
        self._halt.set()
        self.join(30)

    def run(self) -> None:
        while not self._halt.is_set():
            self.poll()
            self._halt.wait(0.02)

    def poll(self) -> None:
        changes = self.churner.snapshot()
        latest: dict[str, int] = {}
        for k, c in enumerate(changes):
            latest[c.lb] = k
        for k, c in enumerate(changes):
            if k in self._done:
                continue
            if latest[c.lb] != k:
                # A later change of the same LB was committed before this one showed:
                # the later one stands for both (resolved() follows it).
                c.superseded = True
                self._done.add(k)
                continue
            try:
                have = group_macs(self.gateway, self.gids[c.lb])
            except CommandError:
                continue
            if have == {self.macs[b] for b in c.members}:
                c.seen = time.time()
                self._done.add(k)

    def pending(self) -> list[Change]:
        return [c for k, c in enumerate(self.churner.snapshot()) if k not in self._done]


def resolved_at(changes: list[Change]) -> list[float | None]:
    """When the gateway got past each change: when it showed, or, for one superseded
    before it showed, when the LB's next change (recursively) did."""
    out: list[float | None] = [None] * len(changes)
    following: dict[str, int] = {}
    for k in range(len(changes) - 1, -1, -1):
        c = changes[k]
        if c.seen is not None:
            out[k] = c.seen
        elif c.superseded and c.lb in following:
            out[k] = out[following[c.lb]]
        following[c.lb] = k
    return out


def convergence(changes: list[Change], t_kill: float) -> dict[str, float | None]:
    """Seconds from a kill to convergence: the first moment at which a change committed
    after the kill showed on the gateway, and so had (itself or a later change of its
    LB) every change committed before it. Also the largest commit-to-gateway latency of
    the changes committed from 2 s before the kill to that moment."""
    resolved = resolved_at(changes)
    converged = None
    worst_before = 0.0
    for k, c in enumerate(changes):
        r = resolved[k]
        if c.committed >= t_kill and c.seen is not None and worst_before is not None:
            converged = max(c.seen, worst_before) - t_kill
            break
        if worst_before is not None:
            worst_before = None if r is None else max(worst_before, r)
    first_after = min((c.seen for c in changes if c.committed >= t_kill and c.seen),
                      default=None)
    lat = [resolved[k] - c.committed for k, c in enumerate(changes)
           if resolved[k] is not None and c.committed >= t_kill - 2
           and (converged is None or c.committed <= t_kill + converged)]
    return {"converged": converged,
            "first_change_after": None if first_after is None else first_after - t_kill,
            "worst_latency": max(lat) if lat else None}


# -- the NB writer lock, from the agents' logs ------------------------------------------

# Seconds after a kill's recorded time during which the dying agent's log may still show
# a write it committed before the signal landed, when no later grant of the lock bounds it.
DEATH_SLACK = 0.005


def log_time(text: str) -> float:
    """An agent log line's timestamp (its logging format) as time.time()."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class LockHistory:
    """When each agent held the NB writer lock (intervals of time.time())."""

    intervals: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    writes: dict[str, list[float]] = field(default_factory=dict)
    deaths: dict[str, list[float]] = field(default_factory=dict)   # kills' recorded times

    def overlaps(self) -> list[tuple[str, str, float, float]]:
        """Pairs of intervals of two agents that overlap: (agent, agent, from, to)."""
        flat = sorted((a, b, name) for name, ivs in self.intervals.items() for a, b in ivs)
        out = []
        for i, (_a1, b1, n1) in enumerate(flat):
            for a2, b2, n2 in flat[i + 1:]:
                if a2 >= b1:
                    break
                if n1 != n2:
                    out.append((n1, n2, a2, min(b1, b2)))
        return out

    def holder_at(self, t: float) -> str | None:
        for name, ivs in self.intervals.items():
            if any(a <= t < b for a, b in ivs):
                return name
        return None

    def first_held_after(self, t: float) -> tuple[str, float] | None:
        starts = [(a, name) for name, ivs in self.intervals.items() for a, _ in ivs if a >= t]
        return (min(starts)[1], min(starts)[0]) if starts else None

    def writes_outside(self) -> list[tuple[str, float]]:
        """NB writes logged by an agent at a time it did not hold the lock.

        An interval ended by a SIGKILL ends at the time taken just before the signal;
        the agent may still log a write it had committed while the signal is on its way
        (seen: 15 ms after the kill's time on a busy machine). Such a line counts until
        the lock's next grant to anyone: the server grants it only once the dead agent's
        session is closed, and a dead process logs nothing. With no later grant on
        record, DEATH_SLACK after the kill."""
        def grace_end(b: float) -> float:
            nxt = self.first_held_after(b)
            return nxt[1] if nxt is not None else b + DEATH_SLACK

        def inside(name: str, t: float) -> bool:
            deaths = self.deaths.get(name, [])
            return any(a <= t <= (grace_end(b) if b in deaths else b)
                       for a, b in self.intervals.get(name, []))
        return [(name, t) for name, ts in self.writes.items() for t in ts
                if not inside(name, t)]


def lock_history(sb: Sandbox, deaths: dict[str, list[float]] | None = None,
                 now: float | None = None) -> LockHistory:
    """Read every agent's log. `deaths`: when an agent was killed (its log says nothing
    then): an interval still open ends there."""
    deaths = deaths or {}
    end_of_time = now if now is not None else math.inf
    hist = LockHistory(deaths={name: list(ts) for name, ts in deaths.items()})
    for name in sb.agents:
        log = Path(sb.chassis[name].rundir) / "statelesslb-agent.log"
        events: list[tuple[float, bool]] = []
        writes: list[float] = []
        for line in log.read_text(errors="replace").splitlines():
            m = _LOCK_RE.match(line)
            if m:
                events.append((log_time(m.group(1)), m.group(2) == "held"))
                continue
            m = _WRITE_RE.match(line)
            if m:
                writes.append(log_time(m.group(1)))
        intervals = []
        start: float | None = None
        for t, held in events:
            if start is not None:
                dead = [d for d in deaths.get(name, []) if start <= d <= t]
                if dead:
                    intervals.append((start, dead[0]))
                    start = None
            if held and start is None:
                start = t
            elif not held and start is not None:
                intervals.append((start, t))
                start = None
        if start is not None:
            dead = [d for d in deaths.get(name, []) if d >= start]
            intervals.append((start, dead[0] if dead else end_of_time))
        hist.intervals[name] = intervals
        hist.writes[name] = writes
    return hist


# -- the final comparison ---------------------------------------------------------------


def check_groups(sb: Sandbox, gids: dict[str, int]) -> list[str]:
    """Every gateway's group of every LB holds exactly the bucket ids the NB puts in
    force: returns what differs (empty: all equal)."""
    in_force = groups_in_force(sb)
    wants = {name: in_force.get(name, {}).get(gid) for name, gid in gids.items()}
    problems = []
    for gw in sb.gateway_chassis:
        installed = our_groups(gw, known=tuple(gids.values()))
        for name, gid in sorted(gids.items()):
            have = set(installed[gid].buckets) if gid in installed else None
            if have != wants.get(name):
                problems.append(f"{gw.name} {name}: group {gid:#x} has {have}, "
                                f"NB {wants.get(name)}")
    return problems


def check_nb_complete(sb: Sandbox, churner: Churner) -> list[str]:
    """The NB holds every LB's last committed backends, each with a bucket id."""
    vips, ids = nb_vips(sb), nb_ids(sb)
    problems = []
    for name, members in sorted(churner.last_set.items()):
        i = int(name[1:])
        have = tuple(vips.get(name, {}).get(vip_of(i), "").split(","))
        if have != members:
            problems.append(f"{name}: NB vips {have}, last committed {members}")
        buckets = ids.get(name, ({}, {}))[1]
        if set(buckets) != set(members):
            problems.append(f"{name}: bucket ids for {sorted(buckets)}, backends {members}")
    return problems


def changed_ids(before: dict[str, tuple[dict[str, int], dict[str, int]]],
                after: dict[str, tuple[dict[str, int], dict[str, int]]],
                changes: Sequence[Change] = (), since: float = 0.0) -> list[str]:
    """VIP ids, and bucket ids of the backends every LB kept throughout (present in both
    readings and in each of its `changes` committed after `since`), that differ.

    A backend removed and added again in between is a new backend: its id may differ."""
    left: dict[str, set[str]] = {}
    for c in changes:
        if c.committed >= since:
            left.setdefault(c.lb, set()).update(set(before.get(c.lb, ({}, {}))[1])
                                                - set(c.members))
    out = []
    for name, (vips, buckets) in sorted(before.items()):
        vips2, buckets2 = after.get(name, ({}, {}))
        for vip, vid in vips.items():
            if vips2.get(vip) != vid:
                out.append(f"{name} VIP {vip}: id {vid} -> {vips2.get(vip)}")
        for backend, bid in buckets.items():
            if backend in left.get(name, ()) or backend not in buckets2:
                continue
            if buckets2[backend] != bid:
                out.append(f"{name} {backend}: bucket id {bid} -> {buckets2[backend]}")
    return out


# -- the scenario ---------------------------------------------------------------------


class FailoverRun:
    """Churn on a clustered sandbox with agents, and the kills, with their figures.

    with FailoverRun(sb, topo, lbs=20) as run:    # LBs made, churn and tracking running
        run.kill_db_leader("nb"); run.kill_db_leader("sb"); run.kill_writer_agent()
        result = run.finish()                        # churn stopped, everything compared
    """

    def __init__(self, sb: Sandbox, backends: list[str], macs: dict[str, str], lbs: int = 20,
                 rate: float = 5.0, timeout: float = 30.0):
        if not sb.clustered:
            raise ValueError("FailoverRun needs Sandbox(clustered=True)")
        self.sb, self.backends, self.lbs, self.rate = sb, backends, lbs, rate
        self.macs = macs
        self.timeout = timeout
        self.gids: dict[str, int] = {}
        self.initial_ids: dict[str, tuple[dict[str, int], dict[str, int]]] = {}
        self.deaths: dict[str, list[float]] = {}
        self.churner: Churner | None = None
        self.tracker: Tracker | None = None
        self.started = 0.0

    def __enter__(self) -> FailoverRun:
        self.gids = make_lbs(self.sb, self.lbs, self.backends, timeout=self.timeout * 2)
        self.initial_ids = nb_ids(self.sb)
        self.churner = Churner(self.sb, self.lbs, self.backends, self.rate)
        self.tracker = Tracker(self.churner, self.sb.gateway_chassis[0], self.gids, self.macs)
        self.started = time.time()
        self.churner.start()
        self.tracker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for thread in (self.churner, self.tracker):
            if thread is not None and thread.is_alive():
                thread.stop()

    def _wait_converged(self, t_kill: float) -> dict[str, float | None]:
        """Wait until a change committed after the kill and every change outstanding
        at the kill showed on the tracked gateway."""
        assert self.tracker is not None and self.churner is not None

        def done():
            conv = convergence(self.churner.snapshot(), t_kill)
            return conv if conv["converged"] is not None else None
        try:
            return wait_until(done, self.timeout, 0.05, "convergence after the kill")
        except TimeoutError:
            self._dump_agent_stacks()
            raise

    def _dump_agent_stacks(self) -> None:
        """Every agent's thread stacks into its stdout file (SIGUSR2), to see what
        waits when something did not converge."""
        for info in self.sb.agents.values():
            with contextlib.suppress(OSError):
                os.kill(info["pid"], signal.SIGUSR2)
        time.sleep(0.5)

    def kill_db_leader(self, db: str, restart: bool = True) -> dict[str, float | str | None]:
        """SIGKILL the leader of the NB or SB cluster; time the election and the
        convergence; start the killed member again (restart=True) once converged."""
        cluster = self.sb.clusters[db]
        leader = cluster.wait_leader(self.timeout)
        t_kill = time.time()
        pid = cluster.kill(leader)
        new = wait_until(lambda: (m := cluster.leader()) is not None and m is not leader and m,
                         self.timeout, 0.02, f"a new {db} leader")
        elected = time.time() - t_kill
        conv = self._wait_converged(t_kill)
        out: dict[str, float | str | None] = {
            "killed": f"{leader.name} (pid {pid})", "new_leader": new.name,
            "elected": elected, **conv}
        if restart:
            t0 = time.time()
            cluster.restart(leader, self.timeout)
            out["rejoined"] = time.time() - t0
        LOG.info("%s leader kill: %s", db, out)
        return out

    def kill_writer_agent(self, restart: bool = True) -> dict[str, object]:
        """SIGKILL the agent holding the NB writer lock; time until another holds it and
        until changes converge again (with `restart`, its agent starts again RESTART_SEC
        after the kill, as under systemd); bucket and VIP ids must not change."""
        from statelesslb.sandbox import agents as sandbox_agents

        assert self.tracker is not None
        holder = wait_until(lambda: lock_history(self.sb, self.deaths).holder_at(time.time()),
                            self.timeout, 0.05, "an NB writer")
        if self.tracker.gateway.name == holder:
            # Its groups freeze with it: watch another gateway from now on.
            others = [g for g in self.sb.gateway_chassis if g.name != holder]
            self.tracker.gateway = others[0]
        t_ids = time.time()
        ids_before = nb_ids(self.sb)
        rec = self.sb.processes[f"{holder}/{sandbox_agents.AGENT}"]
        t_kill = time.time()
        rec.signal(signal.SIGKILL)
        self.deaths.setdefault(holder, []).append(t_kill)
        wait_until(lambda: not rec.running(), 5.0, 0.01, f"the agent on {holder} to die")
        taken = wait_until(
            lambda: lock_history(self.sb, self.deaths).first_held_after(t_kill),
            self.timeout, 0.02, "another agent to take the NB writer lock")
        new_holder, t_taken = taken
        restarted = None
        if restart:
            # As systemd would (Restart=on-failure, RestartSec=2s): a backend chassis
            # without its agent acknowledges nothing, and the new writer holds the
            # gateways back for it up to ack_timeout (30 s) by design.
            time.sleep(max(0.0, t_kill + RESTART_SEC - time.time()))
            sandbox_agents.start_agent(self.sb, self.sb.chassis[holder], debug=False)
            restarted = time.time() - t_kill
        conv = self._wait_converged(t_kill)
        ids_after = nb_ids(self.sb)
        out: dict[str, object] = {
            "killed": f"{holder} (pid {rec.pid})", "new_writer": new_holder,
            "no_writer": t_taken - t_kill, **conv,
            "ids_changed": changed_ids(ids_before, ids_after, self.churner.snapshot(),
                                       t_ids)}
        if restart:
            sandbox_agents.wait_agents_ready(self.sb, self.timeout)
            out["restarted"] = restarted   # seconds from the kill to its new agent running
        LOG.info("writer agent kill: %s", out)
        return out

    def finish(self, settle: float = 30.0) -> dict[str, object]:
        """Stop the churn, wait for every change, put every backend back, compare."""
        assert self.churner is not None and self.tracker is not None
        self.churner.stop()
        try:
            wait_until(lambda: not self.tracker.pending(), settle, 0.1,
                       "every committed change on the tracked gateway")
        except TimeoutError:
            pass
        self.tracker.stop()
        changes = self.churner.snapshot()
        pending = self.tracker.pending()
        # Every backend back: the NB and the gateways must then agree on all of them.
        cmd: list[str] = []
        for i in range(self.lbs):
            cmd += ["--", "set", "load_balancer", f"c{i}",
                    f'vips:"{vip_of(i)}"="{",".join(self.backends)}"']
        self.sb.nbctl(*cmd[1:])
        full = {f"c{i}": tuple(self.backends) for i in range(self.lbs)}
        self.churner.last_set.update(full)

        def settled() -> bool:
            return not check_nb_complete(self.sb, self.churner) and not check_groups(
                self.sb, self.gids)
        try:
            wait_until(settled, settle, 0.2, "the NB and every gateway to agree")
        except TimeoutError:
            self._dump_agent_stacks()
        history = lock_history(self.sb, self.deaths)
        latencies = [c.seen - c.committed for c in changes if c.seen is not None]
        return {
            "changes": len(changes),
            "seen": len(latencies),
            "superseded": sum(1 for c in changes if c.superseded),
            "never_seen": [f"{c.lb} {len(c.members)} backends" for c in pending],
            "retried": self.churner.failed_attempts,
            "latencies": latencies,
            "nb_problems": check_nb_complete(self.sb, self.churner),
            "group_problems": check_groups(self.sb, self.gids),
            # The first backend of every LB: never touched, so never a new id.
            "ids_changed": changed_ids(self.initial_ids, nb_ids(self.sb), changes),
            "lock_overlaps": history.overlaps(),
            "writes_outside_lock": history.writes_outside(),
            "lock_intervals": history.intervals,
        }
