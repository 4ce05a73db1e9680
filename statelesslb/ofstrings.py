"""Safe building blocks for `ovs-ofctl` text.

Only typed values (ints, `ipaddress` objects, MACs already canonicalised by
`statelesslb.nb.validate`) are formatted here, and every finished piece is checked
against a small character set: a bundle file is line-oriented and comma
separated, so a stray space, newline or comma from the NB would change what
OVS executes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import TypeVar

_R = TypeVar("_R")


def shared_results(fn: Callable[..., _R]) -> Callable[..., _R]:
    """`fn`, with equal arguments giving the very same result object while it is among
    the 4,096 latest: a backend's key, MAC or bucket text, repeated in every VIP and LB
    it serves, is then kept once (docs/scale.md). Unhashable arguments (a fuzzer's) are
    passed through uncached."""
    cached = functools.lru_cache(maxsize=4096)(fn)

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return cached(*args)
        except TypeError:
            return fn(*args)

    return wrapper

IpAddress = IPv4Address | IPv6Address

# What may appear in a match or an action list: no spaces, no newlines.
_SAFE_PIECE = re.compile(r"[A-Za-z0-9_=,.:()\[\]/>+\-]*", re.ASCII)
# A whole bundle line: "flow add ...", "group insert_bucket ...", ...
SAFE_LINE = re.compile(r"(?:flow|group) [a-z_]+ [A-Za-z0-9_=,.:()\[\]/>+\-]*", re.ASCII)
_CANONICAL_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}", re.ASCII)

UINT32_MAX = 0xFFFFFFFF


def is_plain_int(value: object) -> bool:
    """True for a real int (bool is an int subclass but never a valid key)."""
    # The exact type first: called for every id and key a pass reads.
    return type(value) is int or (isinstance(value, int) and not isinstance(value, bool))


def hex_int(value: int, maximum: int = UINT32_MAX) -> str:
    """`0x1f`: the form OVS prints registers and metadata in."""
    if not is_plain_int(value) or not 0 <= value <= maximum:
        raise ValueError(f"not an integer in 0..{maximum:#x}: {value!r}")
    return f"{value:#x}"


def dec_int(value: int, maximum: int = UINT32_MAX) -> str:
    if not is_plain_int(value) or not 0 <= value <= maximum:
        raise ValueError(f"not an integer in 0..{maximum}: {value!r}")
    return str(value)


def ip_text(ip: IpAddress) -> str:
    if not isinstance(ip, IPv4Address | IPv6Address):
        raise ValueError(f"not an IP address object: {ip!r}")
    return str(ip)


@shared_results
def endpoint_text(ip: IpAddress, port: int) -> str:
    """`10.0.0.11:8080` or `[fd00::11]:8080`, as in NB keys and `nat(dst=...)`."""
    address = ip_text(ip)
    if isinstance(ip, IPv6Address):
        address = f"[{address}]"
    return f"{address}:{dec_int(port, 0xFFFF)}"


def mac_text(mac: str) -> str:
    if not isinstance(mac, str) or not _CANONICAL_MAC.fullmatch(mac):
        raise ValueError(f"not a canonical MAC: {mac!r}")
    return mac


def checked_piece(text: str) -> str:
    """Return `text` if it is safe inside a match or action list, else raise."""
    if not isinstance(text, str) or not _SAFE_PIECE.fullmatch(text):
        raise ValueError(f"unsafe OpenFlow text: {text!r}")
    return text


def checked_line(line: str) -> str:
    """Return `line` if it is one well-formed bundle line, else raise."""
    if not SAFE_LINE.fullmatch(line):
        raise ValueError(f"unsafe bundle line: {line!r}")
    return line
