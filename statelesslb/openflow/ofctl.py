"""The OpenFlow edge: read what is installed on the bridge and apply bundles.

Everything goes through `ovs-ofctl -O OpenFlow15`, the one tool that speaks
select-group properties, INSERT_BUCKET / REMOVE_BUCKET and atomic bundles.
We only ever read flows under our cookie mask and groups in our id range, and
only ever delete by our full cookie: ovn-controller's state is never touched.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from statelesslb.plan.specs import our_cookies

LOG = logging.getLogger(__name__)

_COOKIE_RE = re.compile(r"cookie=(0x[0-9a-f]+)")
_GROUP_ID_RE = re.compile(r"^group_id=(\d+),")
_BUCKET_SPLIT_RE = re.compile(r",bucket=")
_BUCKET_RE = re.compile(r"^bucket_id:(\d+),(.*)$")
_STATS_GROUP_RE = re.compile(r"^\s*group_id=(\d+),", re.MULTILINE)
_STATS_BUCKET_RE = re.compile(r",bucket\d+:")
# A bridge-wide `dump-groups` (one process instead of one per group: a full read of
# 4,000 groups one by one took 15-20 s) only when every group on the bridge has at most
# this many buckets: OVS 3.1 crashes on it when one group's description exceeds 64 KiB,
# which is about 750 of our buckets or about 2,000 of an OVN LB's (docs/limits.md).
BULK_DUMP_MAX_BUCKETS = 300


class OfctlError(RuntimeError):
    """ovs-ofctl failed; the message carries its stderr."""


@dataclass(frozen=True, slots=True)
class InstalledGroup:
    group_id: int
    header: str                        # "type=select,selection_method=hash,fields(...)"
    # bucket id -> "weight:..,actions=..", in the group's list order
    buckets: Mapping[int, str] = field(default_factory=dict)


@dataclass
class InstalledState:
    flows: set[int]                    # cookies of our flows
    groups: dict[int, InstalledGroup]  # our groups by id
    # The planned group each installed group was made from, when we installed it:
    # an unchanged plan hands back the very same object, so diffing it is free.
    specs: dict[int, object] = field(default_factory=dict)


def parse_flow_cookies(dump: str) -> set[int]:
    cookies = set()
    for line in dump.splitlines():
        m = _COOKIE_RE.search(line)
        if m:
            cookies.add(int(m.group(1), 16))
    return cookies


def parse_groups(dump: str, id_min: int, id_max: int) -> dict[int, InstalledGroup]:
    """Parse `dump-groups` output, keeping groups with id_min <= id <= id_max."""
    groups: dict[int, InstalledGroup] = {}
    for raw in dump.splitlines():
        line = raw.strip()
        m = _GROUP_ID_RE.match(line)
        if not m:
            continue
        gid = int(m.group(1))
        if not id_min <= gid <= id_max:
            continue
        head, *bucket_texts = _BUCKET_SPLIT_RE.split(line)
        header = head.split(",", 1)[1] if "," in head else ""
        buckets: dict[int, str] = {}
        for text in bucket_texts:
            bm = _BUCKET_RE.match(text)
            if bm:
                buckets[int(bm.group(1))] = bm.group(2)
        groups[gid] = InstalledGroup(gid, header, buckets)
    return groups


def _listed_ids(stats: str) -> set[int]:
    """The group ids a `dump-group-stats` lists."""
    return {int(m.group(1)) for m in _STATS_GROUP_RE.finditer(stats)}


def _error_summary(stderr: str, limit: int = 600) -> str:
    """ovs-ofctl echoes whole messages after an error: keep the error lines, shortened."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "ovs-ofctl:" in line]
    picked = errors[:3] or lines[:3]
    return " | ".join(line if len(line) <= limit else line[:limit] + "..." for line in picked)


class Ofctl:
    """Runs ovs-ofctl against one bridge."""

    def __init__(self, target: str, binary: str = "ovs-ofctl", timeout: float = 20.0):
        self.target = target
        self.binary = binary
        self.timeout = timeout

    def run(self, *args: str, stdin: str | None = None) -> str:
        argv = [self.binary, "-O", "OpenFlow15", args[0], self.target, *args[1:]]
        try:
            proc = subprocess.run(
                argv, input=stdin, capture_output=True, text=True, timeout=self.timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise OfctlError(f"{' '.join(argv[:4])}: timed out after {self.timeout}s") from exc
        except OSError as exc:
            raise OfctlError(f"cannot run {self.binary}: {exc}") from exc
        if proc.returncode != 0:
            raise OfctlError(f"{' '.join(argv[:4])} failed: {_error_summary(proc.stderr)}")
        return proc.stdout

    def our_flow_cookies(self, cookie_prefix: int) -> set[int]:
        return parse_flow_cookies(self.run("dump-flows", our_cookies(cookie_prefix), "--no-stats"))

    def group_ids(self) -> set[int]:
        return _listed_ids(self.group_stats())

    def groups(self, id_min: int, id_max: int, known: Iterable[int] = (),
               bulk_ok: bool = False, thorough: bool = False) -> dict[int, InstalledGroup]:
        """Our groups, each dumped on its own: the ids group stats list, plus `known`.

        Not `dump-groups` for the whole bridge unless safe: OVS 3.1 asserts and dies
        (ofpmp_postappend: start_ofs <= UINT16_MAX) when one group's description
        exceeds 64 KiB, which an OVN native LB of 2,000 backends reaches (checked in
        the sandbox). With such a group `dump-group-stats` silently lists only part
        of the groups (also checked), hence `known`: the ids we planned or installed.

        `bulk_ok` (the caller knows no LB in the NB has more than BULK_DUMP_MAX_BUCKETS
        backends per VIP): one bridge-wide dump instead, if the group stats also show
        every group on the bridge with at most that many buckets. One process instead
        of one per group: a full read of 4,000 groups took 15 s one by one, and 10,000
        `known` ids not on the bridge yet (an agent's first start with its LBs in the
        NB, or the rebuild after ovn-controller wiped br-int) 40 s (docs/scale.md).
        No group of that size, no truncated listing: an id missing from it is absent.
        `thorough` (the caller's last bundle failed, maybe adding a group that was
        there after all): also require the stats to list every `known` id in range,
        else read them one by one.
        """
        known = set(known)
        if bulk_ok:
            stats = self.group_stats()
            listed = _listed_ids(stats)
            largest = max((len(_STATS_BUCKET_RE.findall(line))
                           for line in stats.splitlines()), default=0)
            if largest <= BULK_DUMP_MAX_BUCKETS and (not thorough or all(
                    g in listed for g in known if id_min <= g <= id_max)):
                return parse_groups(self.run("dump-groups"), id_min, id_max)
            LOG.info("group stats list a group of %d buckets, or not every group: "
                     "dumping ours one by one", largest)
        else:
            listed = None
        out: dict[int, InstalledGroup] = {}
        for dump in self.group_dumps(id_min, id_max, known, listed).values():
            out.update(parse_groups(dump, id_min, id_max))
        return out

    def group_dumps(self, id_min: int, id_max: int, known: Iterable[int] = (),
                    listed: set[int] | None = None) -> dict[int, str]:
        """Group id -> its own `dump-groups` text, for the ids groups() reads.

        `listed`: the ids the group stats list, when the caller has just read them."""
        if listed is None:
            try:
                listed = self.group_ids()
            except OfctlError:
                listed = set()
        out: dict[int, str] = {}
        for gid in sorted(listed | set(known)):
            if id_min <= gid <= id_max:
                try:
                    out[gid] = self.run("dump-groups", str(gid))
                except OfctlError as exc:
                    if "UNKNOWN_GROUP" not in str(exc):
                        raise
        return out

    def group_stats(self) -> str:
        return self.run("dump-group-stats")

    def read_state(self, cookie_prefix: int, id_min: int, id_max: int,
                   known_groups: Iterable[int] = (), bulk_ok: bool = False,
                   thorough: bool = False) -> InstalledState:
        return InstalledState(
            flows=self.our_flow_cookies(cookie_prefix),
            groups=self.groups(id_min, id_max, known_groups, bulk_ok, thorough),
        )

    def bundle(self, lines: list[str]) -> None:
        """Apply flow and group mods atomically: all of them or none."""
        if lines:
            self.run("bundle", "-", stdin="\n".join(lines) + "\n")
