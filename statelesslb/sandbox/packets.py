"""Packet builders (scapy) and pcap reading for the sandbox's dummy ports.

Addresses decide the IP version: an address with ':' builds IPv6, so every builder has
its IPv6 variant for free.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

DEFAULT_TTL = 64
_PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": "<",  # microseconds, little endian
    b"\xa1\xb2\xc3\xd4": ">",
    b"\x4d\x3c\xb2\xa1": "<",  # nanoseconds
    b"\xa1\xb2\x3c\x4d": ">",
}


def ip_layer(src_ip: str, dst_ip: str, ttl: int = DEFAULT_TTL) -> Packet:
    if ":" in src_ip:
        return IPv6(src=src_ip, dst=dst_ip, hlim=ttl)
    return IP(src=src_ip, dst=dst_ip, ttl=ttl)


def tcp(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, sport: int, dport: int,
        flags: str = "S", seq: int = 1000, ack: int = 0, ttl: int = DEFAULT_TTL,
        payload: bytes = b"") -> Packet:
    pkt = (Ether(src=src_mac, dst=dst_mac) / ip_layer(src_ip, dst_ip, ttl)
           / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=8192))
    return pkt / Raw(payload) if payload else pkt


def tcp_syn(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, sport: int, dport: int,
            seq: int = 1000, ttl: int = DEFAULT_TTL) -> Packet:
    return tcp(src_mac, dst_mac, src_ip, dst_ip, sport, dport, "S", seq, 0, ttl)


def tcp_synack(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, sport: int,
               dport: int, seq: int = 5000, ack: int = 1001,
               ttl: int = DEFAULT_TTL) -> Packet:
    """The answer to tcp_syn(...) with its defaults: ack = 1000 + 1."""
    return tcp(src_mac, dst_mac, src_ip, dst_ip, sport, dport, "SA", seq, ack, ttl)


def tcp_ack(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, sport: int, dport: int,
            seq: int = 1001, ack: int = 5001, ttl: int = DEFAULT_TTL,
            payload: bytes = b"") -> Packet:
    flags = "PA" if payload else "A"
    return tcp(src_mac, dst_mac, src_ip, dst_ip, sport, dport, flags, seq, ack, ttl, payload)


def udp(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, sport: int, dport: int,
        payload: bytes = b"x", ttl: int = DEFAULT_TTL) -> Packet:
    return (Ether(src=src_mac, dst=dst_mac) / ip_layer(src_ip, dst_ip, ttl)
            / UDP(sport=sport, dport=dport) / Raw(payload))


def to_hex(packet: Any) -> str:
    """Hex string for `netdev-dummy/receive` from a scapy packet, bytes or hex string."""
    if isinstance(packet, str):
        return packet
    return bytes(packet).hex()


def read_pcap(path: str | Path) -> list[Packet]:
    """Ethernet packets of a pcap file; [] if it does not exist yet.

    ovs-vswitchd appends to the file while we read: a partial trailing record is
    ignored instead of failing, the next read sees it whole.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    if len(data) < 24:
        return []
    endian = _PCAP_MAGIC.get(data[:4])
    if endian is None:
        raise ValueError(f"{path}: not a pcap file")
    out: list[Packet] = []
    off = 24
    rec = struct.Struct(f"{endian}IIII")
    while off + rec.size <= len(data):
        _sec, _frac, incl_len, _orig = rec.unpack_from(data, off)
        start = off + rec.size
        if start + incl_len > len(data):
            break
        out.append(Ether(data[start:start + incl_len]))
        off = start + incl_len
    return out


def l4(packet: Packet) -> Packet | None:
    """The TCP or UDP layer of a packet, if any."""
    for layer in (TCP, UDP):
        if layer in packet:
            return packet[layer]
    return None


def ip(packet: Packet) -> Packet | None:
    """The IPv4 or IPv6 layer of a packet, if any."""
    for layer in (IP, IPv6):
        if layer in packet:
            return packet[layer]
    return None


def is_tcp(packet: Packet, flags: str | None = None, dport: int | None = None,
           sport: int | None = None) -> bool:
    """True for a TCP packet with exactly `flags` (e.g. "S", "SA") and the given ports."""
    if TCP not in packet:
        return False
    t = packet[TCP]
    return ((flags is None or str(t.flags) == flags)
            and (dport is None or t.dport == dport)
            and (sport is None or t.sport == sport))


def summary(pkts: list[Packet]) -> str:
    return "\n".join(p.summary() for p in pkts) or "(no packets)"


class PcapTail:
    """Reads only what was appended to a pcap since the last call: fast for big runs.

    Yields (src_ip, dst_ip, proto, sport, dport, tcp_flags, payload[:16]) for IPv4
    TCP/UDP frames, parsed with struct (scapy would be ~100x slower here).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset = 0
        self.endian = "<"

    def skip_to_end(self) -> None:
        for _ in self.read():
            pass

    def read(self):
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        if self.offset == 0:
            if len(data) < 24:
                return
            self.endian = _PCAP_MAGIC.get(data[:4], "<")
            self.offset = 24
        rec = struct.Struct(f"{self.endian}IIII")
        off = self.offset
        while off + rec.size <= len(data):
            _s, _f, incl, _o = rec.unpack_from(data, off)
            start = off + rec.size
            if start + incl > len(data):
                break
            frame = data[start:start + incl]
            off = start + incl
            parsed = _parse_ipv4_l4(frame)
            if parsed is not None:
                yield parsed
        self.offset = off


def _parse_ipv4_l4(frame: bytes):
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 0x0F) * 4
    proto = frame[23]
    src = ".".join(str(b) for b in frame[26:30])
    dst = ".".join(str(b) for b in frame[30:34])
    l4 = 14 + ihl
    if proto == 6 and len(frame) >= l4 + 20:
        sport, dport = struct.unpack_from("!HH", frame, l4)
        flags = frame[l4 + 13]
        data_off = (frame[l4 + 12] >> 4) * 4
        return (src, dst, "tcp", sport, dport, flags, frame[l4 + data_off:l4 + data_off + 16])
    if proto == 17 and len(frame) >= l4 + 8:
        sport, dport = struct.unpack_from("!HH", frame, l4)
        return (src, dst, "udp", sport, dport, 0, frame[l4 + 8:l4 + 24])
    return None
