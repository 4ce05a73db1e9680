"""Text rendering of the control socket's JSON documents for statelesslb-ctl."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Mapping, Sequence
from typing import Any

from statelesslb.nb.model import MODE_OPTION

# ---------------------------------------------------------------------------
# Human output (pure: document in, text out)


def _cell(value: Any) -> str:
    if value is None or value == []:
        return "-"
    if value is True:
        return "yes"
    if value is False:
        return "no"
    if isinstance(value, list | tuple):
        return ",".join(_cell(v) for v in value)
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "") -> str:
    """Left-aligned columns two spaces apart; None/empty shows as '-'."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    lines = []
    for row in [list(headers), *cells]:
        line = "  ".join(text.ljust(widths[i]) for i, text in enumerate(row))
        lines.append(indent + line.rstrip())
    return "\n".join(lines)


def _when(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    return f"{stamp} ({max(0.0, now - ts):.0f}s ago)"


def render_status(doc: Mapping[str, Any]) -> str:
    now = doc.get("now") or time.time()
    conns = " ".join(f"{name}={'up' if up else 'DOWN'}"
                     for name, up in sorted(doc.get("connections", {}).items()))
    layout = doc.get("layout")
    layout_text = (" ".join(f"{k}={v}" for k, v in sorted(layout.items()))
                   if layout else "not derived yet")
    rows = [
        ("chassis", doc.get("chassis")),
        ("health", "ok" if doc.get("healthy") else "PROBLEMS"),
        ("agent", f"statelesslb {doc.get('version', '?')}, pid {doc.get('pid', '?')}, "
                  f"started {_when(doc.get('started_at'), now)}"),
        ("bridge", doc.get("bridge_target")),
        ("connections", conns),
        ("nb writer", "yes (holds the lock)" if doc.get("nb_writer") else "no"),
        ("last full sync", _when(doc.get("last_full_sync"), now)),
        ("last change", _when(doc.get("last_apply"), now)),
        ("last change took", _phases(doc.get("last_apply_ms"))),
        ("flows", f"{_cell(doc.get('flows_installed'))} installed, "
                  f"{_cell(doc.get('flows_expected'))} expected"),
        ("groups", f"{_cell(doc.get('groups_installed'))} installed, "
                   f"{_cell(doc.get('groups_expected'))} expected"),
        ("bundles applied", doc.get("bundles_applied")),
        ("bridge wipes seen", doc.get("wipes_seen")),
        ("missed changes", doc.get("missed_changes")),
        ("last error", doc.get("last_error")),
        ("table layout", layout_text),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {_cell(v)}" for k, v in rows]
    lines += [f"problem: {p}" for p in doc.get("problems", [])]
    return "\n".join(lines)


def _phases(laps: object) -> str | None:
    """'3.1 ms (read_nb 0.2, plan 0.4, bundle 2.1, ...)' from last_apply_ms."""
    if not isinstance(laps, Mapping) or "total" not in laps:
        return None
    parts = ", ".join(f"{k} {v}" for k, v in laps.items() if k != "total")
    return f"{laps['total']} ms ({parts})"


def render_lb_list(doc: Mapping[str, Any]) -> str:
    chassis = doc.get("chassis") or "this chassis"
    lbs = doc.get("load_balancers", [])
    if not lbs:
        return ("no stateless load balancers (mark one with "
                f"`ovn-nbctl set load_balancer LB options:{MODE_OPTION}=mac`)")
    rows = [(lb["name"], lb.get("mode"), lb.get("protocol"), lb.get("persistence"),
             lb.get("vips"), _short_status(lb.get("nb_status")), lb.get("state"),
             lb.get("roles"))
            for lb in lbs]
    text = format_table(("NAME", "MODE", "PROTO", "PERSISTENCE", "VIPS", "NB STATUS",
                         f"ON {chassis.upper()}", "ROLES HERE"), rows)
    notes = []
    for lb in lbs:
        nb_status = lb.get("nb_status")
        if nb_status is None:
            notes.append(f"{lb['name']}: no NB status yet (is an NB writer agent running?)")
        elif not nb_status.startswith("ok"):
            notes.append(f"{lb['name']}: NB: {nb_status}")
        if lb.get("message"):
            notes.append(f"{lb['name']}: {chassis}: {lb['state']}: {lb['message']}")
    return "\n".join([text, *notes])


def _short_status(status: str | None) -> str | None:
    if status is None:
        return None
    return status.split(":", 1)[0].split(" ", 1)[0]


def _persistence_text(doc: Mapping[str, Any], now: float) -> str:
    p = doc.get("persistence")
    if not p:
        return "-"
    layers = [name for name, on in (("affinity", p["affinity"]),
                                     ("second-chance", p["second_chance"])) if on]
    text = ",".join(layers) or "hash only"
    if p["second_chance"]:
        text += f" (window {p['window']}s)"
    prev = doc.get("previous")
    if prev:
        left = prev["until"] - now
        text += (f"; previous bucket set in force for {left:.0f}s more" if left > 0
                 else "; previous bucket set expired")
    return text


def _hash_text(h: Mapping[str, Any] | None) -> str:
    if not h:
        return "-"
    if h.get("classes") is None:
        return f"{_cell(h.get('option'))} (one gateway datapath flow per connection)"
    return (f"{_cell(h.get('option'))} ({h['classes']:,} classes: at most that many "
            "gateway datapath flows per VIP)")


def render_lb_show(doc: Mapping[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    agent = doc.get("agent")
    chassis = doc.get("chassis")
    here = (f"{agent['state']}" + (f": {agent['message']}" if agent.get("message") else "")
            + f", roles: {_cell(agent.get('roles'))}") if agent else "not planned here"
    ports = [f"{p['name']} active on {p['chassis'] or 'no chassis'}"
             + (" (here)" if p.get("here") else "") for p in doc.get("gateway_ports", [])]
    lines = [
        f"load balancer {doc['name']} ({doc['uuid']})",
        f"  mode {_cell(doc.get('mode'))}, protocol {doc.get('protocol')}, "
        f"router {_cell(doc.get('router'))}",
    ]
    fields = [("NB status", _cell(doc.get("nb_status"))), (f"on {chassis}", here),
              ("persistence", _persistence_text(doc, now)),
              ("hash", _hash_text(doc.get("hash"))),
              *([("weights", ", ".join(f"{k}={w}" for k, w in doc["weights"].items())
                               + " (others 1; a weight is that many buckets)")]
                if doc.get("weights") else []),
              ("gateway ports", ", ".join(ports) or "-"), ("drained", _cell(doc.get("drain")))]
    width = max(len(k) for k, _ in fields) + 1
    lines += [f"  {(k + ':').ljust(width)} {v}" for k, v in fields]
    for vip in doc.get("vips", []):
        where = "installed here" if vip.get("group_here") else "not on this chassis"
        lines += ["", f"VIP {vip['vip']}  (VIP id {_cell(vip.get('vip_id'))}, "
                      f"group {_cell(vip.get('group_id'))}, {where})"]
        rows = [(b["backend"], b.get("bucket_id"), b.get("mac"), b.get("logical_port"),
                 b.get("chassis"), b.get("drained"), b.get("health") or "-",
                 b.get("in_group"))
                for b in vip.get("backends", [])]
        lines.append(format_table(("BACKEND", "BUCKET", "MAC", "PORT", "CHASSIS", "DRAINED",
                                   "HEALTH", "IN GROUP HERE"), rows, indent="  "))
    return "\n".join(lines)


def render_groups(doc: Mapping[str, Any]) -> str:
    chassis = doc.get("chassis")
    groups = doc.get("groups", [])
    if not groups:
        what = f" of {doc['lb']}" if doc.get("lb") else ""
        lines = [f"no statelesslb groups{what} on {chassis}"]
        lines += [f"note: {n}" for n in doc.get("notes", [])]
        return "\n".join(lines)
    lines = []
    for g in groups:
        state = ("in sync" if g.get("in_sync") else
                 "DIFFERS from plan" if g.get("in_plan") else "NOT IN PLAN (stale)")
        if lines:
            lines.append("")
        kind = "" if g.get("kind") in (None, "gateway") else f" ({g['kind']} bucket set)"
        lines.append(f"{chassis}: group {g['group_id']}{kind}  {_cell(g.get('lb'))} "
                     f"VIP {_cell(g.get('vip'))}  packets {g.get('packet_count')} "
                     f"bytes {g.get('byte_count')}  [{state}]")
        rows = [(b["bucket_id"], b.get("backend"), b.get("mac"), b.get("logical_port"),
                 b.get("chassis"), b.get("packet_count"), b.get("byte_count"))
                for b in g.get("buckets", [])]
        lines.append(format_table(("BUCKET", "BACKEND", "MAC", "PORT", "CHASSIS", "PACKETS",
                                   "BYTES"), rows, indent="  "))
        if g.get("drained"):
            lines.append(f"  drained (no bucket): {', '.join(g['drained'])}")
    return "\n".join(lines)


def render_trace(doc: Mapping[str, Any], verbose: bool = False) -> str:
    head = (f"{doc['lb']} VIP {doc['vip']}: {doc['protocol']} from {doc['source']} "
            f"on {doc['chassis']}")
    backend = doc.get("backend")
    lines = [head]
    if backend:
        lines.append(f"  backend {_cell(backend.get('backend'))} (bucket "
                     f"{backend['bucket_id']}, MAC {_cell(backend.get('mac'))}, port "
                     f"{_cell(backend.get('logical_port'))} on {_cell(backend.get('chassis'))})")
    else:
        lines.append("  no backend chosen: the packet did not reach the group")
    first = doc.get("first_table") or {}
    if doc.get("intercepted"):
        lines.append(f"  why: the statelesslb VIP flow in table {first.get('table')} (cookie "
                     f"{first.get('cookie')}) matched; group {doc['group_id']}")
        lines.append("       picks the live bucket with the highest hash score:")
        best = backend["bucket_id"] if backend else None
        rows = [(s["bucket_id"], s.get("backend"), s["score"],
                 "<- chosen" if s["bucket_id"] == best else "") for s in doc.get("scores", [])]
        lines.append(format_table(("BUCKET", "BACKEND", "SCORE", ""), rows, indent="    "))
        impl = doc.get("hash_impl")
        classes = doc.get("hash_classes")
        lines.append(f"  hash: {impl} build of OVS" if impl else
                     "  hash: scores match no known OVS build (murmur, crc32)")
        lines.append("  hashed: the 5-tuple" if classes == "5-tuple" else
                     f"  hashed: {_cell(classes)} = {_cell(doc.get('hash_fields'))}")
    else:
        table = _cell(first.get("table"))
        hit = ("nothing matched" if str(first.get("match", "")).startswith("No match")
               else f"{_cell(first.get('match'))} (cookie {_cell(first.get('cookie'))}) "
               "matched")
        lines.append(f"  why: in table {table} {hit}, not the statelesslb VIP flow:")
        lines.append("       check `statelesslb-ctl status` and `groups` on this chassis")
    if doc.get("tunnel_to"):
        lines.append(f"  sent through a tunnel to {doc['tunnel_to']}")
    lines += [textwrap.fill(n, 95, initial_indent="  note: ", subsequent_indent="        ")
              for n in doc.get("notes", [])]
    if verbose:
        lines += ["", f"ofproto/trace of {doc['flow']}:", doc.get("trace", "")]
    return "\n".join(lines)


def render_drain(doc: Mapping[str, Any]) -> str:
    bucket = f" (bucket {doc['bucket_id']})" if doc.get("bucket_id") is not None else ""
    if not doc.get("changed"):
        state = "already drained" if doc["action"] == "drain" else "not drained"
        text = f"{doc['lb']}: {doc['backend']}{bucket} is {state}; nothing changed"
    elif doc["action"] == "drain":
        text = (f"{doc['lb']}: drained {doc['backend']}{bucket}: the gateways remove its "
                "bucket; its DNAT flows stay")
    else:
        text = (f"{doc['lb']}: undrained {doc['backend']}{bucket}: the gateways insert its "
                "bucket again, with the same id")
    lines = [text, f"drain list now: {_cell(doc.get('drain'))}"]
    if doc.get("dropped"):
        lines.append(f"dropped malformed drain entries: {', '.join(doc['dropped'])}")
    return "\n".join(lines)
