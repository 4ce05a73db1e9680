"""tcpapps.py sniff: counts incoming TCP packets for a port range by source address and
port (the bench's check of which address replies really come from). Runs on the loopback
interface: needs root (an AF_PACKET socket), no OVS."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from statelesslb.sandbox import tcpapps

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="AF_PACKET needs root")


def _listener() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    return srv


def test_sniff_counts_incoming_packets_in_the_port_range_by_source(tmp_path: Path) -> None:
    inside, outside = _listener(), _listener()
    port, other = inside.getsockname()[1], outside.getsockname()[1]
    out, stop = tmp_path / "s.json", tmp_path / "s.stop"
    thread = threading.Thread(target=tcpapps.sniff,
                              args=("lo", port, port, 20.0, str(out), str(stop)))
    thread.start()
    try:
        time.sleep(0.5)  # the socket is bound once the first report is written
        clients = []
        for srv in (inside, outside):
            # From another loopback address: the source is not the destination.
            c = socket.create_connection(srv.getsockname(), source_address=("127.0.0.2", 0))
            c.sendall(b"x" * 10)
            clients.append(c)
        time.sleep(0.5)
    finally:
        stop.touch()
        thread.join(5)
    sport = clients[0].getsockname()[1]
    for c in clients:
        c.close()
    inside.close()
    outside.close()
    counts = json.loads(out.read_text())
    assert counts["done"] is True
    key = f"127.0.0.2:{sport}>{port}"
    # SYN, ACK and the data segment at least, each once (loopback's outgoing copy skipped).
    assert 3 <= counts["counts"].get(key, 0) <= 4, counts
    assert not [k for k in counts["counts"] if k.endswith(f">{other}")], counts
