"""Which header bits a VIP's select group hashes: the LB's hash classes.

OVS makes every bit a `selection_method=hash` group hashes exact-match in the
datapath flow (shared/REFERENCE.md, section 2). Hashing the full 5-tuple so
costs the gateway one upcall and one datapath flow per connection. Hashing only
the low bits of the client's address and source port (`fields(ip_src=MASK,
tcp_src=MASK,...)`) bounds the gateway's datapath flows for a VIP by the number
of classes, 2**(client bits + port bits), whatever the connections and clients.

Operators write `options:stateless_hash` on the NB Load_Balancer:

- ``5-tuple``: every address and port bit (one datapath flow per connection);
- ``client-bits:N,port-bits:M``: the N low bits of the client's address and M
  bits of its source port, from bit 1 up (either part may be left out: 0 bits),
  N + M in 1..16. Bit 0 is skipped because Linux gives connect() even source
  ports (odd ones go to bind()): hashed, it would leave half the classes empty.
  With M = 16 (no client bits) every port bit is hashed. The VIP, its port and
  the protocol are matched exactly by the intercept flow anyway, so they are
  hashed whole at no extra cost.

The same fields serve the gateways' groups and the backends' previous-set
groups: both must hash a packet alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

HASH_OPTION = "stateless_hash"
FULL_TUPLE = "5-tuple"
# 65,536 classes at most: datapath flows per VIP stay far below OVS's default
# flow limit (200,000) even with several VIPs on a gateway.
MAX_CLASS_BITS = 16
# The historical 5-tuple fields: groups installed before hash classes existed keep
# their exact text, so an upgrade does not re-create them.
FULL_FIELDS = ("fields(ip_src,ip_dst,ipv6_src,ipv6_dst,nw_proto,"
               "tcp_src,tcp_dst,udp_src,udp_dst)")

_PART = re.compile(r"(client|port)-bits:(0|[1-9][0-9]?)", re.ASCII)


@dataclass(frozen=True)
class HashClasses:
    """What a VIP's groups hash; `client_bits` None means the full 5-tuple."""

    client_bits: int | None = None
    port_bits: int = 0

    @property
    def bounded(self) -> bool:
        return self.client_bits is not None

    @property
    def classes(self) -> int | None:
        """How many hash classes (datapath flows per VIP at most); None: unbounded."""
        if self.client_bits is None:
            return None
        return 1 << (self.client_bits + self.port_bits)

    @property
    def text(self) -> str:
        """The option's canonical spelling."""
        if self.client_bits is None:
            return FULL_TUPLE
        parts = []
        if self.client_bits:
            parts.append(f"client-bits:{self.client_bits}")
        if self.port_bits:
            parts.append(f"port-bits:{self.port_bits}")
        return ",".join(parts)

    def fields(self, version: int, protocol: str) -> str:
        """The group's `fields(...)`, in OVS's own order and spelling (dump-groups
        prints it back the same, so the diff sees no change)."""
        if self.client_bits is None:
            return FULL_FIELDS
        if version not in (4, 6) or protocol not in ("tcp", "udp"):
            raise ValueError(f"no hash fields for IPv{version} {protocol}")
        ip = "ip" if version == 4 else "ipv6"
        parts = []
        if self.client_bits:
            mask = (1 << self.client_bits) - 1
            text = IPv4Address(mask) if version == 4 else IPv6Address(mask)
            parts.append(f"{ip}_src={text}")
        parts += [f"{ip}_dst", "nw_proto"]
        if self.port_bits:
            parts.append(f"{protocol}_src={port_mask(self.port_bits)}")
        parts.append(f"{protocol}_dst")
        return "fields(" + ",".join(parts) + ")"


def port_mask(bits: int) -> int:
    """The source-port mask of `bits` port bits: bits 1..bits (Linux clients' ports
    from connect() are even), all 16 bits for 16."""
    return 0xFFFF if bits >= 16 else ((1 << bits) - 1) << 1


# Chosen by bench/real_tcp.py (docs/hashing.md): 8 client bits and 5 port bits,
# 8,192 classes: gateway datapath flows bounded, balance over 16 backends within
# about 1.1 of the mean, and the classes stay warm at a few hundred connections/s.
DEFAULT_HASH = HashClasses(8, 5)


class HashOptionError(ValueError):
    """options:stateless_hash is not a valid value (the message says why)."""


def parse_hash(options: object) -> HashClasses:
    """The LB's hash classes; DEFAULT_HASH when the option is absent."""
    opts = options if isinstance(options, Mapping) else {}
    raw = opts.get(HASH_OPTION)
    if raw is None:
        return DEFAULT_HASH
    usage = (f"options:{HASH_OPTION}={_show(raw)} is not {FULL_TUPLE} or "
             f"client-bits:N,port-bits:M (N + M in 1..{MAX_CLASS_BITS})")
    if not isinstance(raw, str):
        raise HashOptionError(usage)
    if raw == FULL_TUPLE:
        return HashClasses()
    bits: dict[str, int] = {}
    for part in raw.split(","):
        m = _PART.fullmatch(part)
        if m is None or m[1] in bits:
            raise HashOptionError(usage)
        bits[m[1]] = int(m[2])
    client, port = bits.get("client", 0), bits.get("port", 0)
    if not 1 <= client + port <= MAX_CLASS_BITS:
        raise HashOptionError(usage)
    return HashClasses(client, port)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
