"""SB lookups and match pieces the gateway and backend plans share; each checks what it reads."""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv6Address

from statelesslb.nb.model import (
    SbPortBinding,
    SbView,
)
from statelesslb.ofstrings import (
    IpAddress,
    ip_text,
    is_plain_int,
)


def usable_binding(sb: SbView, logical_port: str) -> SbPortBinding | None:
    """The SB port binding, if present and carrying usable keys."""
    bindings = sb.port_bindings if isinstance(sb.port_bindings, Mapping) else {}
    binding = bindings.get(logical_port)
    if (isinstance(binding, SbPortBinding)
            and is_plain_int(binding.tunnel_key) and 0 < binding.tunnel_key <= 0xFFFFFFFF
            and is_plain_int(binding.datapath_key)):
        return binding
    return None


def usable_datapath_key(sb: SbView, nb_uuid: str) -> int | None:
    keys = sb.datapath_keys if isinstance(sb.datapath_keys, Mapping) else {}
    key = keys.get(nb_uuid)
    return key if is_plain_int(key) and 0 < key <= 0xFFFFFFFF else None


def l4_match(protocol: str, ip: IpAddress) -> tuple[str, str]:
    """("tcp6", "ipv6") style prefixes for a match on `ip`."""
    if protocol not in ("tcp", "udp"):
        raise ValueError(f"unexpected protocol {protocol!r}")
    if isinstance(ip, IPv6Address):
        return protocol + "6", "ipv6"
    return protocol, "nw"


def backend_health(sb: SbView, ip: IpAddress, port: int, protocol: str) -> str | None:
    """The SB Service_Monitor status of a backend, None when it is not health-checked."""
    monitors = sb.service_monitors
    if not isinstance(monitors, Mapping):   # a fuzzer's view
        return None
    status = monitors.get((ip_text(ip), port, protocol))
    return status if isinstance(status, str) else None
