"""Predict which bucket of a `selection_method=hash` select group OVS picks for a packet.

Pure Python, no I/O: the result is what `ofproto/trace` reports, without sending traffic.
It follows Open vSwitch 3.1.0 (checked: this code path and the hash functions it uses are
unchanged on branch-3.1 and on main as of v3.7):

``ofproto/ofproto-dpif-xlate.c`` ``pick_hash_fields_select_group()``::

    basis = hash_uint64(selection_method_param)
    for each listed field, in OVS's internal field-id order (MFF_*; the order the
    fields are written in does not matter):
        if the field's prerequisites fail for this packet: skip it (no bytes hashed)
        value = mf_get_value(field) & mask          # network byte order, n_bytes long
        basis = hash_bytes(value, n_bytes, basis)

``group_best_live_bucket()``::

    for each live bucket (weight > 0, no watch_port/watch_group) in list order:
        score = (hash_int(bucket_id, basis) & 0xffff) * weight
        if score >= best: best, chosen = score, bucket      # ties: the later bucket wins

So the choice depends on the packet's hashed fields, the selection_method_param and each
bucket's (id, weight), never on the group id, and on the list order only for ties:
rendezvous (highest random weight) hashing. Removing a bucket only moves the flows that
were on it; adding one only takes flows to the new bucket.

Prerequisites (``mf_are_prereqs_ok``): ``ip_src/ip_dst`` need IPv4, ``ipv6_*`` IPv6,
``tcp_*`` need nw_proto 6, ``udp_*`` 17, ``sctp_*`` 132, and the L4 ports are also skipped
for a non-first IP fragment (``later_fragment``): such fragments hash on addresses and
protocol only and generally land on another bucket than their first fragment.

Hash implementation: ``lib/hash.h`` is chosen at OVS *compile* time:

- ``"murmur"``: the portable MurmurHash3-based ``hash_add``/``hash_finish``. Used by the
  Debian 12 package (openvswitch-switch 3.1.0-2+deb12u1, amd64), which is built for
  baseline x86-64: its ovs-vswitchd (libopenvswitch is linked in statically) contains no
  ``crc32`` instruction and does contain the murmur constants (0xcc9e2d51, 0xe6546b64);
  and the scores it prints in ``ofproto/trace`` match this module's "murmur" exactly.
  The vswitchd of Debian 12's openvswitch-switch-dpdk 3.1.0 (amd64) has no ``crc32``
  instruction either.
- ``"crc32"``: CRC32-C based, used when OVS is compiled with ``__SSE4_2__`` on x86_64
  (e.g. a source build with ``-march=native`` or ``-msse4.2``) or with
  ``__ARM_FEATURE_CRC32`` on aarch64 (by the source, both give identical values).
  Checked against OVS's own hash.h/hash.c compiled with ``-msse4.2`` (vectors in
  tests/unit/test_predict.py).

The two give unrelated bucket choices for the same packet. Every gateway of a load
balancer must therefore run the same OVS build (or at least builds with the same hash
implementation), or gateways disagree on the backend for a flow; pass the matching
``hash_impl`` to this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Literal

from statelesslb.nb.stored import MAX_BUCKET_ID

HashImpl = Literal["murmur", "crc32"]
HASH_IMPLS: tuple[HashImpl, ...] = ("murmur", "crc32")
# What the Debian 12 openvswitch-switch 3.1.0 (amd64) build uses.
DEFAULT_HASH_IMPL: HashImpl = "murmur"

IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_SCTP = 132
ETH_TYPE_IP = 0x0800
ETH_TYPE_IPV6 = 0x86DD
MAX_WEIGHT = 0xFFFF
MAX_PARAM = (1 << 64) - 1

_M32 = 0xFFFFFFFF

# --- lib/hash.h, Murmur variant (portable builds) -------------------------------------


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def _mhash_add(h: int, data: int) -> int:
    if data:  # mhash_add__: a zero word does not change the hash
        data = (data * 0xCC9E2D51) & _M32
        data = _rot(data, 15)
        data = (data * 0x1B873593) & _M32
        h ^= data
    h = _rot(h, 13)
    return (h * 5 + 0xE6546B64) & _M32


def _mhash_finish(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h


# --- lib/hash.h, CRC32-C variant (x86_64 with SSE4.2, aarch64 with CRC) ---------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C = _crc32c_table()


def _crc32c(crc: int, data: int, n_bytes: int) -> int:
    """_mm_crc32_u32/_u64 (__crc32cw/__crc32cd): no pre/post inversion, data little-endian."""
    for _ in range(n_bytes):
        crc = _CRC32C[(crc ^ data) & 0xFF] ^ (crc >> 8)
        data >>= 8
    return crc


def _crc_finish(h: int, final: int) -> int:
    h = (_crc32c(h, final, 8) * 0x805204F3) & _M32
    return h ^ (h >> 16)


# --- the hash functions OVS uses here, per implementation -----------------------------


def hash_add(h: int, data: int, impl: HashImpl = DEFAULT_HASH_IMPL) -> int:
    """OVS hash_add(hash, 32-bit data)."""
    if impl == "murmur":
        return _mhash_add(h, data)
    return _crc32c(h, data, 4)


def hash_finish(h: int, final: int, impl: HashImpl = DEFAULT_HASH_IMPL) -> int:
    """OVS hash_finish(hash, final)."""
    if impl == "murmur":
        return _mhash_finish(h ^ final)
    return _crc_finish(h, final)


def hash_uint64_basis(x: int, basis: int, impl: HashImpl = DEFAULT_HASH_IMPL) -> int:
    """OVS hash_uint64_basis(): hash_add64 of x, then hash_finish(8 or 23)."""
    if impl == "murmur":
        return _mhash_finish(_mhash_add(_mhash_add(basis, x & _M32), x >> 32) ^ 8)
    return _crc_finish(_crc32c(basis, x, 8), 23)


def hash_uint64(x: int, impl: HashImpl = DEFAULT_HASH_IMPL) -> int:
    """OVS hash_uint64(x) = hash_uint64_basis(x, 0)."""
    return hash_uint64_basis(x, 0, impl)


def hash_int(x: int, basis: int, impl: HashImpl = DEFAULT_HASH_IMPL) -> int:
    """OVS hash_int(x, basis) = hash_2words(x, basis).

    Murmur: hash_finish(hash_add(hash_add(x, 0), basis), 8) (x is the seed!);
    CRC32: hash_uint64((uint64_t) basis << 32 | x).
    """
    if impl == "murmur":
        return _mhash_finish(_mhash_add(_mhash_add(x, 0), basis) ^ 8)
    return hash_uint64_basis((basis << 32) | x, 0, "crc32")


def hash_bytes(data: bytes, basis: int, impl: HashImpl = DEFAULT_HASH_IMPL) -> int:
    """OVS lib/hash.c hash_bytes(): little-endian 32-bit words, zero-padded tail."""
    h = basis
    n = len(data)
    for i in range(0, n - n % 4, 4):
        h = hash_add(h, int.from_bytes(data[i:i + 4], "little"), impl)
    if n % 4:
        h = hash_add(h, int.from_bytes(data[n - n % 4:], "little"), impl)
    return hash_finish(h, n, impl)


# --- packets and fields ---------------------------------------------------------------


@dataclass(frozen=True)
class FlowTuple:
    """The header fields a hash select group can look at, for one IP packet.

    `src`/`dst` may be given as strings; `version` must match them. `proto` is the IP
    protocol (IPv6: the final next header). `sport`/`dport` are ignored unless proto is
    TCP, UDP or SCTP. `later_fragment`: a non-first fragment (OVS sees no L4 ports).
    """

    version: int
    src: IPv4Address | IPv6Address
    dst: IPv4Address | IPv6Address
    proto: int
    sport: int = 0
    dport: int = 0
    later_fragment: bool = False
    ipv6_label: int = 0

    def __post_init__(self) -> None:
        src = ip_address(self.src)
        dst = ip_address(self.dst)
        object.__setattr__(self, "src", src)
        object.__setattr__(self, "dst", dst)
        if self.version not in (4, 6) or src.version != self.version \
                or dst.version != self.version:
            raise ValueError(f"version {self.version} does not match {src} -> {dst}")
        if not 0 <= self.proto <= 0xFF:
            raise ValueError(f"proto {self.proto} out of range 0..255")
        for name in ("sport", "dport"):
            port = getattr(self, name)
            if not 0 <= port <= 0xFFFF:
                raise ValueError(f"{name} {port} out of range 0..65535")
        if not 0 <= self.ipv6_label <= 0xFFFFF:
            raise ValueError(f"ipv6_label {self.ipv6_label} out of range 0..0xfffff")
        if self.ipv6_label and self.version != 6:
            raise ValueError("ipv6_label needs an IPv6 packet")

    @classmethod
    def make(cls, src: str | IPv4Address | IPv6Address, dst: str | IPv4Address | IPv6Address,
             proto: int | str, sport: int = 0, dport: int = 0,
             later_fragment: bool = False) -> FlowTuple:
        """FlowTuple with the version taken from the addresses; proto may be "tcp" etc."""
        if isinstance(proto, str):
            try:
                proto = _PROTO_NUMBERS[proto.lower()]
            except KeyError:
                raise ValueError(f"unknown protocol {proto!r}: use a number") from None
        return cls(ip_address(src).version, ip_address(src), ip_address(dst), proto, sport,
                   dport, later_fragment)

    def ovs_flow(self) -> str:
        """The flow in ovs-ofctl syntax (for `ofproto/trace`), e.g. 'tcp,nw_src=...'."""
        v6 = self.version == 6
        name = _L4_PROTOS.get(self.proto)
        parts = [(name + "6" if v6 else name) if name else ("ipv6" if v6 else "ip")]
        if not name:
            parts.append(f"nw_proto={self.proto}")
        if v6:
            parts += [f"ipv6_src={self.src}", f"ipv6_dst={self.dst}"]
            if self.ipv6_label:
                parts.append(f"ipv6_label={self.ipv6_label:#x}")
        else:
            parts += [f"nw_src={self.src}", f"nw_dst={self.dst}"]
        if self.later_fragment:
            parts.append("nw_frag=later")
        elif name:
            parts += [f"{name}_src={self.sport}", f"{name}_dst={self.dport}"]
        return ",".join(parts)

    @classmethod
    def from_ovs_flow(cls, text: str) -> FlowTuple:
        """Parse a flow in ovs-ofctl syntax, e.g. ovs_flow()'s or a trace's "Flow:" line.

        Keys other than the IP/L4 ones (in_port, dl_src, reg0, ...) are ignored.
        """
        text = text.strip()
        if text.startswith("Flow:"):
            text = text[len("Flow:"):]
        version: int | None = None
        proto: int | None = None
        vals: dict[str, str] = {}
        for item in (p.strip() for p in text.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                if key in _SHORTHANDS:
                    version, proto = _SHORTHANDS[key]
                continue
            vals[_FLOW_KEYS.get(key, key)] = value
        try:
            src = ip_address(vals.get("src", ""))
            dst = ip_address(vals.get("dst", ""))
        except ValueError:
            raise ValueError(f"{text!r}: needs IP source and destination") from None
        if version is not None and version != src.version:
            raise ValueError(f"{text!r}: addresses do not match the protocol")
        if "proto" in vals:
            proto = int(vals["proto"], 0)
        if proto is None:
            raise ValueError(f"{text!r}: no IP protocol")
        return cls(src.version, src, dst, proto, int(vals.get("sport", "0"), 0),
                   int(vals.get("dport", "0"), 0),
                   later_fragment=vals.get("nw_frag") == "later",
                   ipv6_label=int(vals.get("ipv6_label", "0"), 0))


_PROTO_NUMBERS = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP, "sctp": IPPROTO_SCTP}
_L4_PROTOS = {v: k for k, v in _PROTO_NUMBERS.items()}
# ovs-ofctl protocol shorthands: (IP version, IP protocol or None).
_SHORTHANDS: dict[str, tuple[int, int | None]] = {
    "ip": (4, None), "ipv6": (6, None),
    **{name: (4, num) for name, num in _PROTO_NUMBERS.items()},
    **{name + "6": (6, num) for name, num in _PROTO_NUMBERS.items()},
    "icmp": (4, 1), "icmp6": (6, 58),
}
_FLOW_KEYS = {
    "nw_src": "src", "ip_src": "src", "ipv6_src": "src",
    "nw_dst": "dst", "ip_dst": "dst", "ipv6_dst": "dst",
    "nw_proto": "proto", "ip_proto": "proto",
    "tp_src": "sport", "tcp_src": "sport", "udp_src": "sport", "sctp_src": "sport",
    "tp_dst": "dport", "tcp_dst": "dport", "udp_dst": "dport", "sctp_dst": "dport",
    "ip_frag": "nw_frag",
}

# Prerequisite kinds (the subset of OVS's MFP_* the supported fields use).
_P_ETH, _P_IPV4, _P_IPV6, _P_IP, _P_TCP, _P_UDP, _P_SCTP = range(7)


@dataclass(frozen=True)
class _FieldDef:
    name: str
    order: int  # relative position in enum mf_field_id (MFF_*), which drives hashing order
    n_bytes: int
    prereq: int
    maskable: bool


# In enum mf_field_id order (include/openvswitch/meta-flow.h, v3.1.0).
_FIELD_DEFS: tuple[_FieldDef, ...] = (
    _FieldDef("eth_type", 0, 2, _P_ETH, False),      # MFF_ETH_TYPE
    _FieldDef("ip_src", 1, 4, _P_IPV4, True),        # MFF_IPV4_SRC
    _FieldDef("ip_dst", 2, 4, _P_IPV4, True),        # MFF_IPV4_DST
    _FieldDef("ipv6_src", 3, 16, _P_IPV6, True),     # MFF_IPV6_SRC
    _FieldDef("ipv6_dst", 4, 16, _P_IPV6, True),     # MFF_IPV6_DST
    _FieldDef("ipv6_label", 5, 4, _P_IPV6, True),    # MFF_IPV6_LABEL
    _FieldDef("nw_proto", 6, 1, _P_IP, False),       # MFF_IP_PROTO
    _FieldDef("tcp_src", 7, 2, _P_TCP, True),        # MFF_TCP_SRC
    _FieldDef("tcp_dst", 8, 2, _P_TCP, True),        # MFF_TCP_DST
    _FieldDef("udp_src", 9, 2, _P_UDP, True),        # MFF_UDP_SRC
    _FieldDef("udp_dst", 10, 2, _P_UDP, True),       # MFF_UDP_DST
    _FieldDef("sctp_src", 11, 2, _P_SCTP, True),     # MFF_SCTP_SRC
    _FieldDef("sctp_dst", 12, 2, _P_SCTP, True),     # MFF_SCTP_DST
)
_FIELDS_BY_NAME = {f.name: f for f in _FIELD_DEFS}
# OVS's "extra names" (meta-flow.h "aka").
_ALIASES = {"dl_type": "eth_type", "nw_src": "ip_src", "nw_dst": "ip_dst",
            "ip_proto": "nw_proto", "tp_src": "tcp_src", "tp_dst": "tcp_dst"}
SUPPORTED_FIELDS: tuple[str, ...] = tuple(f.name for f in _FIELD_DEFS)


@dataclass(frozen=True)
class SelectField:
    """One `fields(...)` entry: the field and its mask (network byte order)."""

    name: str
    mask: bytes
    order: int
    prereq: int

    @property
    def n_bytes(self) -> int:
        return len(self.mask)


def _parse_mask(fdef: _FieldDef, text: str) -> bytes:
    text = text.strip()
    try:
        if fdef.n_bytes == 16 and ":" in text:
            raw = IPv6Address(text).packed
        elif fdef.n_bytes == 4 and "." in text:
            raw = IPv4Address(text).packed
        else:
            raw = int(text, 0).to_bytes(fdef.n_bytes, "big")
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"{fdef.name}={text}: bad mask ({exc})") from None
    if not any(raw):
        raise ValueError(f"{fdef.name}={text}: a mask must not be all-zeros")
    if not fdef.maskable and raw != b"\xff" * fdef.n_bytes:
        raise ValueError(f"{fdef.name}={text}: {fdef.name} is not maskable")
    return raw


def parse_fields(spec: str | Iterable[str | SelectField]) -> tuple[SelectField, ...]:
    """The hashed fields, in OVS's hashing order.

    `spec` is a group's `fields(...)` text (e.g. planner.GROUP_FIELDS), a comma-separated
    list, or a sequence of "name" / "name=mask" strings (the mask is written as ovs-ofctl
    takes it: 255.255.255.0, ffff::, 0xff00, 65280).
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("fields(") and text.endswith(")"):
            text = text[len("fields("):-1]
        items: list[str | SelectField] = [p for p in (s.strip() for s in text.split(",")) if p]
    else:
        items = list(spec)
    out: dict[str, SelectField] = {}
    for item in items:
        if isinstance(item, SelectField):
            sf = item
        else:
            name, _, mask_text = item.strip().partition("=")
            name = name.strip()
            fdef = _FIELDS_BY_NAME.get(_ALIASES.get(name, name))
            if fdef is None:
                raise ValueError(f"unsupported field {name!r}; supported: "
                                 f"{', '.join(SUPPORTED_FIELDS)}")
            mask = _parse_mask(fdef, mask_text) if mask_text else b"\xff" * fdef.n_bytes
            sf = SelectField(fdef.name, mask, fdef.order, fdef.prereq)
        if sf.name in out:
            raise ValueError(f"{sf.name}: duplicate field")
        out[sf.name] = sf
    return tuple(sorted(out.values(), key=lambda f: f.order))


def _prereq_ok(prereq: int, pkt: FlowTuple) -> bool:
    if prereq == _P_ETH or prereq == _P_IP:
        return True
    if prereq == _P_IPV4:
        return pkt.version == 4
    if prereq == _P_IPV6:
        return pkt.version == 6
    proto = {_P_TCP: IPPROTO_TCP, _P_UDP: IPPROTO_UDP, _P_SCTP: IPPROTO_SCTP}[prereq]
    return pkt.proto == proto and not pkt.later_fragment


def _field_value(name: str, pkt: FlowTuple) -> bytes:
    """mf_get_value(): the field's bytes in network byte order."""
    if name == "eth_type":
        return (ETH_TYPE_IP if pkt.version == 4 else ETH_TYPE_IPV6).to_bytes(2, "big")
    if name in ("ip_src", "ipv6_src"):
        return pkt.src.packed
    if name in ("ip_dst", "ipv6_dst"):
        return pkt.dst.packed
    if name == "ipv6_label":
        return pkt.ipv6_label.to_bytes(4, "big")
    if name == "nw_proto":
        return bytes([pkt.proto])
    if name.endswith("_src"):
        return pkt.sport.to_bytes(2, "big")
    return pkt.dport.to_bytes(2, "big")


def hashed_fields(fields: str | Iterable[str | SelectField],
                  packet: FlowTuple) -> list[tuple[str, bytes]]:
    """(field, masked value) that OVS hashes for this packet, in order (for "why")."""
    out = []
    for sf in parse_fields(fields):
        if _prereq_ok(sf.prereq, packet):
            value = _field_value(sf.name, packet)
            out.append((sf.name, bytes(v & m for v, m in zip(value, sf.mask, strict=True))))
    return out


def flow_basis(fields: str | Iterable[str | SelectField], packet: FlowTuple,
               selection_method_param: int = 0,
               hash_impl: HashImpl = DEFAULT_HASH_IMPL) -> int:
    """The per-packet basis of pick_hash_fields_select_group()."""
    _check_impl(hash_impl)
    if not 0 <= selection_method_param <= MAX_PARAM:
        raise ValueError(f"selection_method_param {selection_method_param} is not a uint64")
    basis = hash_uint64(selection_method_param, hash_impl)
    for _name, value in hashed_fields(fields, packet):
        basis = hash_bytes(value, basis, hash_impl)
    return basis


def bucket_hash16(bucket_id: int, basis: int, hash_impl: HashImpl = DEFAULT_HASH_IMPL) -> int:
    """hash_int(bucket_id, basis) & 0xffff: a bucket's score before its weight."""
    return hash_int(bucket_id, basis, hash_impl) & 0xFFFF


def _check_impl(hash_impl: str) -> None:
    if hash_impl not in HASH_IMPLS:
        raise ValueError(f"hash_impl must be one of {', '.join(HASH_IMPLS)}, not {hash_impl!r}")


def _weighted(bucket_ids: Iterable[int],
              weights: Mapping[int, int] | int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    for bid in bucket_ids:
        if not 0 <= bid <= MAX_BUCKET_ID:
            raise ValueError(f"bucket id {bid} out of range 0..{MAX_BUCKET_ID:#x}")
        if bid in seen:
            raise ValueError(f"duplicate bucket id {bid}")
        seen.add(bid)
        if isinstance(weights, int):
            weight = weights
        else:
            try:
                weight = weights[bid]
            except KeyError:
                raise ValueError(f"no weight for bucket {bid}") from None
        if not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"bucket {bid}: weight {weight} out of range 0..{MAX_WEIGHT}")
        out.append((bid, weight))
    return out


def bucket_scores(bucket_ids: Iterable[int], weights: Mapping[int, int] | int,
                  fields: str | Sequence[str], packet: FlowTuple,
                  selection_method_param: int = 0,
                  hash_impl: HashImpl = DEFAULT_HASH_IMPL) -> dict[int, int]:
    """Each live bucket's score, as `ofproto/trace` prints it ("bucket N: score S").

    In list order; buckets with weight 0 are not live in a select group and are left
    out. The bucket with the highest score wins; among equal scores the later one.
    """
    basis = flow_basis(fields, packet, selection_method_param, hash_impl)
    return {bid: bucket_hash16(bid, basis, hash_impl) * weight
            for bid, weight in _weighted(bucket_ids, weights) if weight > 0}


def predict_bucket(bucket_ids: Iterable[int], weights: Mapping[int, int] | int,
                   fields: str | Sequence[str], packet: FlowTuple,
                   selection_method_param: int = 0,
                   hash_impl: HashImpl = DEFAULT_HASH_IMPL) -> int | None:
    """The bucket_id OVS picks for `packet`, or None when no bucket is live.

    `bucket_ids` in the group's list order (it only matters for ties); `weights` maps each
    bucket id to its weight, or is one weight for all; `fields` as parse_fields() takes
    them. Buckets are assumed live apart from weight (no watch_port/watch_group).
    """
    best: int | None = None
    best_score = 0
    scores = bucket_scores(bucket_ids, weights, fields, packet, selection_method_param,
                           hash_impl)
    for bid, score in scores.items():
        if score >= best_score:
            best, best_score = bid, score
    return best
