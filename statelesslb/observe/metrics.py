"""Counters in the Prometheus text exposition format (version 0.0.4): pure, no I/O.

What one agent knows about its own chassis: per gateway bucket, the packets and
bytes its group sent to that backend (by bucket id, from dump-group-stats); per
local backend, the conntrack entries its chassis holds for a VIP (the connections
committed there); per LB, its state on this chassis. `statelesslb-ctl metrics`
prints it; node_exporter's textfile collector or any scraper reads the file.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_CT_TUPLES = re.compile(
    r"orig=\(src=([^,]+),dst=([^,]+),sport=(\d+),dport=(\d+)\),"
    r"reply=\(src=([^,]+),dst=([^,]+),sport=(\d+),dport=(\d+)\)")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str        # "counter" or "gauge"
    help: str


BUCKET_PACKETS = Metric("statelesslb_bucket_packets_total", "counter",
                        "Packets this chassis' select group sent through the bucket.")
BUCKET_BYTES = Metric("statelesslb_bucket_bytes_total", "counter",
                      "Bytes this chassis' select group sent through the bucket.")
BACKEND_CONNTRACK = Metric("statelesslb_backend_conntrack_entries", "gauge",
                           "Conntrack entries this chassis holds for connections to the "
                           "VIP DNATed to the backend.")
LB_STATE = Metric("statelesslb_lb_state", "gauge",
                  "1 for the load balancer's state on this chassis (ok, pending, error).")
AGENT_HEALTHY = Metric("statelesslb_agent_healthy", "gauge",
                       "1 when the agent reports no problem (statelesslb-ctl status).")


def conntrack_counts(dump: str) -> Counter[tuple[str, int, str, int]]:
    """(VIP ip, VIP port, backend ip, backend port) -> entries, from dpctl/dump-conntrack:
    an entry whose original destination is the VIP and whose reply comes from the
    backend is a connection DNATed there."""
    counts: Counter[tuple[str, int, str, int]] = Counter()
    for m in _CT_TUPLES.finditer(dump):
        _src, dst, _sport, dport, rsrc, _rdst, rsport, _rdport = m.groups()
        if dst != rsrc:
            counts[(dst, int(dport), rsrc, int(rsport))] += 1
    return counts


def _label_value(value: object) -> str:
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample(name: str, labels: Mapping[str, object], value: float | int) -> str:
    inner = ",".join(f'{key}="{_label_value(val)}"' for key, val in labels.items())
    return f"{name}{{{inner}}} {value}"


def render(samples: Iterable[tuple[Metric, Mapping[str, object], float | int | None]]) -> str:
    """The exposition text: each metric's HELP and TYPE once, then its samples
    (samples without a value, e.g. counters OVS did not report, are left out)."""
    by_metric: dict[Metric, list[str]] = {}
    for metric, labels, value in samples:
        if not _NAME.fullmatch(metric.name):
            raise ValueError(f"bad metric name {metric.name!r}")
        lines = by_metric.setdefault(metric, [])
        if value is not None:
            lines.append(_sample(metric.name, labels, value))
    out = []
    for metric, lines in by_metric.items():
        out.append(f"# HELP {metric.name} {metric.help}")
        out.append(f"# TYPE {metric.name} {metric.kind}")
        out.extend(lines)
    return "\n".join(out) + "\n"
