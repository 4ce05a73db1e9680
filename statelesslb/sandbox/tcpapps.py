"""Tiny TCP programs the netns mode runs inside namespaces (stdlib only, run by path).

    python3 tcpapps.py echo-server --bind 10.0.0.11 --port 7007 --name vm1
    python3 tcpapps.py echo-client --vip 172.16.0.101 --port 7 --sports 40001,40002 \\
        --out /tmp/x.json --stop-file /tmp/x.stop --duration 60
    python3 tcpapps.py load --vip 172.16.0.100 --port 80 --path /who --clients 8 \\
        --duration 10 --out /tmp/load.json
    python3 tcpapps.py sniff --iface eth0 --ports 41000-41099 --out /tmp/s.json \\
        --stop-file /tmp/s.stop --duration 60

The echo server answers every line with "<name> <line>", so the client knows which
backend holds its connection. The echo client keeps one connection per source port and
sends a line every --interval seconds, checks each echo and counts errors; a connection
stops at its first error (a reset, an EOF, a timeout or a reply from another backend).
It rewrites --out (atomically) every half second and once more when it ends (at
--duration or when --stop-file appears). `load` runs --clients threads making one HTTP
request per new TCP connection for --duration seconds. `sniff` counts the TCP packets
arriving on --iface for local ports in --ports by (source address, source port, local
port): which address a reply really came from, whatever the client's TCP stack made of it.

Nothing here imports statelesslb: the file is run by path with any python3.
"""

from __future__ import annotations

import argparse
import errno
import http.client
import ipaddress
import json
import os
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

# --- echo server -----------------------------------------------------------------------


def echo_server(bind: str, port: int, name: str) -> None:
    prefix = name.encode() + b" "

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            try:
                for line in self.rfile:
                    self.wfile.write(prefix + line)
                    self.wfile.flush()
            except OSError:
                pass

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    with Server((bind, port), Handler) as server:
        print(f"echo server {name} listening on {bind}:{port}", flush=True)
        server.serve_forever()


# --- echo client -----------------------------------------------------------------------


class Conn:
    """One long-lived connection from a fixed source port."""

    def __init__(self, vip: str, port: int, src: str, sport: int, interval: float,
                 timeout: float):
        self.vip, self.port, self.src, self.sport = vip, port, src, sport
        self.interval = interval
        self.timeout = timeout
        self.backend: str | None = None
        self.sent = 0
        self.ok = 0
        self.error: str | None = None
        self.error_at: float | None = None
        self.max_gap = 0.0
        self.connected = False
        self.t0 = time.monotonic()

    def summary(self) -> dict[str, Any]:
        return {"sport": self.sport, "backend": self.backend, "connected": self.connected,
                "sent": self.sent, "ok": self.ok, "error": self.error,
                "error_at": self.error_at, "max_gap": round(self.max_gap, 3)}

    def run(self, stop: threading.Event, deadline: float) -> None:
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.src, self.sport))
            sock.settimeout(self.timeout)
            sock.connect((self.vip, self.port))
        except OSError as exc:
            self._fail(f"connect: {_describe(exc)}")
            return
        self.connected = True
        rfile = sock.makefile("rb")
        last_ok = time.monotonic()
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                line = f"{self.sport} {self.sent}\n".encode()
                try:
                    sock.sendall(line)
                    self.sent += 1
                    reply = rfile.readline()
                except OSError as exc:
                    self._fail(_describe(exc))
                    return
                if not reply:
                    self._fail("eof")
                    return
                name, _, echoed = reply.partition(b" ")
                if echoed != line:
                    self._fail(f"bad echo {reply!r}")
                    return
                if self.backend is None:
                    self.backend = name.decode()
                elif name.decode() != self.backend:
                    self._fail(f"backend changed {self.backend} -> {name.decode()}")
                    return
                self.ok += 1
                now = time.monotonic()
                self.max_gap = max(self.max_gap, now - last_ok)
                last_ok = now
                stop.wait(self.interval)
        finally:
            rfile.close()
            sock.close()

    def _fail(self, why: str) -> None:
        self.error = why
        self.error_at = round(time.monotonic() - self.t0, 3)


def _describe(exc: OSError) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timeout"
    if exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


def _write_json(path: str, doc: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def echo_client(vip: str, port: int, src: str, sports: list[int], interval: float,
                duration: float, timeout: float, out: str, stop_file: str | None) -> None:
    stop = threading.Event()
    deadline = time.monotonic() + duration
    conns = [Conn(vip, port, src, sp, interval, timeout) for sp in sports]
    threads = [threading.Thread(target=c.run, args=(stop, deadline), daemon=True)
               for c in conns]
    for t in threads:
        t.start()

    def report(done: bool) -> None:
        _write_json(out, {"done": done, "conns": [c.summary() for c in conns]})

    while time.monotonic() < deadline and any(t.is_alive() for t in threads):
        report(False)
        if stop_file and os.path.exists(stop_file):
            break
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout + 1)
    report(True)


# --- HTTP load -------------------------------------------------------------------------


def load(vip: str, port: int, path: str, clients: int, duration: float, timeout: float,
         max_requests: int, out: str, sources: Sequence[str] = ()) -> None:
    """`sources`: client addresses to open connections from, in turn (the kernel's
    own choice when empty)."""
    lock = threading.Lock()
    counts: dict[str, int] = {}
    errors: dict[str, int] = {}
    latencies: list[float] = []
    done = 0
    start = time.monotonic()
    deadline = start + duration

    def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            with lock:
                if done >= max_requests:
                    return
                done += 1
                source = (sources[done % len(sources)], 0) if sources else None
            t0 = time.monotonic()
            conn = http.client.HTTPConnection(vip, port, timeout=timeout,
                                              source_address=source)
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                body = resp.read().decode().strip()
                key, store = (body, counts) if resp.status == 200 else (
                    f"http {resp.status}", errors)
            except (OSError, http.client.HTTPException) as exc:
                key, store = (_describe(exc) if isinstance(exc, OSError)
                              else type(exc).__name__), errors
            finally:
                conn.close()
            with lock:
                store[key] = store.get(key, 0) + 1
                if store is counts:
                    latencies.append(time.monotonic() - t0)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + timeout + 5)
    elapsed = time.monotonic() - start
    latencies.sort()

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        return round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2)

    ok = sum(counts.values())
    _write_json(out, {
        "clients": clients, "duration": round(elapsed, 3), "ok": ok,
        "errors": sum(errors.values()), "error_kinds": errors, "backends": counts,
        "rps": round(ok / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
                       "max": pct(1.0)},
    })


# --- sniffer -------------------------------------------------------------------------

ETH_P_IP = 0x0800
PACKET_OUTGOING = 4


def sniff(iface: str, low: int, high: int, duration: float, out: str,
          stop_file: str | None) -> None:
    """Count incoming IPv4 TCP packets to local ports low..high by "src:sport>dport",
    rewriting --out every half second (and once more, with "done", at the end)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
    sock.bind((iface, 0))
    sock.settimeout(0.2)
    counts: dict[str, int] = {}
    deadline = time.monotonic() + duration
    next_write = 0.0
    print(f"sniffing on {iface} for ports {low}-{high}", flush=True)
    while time.monotonic() < deadline:
        if time.monotonic() >= next_write:
            _write_json(out, {"done": False, "counts": counts})
            next_write = time.monotonic() + 0.5
            if stop_file and os.path.exists(stop_file):
                break
        try:
            frame, addr = sock.recvfrom(2048)
        except TimeoutError:
            continue
        # (A socket bound to ETH_P_IP gets no copies of outgoing packets; skip any.)
        if addr[2] == PACKET_OUTGOING or len(frame) < 14 + 20 + 4:
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[0] >> 4 != 4 or ip[9] != 6 or len(ip) < ihl + 4:
            continue
        sport, dport = struct.unpack("!HH", ip[ihl:ihl + 4])
        if low <= dport <= high:
            key = f"{socket.inet_ntoa(ip[12:16])}:{sport}>{dport}"
            counts[key] = counts.get(key, 0) + 1
    sock.close()
    _write_json(out, {"done": True, "counts": counts})


# --- command line ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tcpapps")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("echo-server")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--name", required=True)
    c = sub.add_parser("echo-client")
    c.add_argument("--vip", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--src", default="0.0.0.0")
    c.add_argument("--sports", required=True, help="comma-separated source ports")
    c.add_argument("--interval", type=float, default=0.1)
    c.add_argument("--duration", type=float, default=60.0)
    c.add_argument("--timeout", type=float, default=10.0)
    c.add_argument("--out", required=True)
    c.add_argument("--stop-file")
    g = sub.add_parser("load")
    g.add_argument("--vip", required=True)
    g.add_argument("--port", type=int, default=80)
    g.add_argument("--path", default="/")
    g.add_argument("--clients", type=int, default=8)
    g.add_argument("--duration", type=float, default=10.0)
    g.add_argument("--timeout", type=float, default=5.0)
    g.add_argument("--max-requests", type=int, default=1_000_000)
    g.add_argument("--out", required=True)
    g.add_argument("--sources", default="",
                   help="an IPv4 range (CIDR) whose addresses the connections come from")
    f = sub.add_parser("sniff")
    f.add_argument("--iface", default="eth0")
    f.add_argument("--ports", required=True, help="local ports LOW-HIGH")
    f.add_argument("--duration", type=float, default=60.0)
    f.add_argument("--out", required=True)
    f.add_argument("--stop-file")
    a = p.parse_args(argv)
    if a.cmd == "echo-server":
        echo_server(a.bind, a.port, a.name)
    elif a.cmd == "echo-client":
        echo_client(a.vip, a.port, a.src, [int(x) for x in a.sports.split(",")], a.interval,
                    a.duration, a.timeout, a.out, a.stop_file)
    elif a.cmd == "sniff":
        low, _, high = a.ports.partition("-")
        sniff(a.iface, int(low), int(high or low), a.duration, a.out, a.stop_file)
    else:
        sources = ([str(ip) for ip in ipaddress.ip_network(a.sources)] if a.sources else [])
        load(a.vip, a.port, a.path, a.clients, a.duration, a.timeout, a.max_requests, a.out,
             sources)
    return 0


if __name__ == "__main__":
    sys.exit(main())
