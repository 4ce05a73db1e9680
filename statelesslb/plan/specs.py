"""What a plan is made of - flows, groups, per-LB status - and the plan's configuration."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from statelesslb.nb.hashing import FULL_FIELDS
from statelesslb.nb.stored import MAX_BUCKET_ID, MAX_VIP_ID
from statelesslb.ofstrings import (
    checked_line,
    checked_piece,
    is_plain_int,
)

# The full 5-tuple (options:stateless_hash=5-tuple); an LB's own fields come from
# ValidLb.group_fields(). Fields whose prerequisites fail (udp_* on TCP, ipv6_* on
# IPv4) are skipped.
GROUP_FIELDS = FULL_FIELDS
# Explicit: insert_bucket without a weight makes a weight-0 (dead) bucket on OVS 3.1.
BUCKET_WEIGHT = 100
# Our cookies carry this in their top 16 bits; OVN's cookies have the upper 32 bits 0.
DEFAULT_COOKIE_PREFIX = 0x51B0
COOKIE_MASK = 0xFFFF << 48
OFPG_MAX = 0xFFFFFF00
MAX_TABLE = 254
# 500 buckets of ~100 bytes stay well under OpenFlow's 64 KiB per message.
DEFAULT_MAX_BUCKETS_PER_MSG = 500
# Tables of our own from private_table_base on (decide, sticky, commit, redirect,
# backend forward, backend reply).
PRIVATE_TABLES = 6
# In backend_zone (ours alone: OVN never commits there, so every ct_mark bit is ours),
# this bit says that the connection's last SYN reached the backend by some other path
# than a stateless VIP (OVN's native LB, or the backend's own address): its replies
# are not un-DNATed. 0 (or no entry at all) leaves them to the stateless un-DNAT.
OTHER_PATH_MARK = 0x1
# ovn-controller's own group ids: 1..65535 in 23.03, a compact pool from 1 later.
MIN_GROUP_ID_BASE = 0x10000

ROLE_GATEWAY = "gateway"
ROLE_STANDBY = "standby-gateway"
ROLE_BACKEND = "backend"
STATE_OK = "ok"
STATE_PENDING = "pending"
STATE_ERROR = "error"


def check_range(name: str, value: object, low: int, high: int) -> None:
    if not is_plain_int(value) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")


@dataclass(frozen=True)
class PlanConfig:
    group_id_base: int = 0x70000000
    cookie_prefix: int = DEFAULT_COOKIE_PREFIX
    gateway_priority: int = 1000
    backend_priority: int = 1000
    sentinel_table: int = 250
    # Tables of our own (OVN 23.03 uses up to ~80; later releases about 100).
    private_table_base: int = 200
    # Conntrack zone of the gateway-affinity layer: a zone no OVN port or datapath uses.
    gateway_zone: int = 64000
    # Conntrack zone of the backend side's ownership record (which path, stateless or
    # not, opened the connection a backend's reply belongs to): also a zone of our own.
    backend_zone: int = 64001

    @property
    def backend_decide_table(self) -> int:
        return self.private_table_base

    @property
    def gateway_sticky_table(self) -> int:
        return self.private_table_base + 1

    @property
    def gateway_commit_table(self) -> int:
        return self.private_table_base + 2

    @property
    def redirect_table(self) -> int:
        return self.private_table_base + 3

    @property
    def backend_forward_table(self) -> int:
        return self.private_table_base + 4

    @property
    def backend_reply_table(self) -> int:
        return self.private_table_base + 5

    @property
    def private_tables(self) -> tuple[int, ...]:
        return tuple(range(self.private_table_base, self.private_table_base + PRIVATE_TABLES))

    @property
    def previous_group_base(self) -> int:
        """Groups of the previous bucket sets (second chance) follow the gateway groups."""
        return self.group_id_base + MAX_VIP_ID + 1

    @property
    def group_range(self) -> tuple[int, int]:
        """Our group ids, first and last: the gateway groups, then the previous-set groups."""
        return self.group_id_base, self.previous_group_base + MAX_VIP_ID

    def __post_init__(self) -> None:
        check_range("group_id_base", self.group_id_base, MIN_GROUP_ID_BASE,
                     OFPG_MAX - 2 * (MAX_VIP_ID + 1))
        check_range("cookie_prefix", self.cookie_prefix, 1, 0xFFFF)
        check_range("gateway_priority", self.gateway_priority, 0, 0xFFFF)
        # backend_priority + 1 holds the SYN flows of the ownership record.
        check_range("backend_priority", self.backend_priority, 0, 0xFFFE)
        check_range("sentinel_table", self.sentinel_table, 0, MAX_TABLE)
        check_range("private_table_base", self.private_table_base, 1,
                    MAX_TABLE - PRIVATE_TABLES + 1)
        check_range("gateway_zone", self.gateway_zone, 1, 0xFFFF)
        check_range("backend_zone", self.backend_zone, 1, 0xFFFF)
        if self.backend_zone == self.gateway_zone:
            raise ValueError("backend_zone and gateway_zone must be different zones")
        if self.sentinel_table in self.private_tables:
            raise ValueError("sentinel_table must not be one of the private tables")



def our_cookies(cookie_prefix: int) -> str:
    """The `cookie=VALUE/MASK` match that selects exactly our flows."""
    check_range("cookie_prefix", cookie_prefix, 1, 0xFFFF)
    return f"cookie={cookie_prefix << 48:#x}/{COOKIE_MASK:#x}"


def flow_delete_line(cookie: int) -> str:
    """Deletes the one flow with this cookie: ours are unique by cookie (the full mask)."""
    check_range("cookie", cookie, 1 << 48, (1 << 64) - 1)
    return checked_line(f"flow delete cookie={cookie:#x}/-1")


def group_delete_line(group_id: int) -> str:
    check_range("group_id", group_id, MIN_GROUP_ID_BASE, OFPG_MAX)
    return checked_line(f"group delete group_id={group_id}")


@dataclass(frozen=True, slots=True)
class FlowSpec:
    table: int
    priority: int
    match: str               # "" matches everything
    actions: str
    cookie_prefix: int = DEFAULT_COOKIE_PREFIX
    # Computed once (a flow is looked up by both in several places, thousands of times
    # at scale): the key tuple is then one object wherever it is used.
    _key: tuple[int, int, str] = field(init=False, repr=False, compare=False)
    _cookie: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_range("table", self.table, 0, MAX_TABLE)
        check_range("priority", self.priority, 0, 0xFFFF)
        check_range("cookie_prefix", self.cookie_prefix, 1, 0xFFFF)
        checked_piece(self.match)
        if not self.actions:
            raise ValueError("a flow needs actions")
        checked_piece(self.actions)
        object.__setattr__(self, "_key", (self.table, self.priority, self.match))
        # blake2b, not hash(): the same flow must get the same cookie in every
        # process, so a restarted agent recognises what it installed.
        content = f"{self.table}\n{self.priority}\n{self.match}\n{self.actions}".encode()
        digest = hashlib.blake2b(content, digest_size=6).digest()
        object.__setattr__(self, "_cookie",
                           (self.cookie_prefix << 48) | int.from_bytes(digest, "big"))

    @property
    def key(self) -> tuple[int, int, str]:
        """What OpenFlow identifies a flow by (OVN too): two specs with one key clash."""
        return self._key

    @property
    def cookie(self) -> int:
        return self._cookie

    def add_line(self) -> str:
        parts = [f"table={self.table}", f"priority={self.priority}", f"cookie={self.cookie:#x}"]
        if self.match:
            parts.append(self.match)
        parts.append(f"actions={self.actions}")
        return checked_line("flow add " + ",".join(parts))

    def delete_line(self) -> str:
        return flow_delete_line(self.cookie)


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """A select group; `buckets` maps bucket id -> that bucket's action list."""

    group_id: int
    fields: str = GROUP_FIELDS
    buckets: Mapping[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_range("group_id", self.group_id, 0, OFPG_MAX)
        checked_piece(self.fields)
        for bucket_id, actions in self.buckets.items():
            check_range("bucket id", bucket_id, 0, MAX_BUCKET_ID)
            if not actions:
                raise ValueError("a bucket needs actions")
            checked_piece(actions)
        # Sorted and read-only: equal groups render identical lines.
        object.__setattr__(
            self, "buckets", MappingProxyType(dict(sorted(self.buckets.items())))
        )

    def bucket_text(self, bucket_id: int) -> str:
        return (f"bucket=bucket_id:{bucket_id},weight:{BUCKET_WEIGHT},"
                f"actions={self.buckets[bucket_id]}")

    def add_lines(self, max_buckets_per_msg: int = DEFAULT_MAX_BUCKETS_PER_MSG) -> list[str]:
        """`group add` with the first buckets, then `insert_bucket` lines for the rest."""
        check_range("max_buckets_per_msg", max_buckets_per_msg, 1, 100_000)
        texts = [self.bucket_text(b) for b in self.buckets]
        head = (f"group add group_id={self.group_id},type=select,"
                f"selection_method=hash,{self.fields}")
        lines = [",".join([head, *texts[:max_buckets_per_msg]])]
        for start in range(max_buckets_per_msg, len(texts), max_buckets_per_msg):
            chunk = texts[start:start + max_buckets_per_msg]
            lines.append(
                f"group insert_bucket group_id={self.group_id},command_bucket_id=last,"
                + ",".join(chunk)
            )
        return [checked_line(line) for line in lines]

    def insert_bucket_line(self, bucket_id: int, after: int | str = "last") -> str:
        """Insert one bucket after bucket `after` (an id, "first" or "last").

        OVS 3.1 puts inserted buckets AFTER command_bucket_id (the man page says
        before); "first" puts them at the front.
        """
        if isinstance(after, str):
            if after not in ("first", "last"):
                raise ValueError(f"bad insert position {after!r}")
            where = after
        else:
            check_range("bucket id", after, 0, MAX_BUCKET_ID)
            where = str(after)
        return checked_line(
            f"group insert_bucket group_id={self.group_id},command_bucket_id={where},"
            + self.bucket_text(bucket_id)
        )

    def remove_bucket_line(self, bucket_id: int) -> str:
        check_range("bucket id", bucket_id, 0, MAX_BUCKET_ID)
        return checked_line(
            f"group remove_bucket group_id={self.group_id},command_bucket_id={bucket_id}"
        )

    def delete_line(self) -> str:
        return group_delete_line(self.group_id)


@dataclass(frozen=True, slots=True)
class LbPlanStatus:
    name: str
    state: str                       # STATE_OK, STATE_PENDING or STATE_ERROR
    message: str                     # "" when ok
    roles: tuple[str, ...] = ()      # ROLE_BACKEND / ROLE_GATEWAY played here
    vip_keys: tuple[str, ...] = ()   # VIPs with at least one flow here


@dataclass(frozen=True)
class Plan:
    groups: dict[int, GroupSpec]
    flows: dict[int, FlowSpec]       # by cookie; includes the sentinel
    lb_status: dict[str, LbPlanStatus]
    sentinel_cookie: int
    # When a second-chance window closes: the agent plans again then.
    expires_at: float | None = None


def sentinel_flow(config: PlanConfig) -> FlowSpec:
    """A flow in a table OVN never uses: when it is gone, ovn-controller wiped br-int."""
    return FlowSpec(config.sentinel_table, 0, "", "drop", config.cookie_prefix)
