"""Strict parsers of the NB's text values (addresses, ports, MACs, endpoints) and safe
display of anything the NB holds.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv6Address

from statelesslb.nb.model import (
    MODE_MAC,
    MODE_OPTION,
    LocalChassis,
)
from statelesslb.ofstrings import IpAddress, endpoint_text, shared_results

NO_PORT = "has no port"  # parse_endpoint's reason for a bare address

# Strict shapes first, `ipaddress` second: `ipaddress` and `int` accept more
# than we want (zone ids, unicode digits, surrounding spaces, "+80").
_IPV4 = re.compile(r"[0-9.]{7,15}", re.ASCII)
_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}", re.ASCII)
PORT = re.compile(r"[0-9]{1,5}", re.ASCII)
_MAC = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}", re.ASCII)
# NB names echoed bare in messages; anything else is shown with repr().
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.:/@+\[\]-]{1,80}", re.ASCII)
# Address keywords that carry no MAC/IP pair for us.
ADDRESS_KEYWORDS = frozenset({"unknown", "router", "dynamic"})


# ---------------------------------------------------------------------------
# Addresses that hash once


class _HashedOnce:
    """An `ipaddress` address whose hash and text are computed once. Addresses key the
    topology index and every LB's dependency sets, hashed tens of times per LB in a
    pass, and are formatted for every health lookup; `ipaddress` formats the address
    anew for each (8% of a gateway agent's time in a large install, docs/scale.md).
    Equal, and equal in hash, text and order, to the plain address (`_plain`)."""

    __slots__ = ()
    _plain: type

    def __init__(self, address: object) -> None:
        self._plain.__init__(self, address)
        self._hash = self._plain.__hash__(self)
        self._text = self._plain.__str__(self)

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"{self._plain.__name__}({self._text!r})"


class _HashedIPv4Address(_HashedOnce, IPv4Address):
    __slots__ = ("_hash", "_text")
    _plain = IPv4Address


class _HashedIPv6Address(_HashedOnce, IPv6Address):
    __slots__ = ("_hash", "_text")
    _plain = IPv6Address


# ---------------------------------------------------------------------------
# Scalar parsers (public: bucket_ids.py and the CLI reuse them)


def parse_ip(text: object) -> IpAddress | None:
    """A plain IPv4/IPv6 address, no brackets, zone, prefix or spaces."""
    if not isinstance(text, str):
        return None
    try:
        if _IPV4.fullmatch(text):
            return _HashedIPv4Address(text)
        # An IPv6 address holds a dotted quad only after its last colon: this skips
        # ipaddress's costly failure on every "IPv4:port" (endpoints are tried bare first).
        if ":" in text and _IPV6.fullmatch(text) and "." not in text.rpartition(":")[0]:
            return _HashedIPv6Address(text)
    except ipaddress.AddressValueError:
        return None
    return None


def parse_port(text: str) -> int | None:
    if not PORT.fullmatch(text):
        return None
    port = int(text)
    return port if 1 <= port <= 0xFFFF else None


@shared_results
def parse_mac(text: object) -> str | None:
    """Canonical lowercase MAC if `text` is a unicast, non-zero MAC."""
    if not isinstance(text, str) or not _MAC.fullmatch(text):
        return None
    mac = text.lower()
    if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        return None
    return mac


def _unusable_address_reason(ip: IpAddress) -> str | None:
    """Why `ip` cannot be a unicast VIP or backend, or None if it can."""
    if ip.is_unspecified:
        return "is unspecified"
    if ip.is_multicast:
        return "is multicast"
    if ip.is_loopback:
        return "is loopback"
    if isinstance(ip, IPv4Address) and ip.is_reserved:
        return "is reserved/broadcast"
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return "is IPv4-mapped (use the IPv4 address)"
    return None


def parse_endpoint(text: object) -> tuple[IpAddress, int] | str:
    """Parse `IPv4:port` or `[IPv6]:port`; a str result is the reason it failed."""
    if not isinstance(text, str):
        return "is not a string"
    if len(text) > 64:
        return "is too long to be IP:port"
    return _parse_endpoint_text(text)


@functools.lru_cache(maxsize=262144)
def _parse_endpoint_text(text: str) -> tuple[IpAddress, int] | str:
    # Pure and hot: a topology change re-validates every LB, whose backends are
    # mostly the same strings as before (ipaddress parsing dominated that cost).
    if parse_ip(text) is not None or (
        text.startswith("[") and text.endswith("]") and parse_ip(text[1:-1]) is not None
    ):
        return NO_PORT
    if text.startswith("["):
        address_text, sep, port_text = text[1:].partition("]:")
        ip = parse_ip(address_text) if sep else None
        if not isinstance(ip, IPv6Address):
            return "is not IP:port or [IPv6]:port"
    else:
        address_text, sep, port_text = text.rpartition(":")
        ip = parse_ip(address_text) if sep else None
        if not isinstance(ip, IPv4Address):
            return "is not IP:port or [IPv6]:port"
    port = parse_port(port_text)
    if port is None:
        return "has an invalid port (must be 1..65535)"
    reason = _unusable_address_reason(ip)
    if reason:
        return f"address {reason}"
    return ip, port


def endpoint_key(ip: IpAddress, port: int) -> str:
    """Canonical key: "172.16.0.100:80", "[fd00::100]:80"."""
    return endpoint_text(ip, port)


def canonical_endpoint_key(text: object) -> str | None:
    """The canonical form of an `IP:port` key, or None if it does not parse."""
    parsed = parse_endpoint(text)
    return None if isinstance(parsed, str) else endpoint_key(*parsed)


def vip_backend_keys(vips: Mapping[str, str]) -> list[tuple[str, list[str]]]:
    """(VIP key, its backends' keys) in NB key order: canonical where they parse, raw
    text otherwise, for showing an LB as the operator wrote it (ctl, ctlserver). A list,
    not a dict: two spellings of one VIP both stay visible."""
    result = []
    for raw_vip, text in sorted(vips.items()):
        backends = [b.strip(" \t") for b in text.split(",") if b.strip(" \t")]
        result.append((canonical_endpoint_key(raw_vip) or raw_vip,
                       [canonical_endpoint_key(b) or b for b in backends]))
    return result


def show(value: object) -> str:
    """An NB value for a message: bare if plain, else a short repr."""
    if isinstance(value, str) and _PLAIN_NAME.fullmatch(value):
        return value
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_marked(lb: object) -> bool:
    """`lb.is_stateless`, but False instead of raising on malformed rows."""
    options = getattr(lb, "options", None)
    return isinstance(options, Mapping) and options.get(MODE_OPTION) == MODE_MAC


_MAX_NAMES_LISTED = 5


def as_str(value: object) -> str:
    return value if isinstance(value, str) else show(value)


def listing(names: list[str]) -> str:
    shown = ", ".join(show(n) for n in names[:_MAX_NAMES_LISTED])
    more = len(names) - _MAX_NAMES_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def str_tuple(value: object) -> tuple[str, ...]:
    if isinstance(value, tuple | list | frozenset | set):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def str_map(value: object) -> dict[str, str] | None:
    if not isinstance(value, Mapping):
        return None
    items = dict(value.items())
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in items.items()):
        return None
    return items


# Names from the local OVS end up as ovs-vsctl arguments: keep them plain.
_OVS_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)


def parse_local_chassis(external_ids: Mapping[str, str]) -> LocalChassis:
    """The local Open_vSwitch row's `ovn-bridge-mappings` ("net:bridge,...") and
    `ovn-chassis-mac-mappings` ("net:MAC,..."), as ovn-controller reads them; malformed
    entries are left out (they give a chassis no reach, never a wrong MAC)."""
    bridges = {}
    for entry in str(external_ids.get("ovn-bridge-mappings", "")).split(","):
        network, sep, bridge = (part.strip() for part in entry.partition(":"))
        if sep and _OVS_NAME.fullmatch(network) and _OVS_NAME.fullmatch(bridge):
            bridges[network] = bridge
    macs = {}
    for entry in str(external_ids.get("ovn-chassis-mac-mappings", "")).split(","):
        network, sep, mac_text = (part.strip() for part in entry.partition(":"))
        mac = parse_mac(mac_text)
        if sep and _OVS_NAME.fullmatch(network) and mac is not None:
            macs[network] = mac
    return LocalChassis(bridges, macs)
