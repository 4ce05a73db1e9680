"""Derive the OpenFlow table layout of the running ovn-controller.

Stage numbers and the egress base move between OVN releases, so nothing is
hard-coded: the SB says which logical table a stage is (Logical_Flow
external_ids:stage-name, table_id); the bridge says which OpenFlow table a
logical flow landed in (OVN's cookie is the first 32 bits of the lflow uuid);
the difference is the pipeline's base.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable

import ovs.jsonrpc
import ovs.stream

from statelesslb.nb.model import TableLayout

LOG = logging.getLogger(__name__)

# Switch ingress stage that ends port security (renamed in 22.09).
PORT_SEC_STAGES = ("ls_in_apply_port_sec", "ls_in_port_sec_nd")
ROUTER_INTERCEPT_STAGE = "lr_in_defrag"
OUTPUT_STAGE = "ls_in_l2_lkup"
GW_REDIRECT_STAGE = "lr_in_gw_redirect"
MAX_PROBES = 200

_TABLE_RE = re.compile(r"\btable=(\d+)")
_RESUBMIT_RE = re.compile(r"resubmit\(,(\d+)\)")


class LayoutError(RuntimeError):
    pass


def split_remotes(remote: str) -> list[str]:
    """"unix:/a.sock,tcp:10.0.0.1:6642" -> each remote, as python-ovs splits them (a
    part without a colon belongs to the previous remote)."""
    remotes: list[str] = []
    for part in remote.split(","):
        if remotes and ":" not in part:
            remotes[-1] += "," + part
        else:
            remotes.append(part.strip())
    return remotes


class SbQuery:
    """One-shot OVSDB selects on the SB (Logical_Flow is too big to monitor).

    `remote` may list several servers, comma separated (a clustered SB): each is tried
    in turn until one answers. A follower's answer may lag the leader's by a few
    milliseconds, which does not matter for the table layout.
    """

    def __init__(self, remote: str, timeout: float = 10.0):
        self.remote = remote
        self.remotes = split_remotes(remote)
        self.timeout = timeout

    def select(self, table: str, where: list, columns: list[str]) -> list[dict]:
        errors = []
        for remote in self.remotes:
            try:
                return self._select(remote, table, where, columns)
            except LayoutError as exc:
                errors.append(str(exc))
        raise LayoutError("; ".join(errors))

    def _select(self, remote: str, table: str, where: list, columns: list[str]) -> list[dict]:
        error, stream = ovs.stream.Stream.open_block(
            ovs.stream.Stream.open(remote), int(self.timeout * 1000)
        )
        if error:
            raise LayoutError(f"cannot connect to {remote}: {os.strerror(error)}")
        conn = ovs.jsonrpc.Connection(stream)
        try:
            op = {"op": "select", "table": table, "where": where, "columns": columns}
            request = ovs.jsonrpc.Message.create_request("transact", ["OVN_Southbound", op])
            error, reply = conn.transact_block(request)
            if error or reply is None or reply.error:
                raise LayoutError(f"select on {table} at {remote} failed: {error or reply}")
            result = reply.result[0]
            if "error" in result:
                raise LayoutError(f"select on {table} at {remote} failed: {result}")
            return result["rows"]
        finally:
            conn.close()

    def stage_rows(self, stage: str) -> list[dict]:
        where = [["external_ids", "includes", ["map", [["stage-name", stage]]]]]
        return self.select("Logical_Flow", where, ["_uuid", "table_id", "pipeline", "actions"])

    def table_rows(self, pipeline: str, table_id: int) -> list[dict]:
        where = [["pipeline", "==", pipeline], ["table_id", "==", table_id]]
        return self.select("Logical_Flow", where, ["_uuid", "table_id", "pipeline", "actions"])


def _ovn_cookie(row: dict) -> int:
    return int(row["_uuid"][1][:8], 16)


def _find_on_bridge(
    rows: Iterable[dict], dump_by_cookie: Callable[[int], str]
) -> tuple[dict, str] | None:
    for n, row in enumerate(rows):
        if n >= MAX_PROBES:
            break
        dump = dump_by_cookie(_ovn_cookie(row))
        if _TABLE_RE.search(dump):
            return row, dump
    return None


def derive_layout(sb: SbQuery, dump_by_cookie: Callable[[int], str]) -> TableLayout:
    """dump_by_cookie(c) returns `ovs-ofctl dump-flows BR cookie=c/-1` output."""
    l2_rows = [r for r in sb.stage_rows(OUTPUT_STAGE) if "output;" in r["actions"]]
    found = _find_on_bridge(l2_rows, dump_by_cookie)
    if found is None:
        raise LayoutError("no local OpenFlow flow of stage ls_in_l2_lkup yet")
    row, dump = found
    ingress_base = int(_TABLE_RE.search(dump).group(1)) - row["table_id"]
    targets = [int(t) for t in _RESUBMIT_RE.findall(dump)]
    if not targets:
        raise LayoutError(f"ls_in_l2_lkup flow without resubmit: {dump.strip()[:200]}")
    output_table = targets[-1]

    egress0 = sb.table_rows("egress", 0)
    found = _find_on_bridge(egress0, dump_by_cookie)
    if found is None:
        raise LayoutError("no local OpenFlow flow of the first egress stage yet")
    egress_base = int(_TABLE_RE.search(found[1]).group(1))

    defrag = sb.stage_rows(ROUTER_INTERCEPT_STAGE)
    if not defrag:
        raise LayoutError(f"no logical flow of stage {ROUTER_INTERCEPT_STAGE} in the SB")
    port_sec_id = None
    for stage in PORT_SEC_STAGES:
        rows = sb.stage_rows(stage)
        if rows:
            port_sec_id = rows[0]["table_id"]
            break
    if port_sec_id is None:
        raise LayoutError(f"none of the stages {PORT_SEC_STAGES} found in the SB")
    # Optional: only direct return (options:stateless_return=direct) uses it.
    redirect = sb.stage_rows(GW_REDIRECT_STAGE)
    gw_redirect = ingress_base + redirect[0]["table_id"] if redirect else None
    layout = TableLayout(
        lr_in_intercept=ingress_base + defrag[0]["table_id"],
        ls_out_intercept=egress_base,
        ls_out_next=egress_base + 1,
        ls_in_intercept=ingress_base + port_sec_id + 1,
        ls_in_next=ingress_base + port_sec_id + 2,
        output=output_table,
        lr_in_gw_redirect=gw_redirect,
        lr_in_gw_redirect_next=None if gw_redirect is None else gw_redirect + 1,
    )
    LOG.debug("OpenFlow table layout: %s", layout)
    return layout
