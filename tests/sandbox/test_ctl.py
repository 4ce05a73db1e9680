"""statelesslb-ctl against real agents in a sandbox: every value checked against the truth
(the NB's ids, the bridge's groups, where packets really arrive)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from statelesslb.nb.weights import SLOT_BASE, slot_ids
from statelesslb.observe.predict import FlowTuple, predict_bucket
from statelesslb.sandbox import Sandbox, Topology, wait_until
from statelesslb.sandbox import packets as P
from statelesslb.sandbox.agents import start_agents, stop_agent, wait_agents_ready
from statelesslb.sandbox.traffic import (
    GROUP_BASE,
    OUR_COOKIES,
    create_lb,
    installed_fields,
    lb_external_ids,
    lb_ids,
    our_flows,
    our_groups,
)

pytestmark = pytest.mark.sandbox

TOPOLOGY_KWARGS = {"vms": 3}
LB = "lb1"
VIP_IP = "172.16.0.100"
VIP = f"{VIP_IP}:80"
BACKENDS = ("10.0.0.11:8080", "10.0.0.12:8080", "10.0.0.13:8080")
COOKIE_SPEC = OUR_COOKIES


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.returncode == 0, self.stderr
        return json.loads(self.stdout)


def ctl(*args: str, timeout: float = 30) -> Run:
    proc = subprocess.run([sys.executable, "-m", "statelesslb.cli.ctl", *args],
                          capture_output=True, text=True, timeout=timeout)
    return Run(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def lab(sandbox: Sandbox, topo: Topology) -> Iterator[Sandbox]:
    """Agents on every chassis and one stateless LB, installed on gw1."""
    start_agents(sandbox)
    try:
        wait_agents_ready(sandbox)
        create_lb(sandbox, LB, VIP, list(BACKENDS), router=topo.router)
        wait_until(lambda: len(gw_buckets(sandbox)) == 3, 30, 0.1, "gw1's group")
        yield sandbox
    finally:
        for chassis in sandbox.chassis.values():
            stop_agent(sandbox, chassis)


def sock(sbx: Sandbox, chassis: str) -> list[str]:
    return ["--socket", sbx.agents[chassis]["ctl"]]


def nb_db(sbx: Sandbox) -> list[str]:
    return ["--db", sbx.nb]


def nb_ext(sbx: Sandbox) -> dict[str, str]:
    return lb_external_ids(sbx, LB)


def gw_buckets(sbx: Sandbox) -> list[int]:
    """Bucket ids of our group on gw1, in list order, straight from ovs-ofctl."""
    dump = sbx.chassis["gw1"].ofctl("dump-groups")
    for line in dump.splitlines():
        if "selection_method=hash" in line:
            return [int(part.split(",", 1)[0]) for part in line.split("bucket_id:")[1:]]
    return []


def defrag_table(sbx: Sandbox, chassis: str = "gw1") -> int:
    """The OpenFlow table of the router's lr_in_defrag stage on a chassis, found without
    the agent's code: an SB logical flow of that stage, then its cookie (the first 32
    bits of its uuid) on br-int. The layout moves between OVN releases (13 in 23.03,
    15 in 25.03)."""
    rows = sbx.sb_rows("Logical_Flow", "external_ids:stage-name=lr_in_defrag",
                       columns=["_uuid"])
    for row in rows:
        dump = sbx.chassis[chassis].ofctl("dump-flows", f"cookie=0x{row['_uuid'][:8]}/-1")
        tables = {int(t.split(",", 1)[0]) for t in dump.split(" table=")[1:]}
        if tables:
            (table,) = tables
            return table
    raise AssertionError(f"no lr_in_defrag flow of the SB on {chassis}'s br-int")


def groups_of(sbx: Sandbox, chassis: str = "gw1") -> dict[int, dict[str, Any]]:
    doc = ctl("groups", LB, "--format", "json", *sock(sbx, chassis)).json()
    assert len(doc["groups"]) == 1, doc
    return {b["bucket_id"]: b for b in doc["groups"][0]["buckets"]}


def trace(sbx: Sandbox, sport: int, chassis: str = "gw1") -> dict[str, Any]:
    return ctl("trace", LB, "172.16.0.50", str(sport), "--format", "json",
               *sock(sbx, chassis)).json()


def test_status_reports_a_healthy_agent_per_chassis(lab: Sandbox) -> None:
    writers = []
    for name, info in lab.agents.items():
        # --config-file alone: the socket path comes from the agent's own configuration.
        doc = ctl("status", "--check", "--format", "json", "--config-file",
                  info["config"]).json()
        assert doc["chassis"] == name
        assert doc["healthy"] is True and doc["problems"] == []
        assert doc["connections"] == {"nb": True, "sb": True, "ovs": True}
        assert doc["flows_installed"] == doc["flows_expected"] >= 1
        assert doc["groups_installed"] == doc["groups_expected"]
        assert doc["layout"]["lr_in_intercept"] == defrag_table(lab, name)
        assert doc["last_full_sync"] and doc["last_error"] is None
        writers.append(doc["nb_writer"])
    assert writers.count(True) == 1
    text = ctl("status", *sock(lab, "gw1"))
    assert text.returncode == 0 and "health             ok" in text.stdout


def test_lb_list_shows_status_and_roles_per_chassis(lab: Sandbox) -> None:
    roles = {}
    for chassis in lab.agents:
        doc = ctl("lb-list", "--format", "json", *sock(lab, chassis)).json()
        assert doc["chassis"] == chassis
        (lb,) = doc["load_balancers"]
        assert (lb["name"], lb["mode"], lb["protocol"], lb["vips"]) == (LB, "mac", "tcp", [VIP])
        assert lb["nb_status"] == "ok" and lb["state"] == "ok"
        assert lb["persistence"] == "second-chance"  # the default
        roles[chassis] = lb["roles"]
    assert roles == {"gw1": ["gateway"], "gw2": ["standby-gateway"], "hv1": ["backend"],
                     "hv2": ["backend"]}
    text = ctl("lb-list", *sock(lab, "gw1")).stdout
    assert text.splitlines()[1].split() == [LB, "mac", "tcp", "second-chance", VIP, "ok",
                                             "ok", "gateway"]


def test_lb_show_matches_the_nb_and_sb(lab: Sandbox, topo: Topology) -> None:
    vip_ids, buckets = lb_ids(lab, LB)
    doc = ctl("lb-show", LB, "--format", "json", *sock(lab, "gw1")).json()
    assert doc["gateway_ports"] == [{"name": topo.dgp, "chassis": "gw1", "here": True}]
    (vip,) = doc["vips"]
    assert vip["vip"] == VIP and vip["vip_id"] == vip_ids[VIP] and vip["group_here"]
    assert vip["group_id"] == 0x70000000 + vip_ids[VIP]
    by_key = {b["backend"]: b for b in vip["backends"]}
    assert set(by_key) == set(BACKENDS)
    for vm in topo.vms:
        row = by_key[f"{vm.ip}:8080"]
        assert row["bucket_id"] == buckets[f"{vm.ip}:8080"]
        assert (row["mac"], row["logical_port"], row["chassis"]) == (vm.mac, vm.name,
                                                                     vm.chassis)
        assert row["drained"] is False and row["in_group"] is True
    # The same from a backend chassis, which has no group.
    doc = ctl("lb-show", LB, "--format", "json", *sock(lab, "hv1")).json()
    assert doc["vips"][0]["group_here"] is False
    assert doc["agent"]["roles"] == ["backend"]


def test_groups_counters_and_trace_follow_real_packets(lab: Sandbox, topo: Topology) -> None:
    # Drain and undrain vm1's backend first: its bucket comes back at its place in
    # canonical order (ties go to the later bucket: every gateway lists ids ascending),
    # not at the end. List positions (what dump-group-stats numbers) start at 0, bucket
    # ids at 1: a counter filed by position instead of id shows below.
    buckets = json.loads(nb_ext(lab)["statelesslb:buckets"])
    first, *rest = [buckets[b] for b in BACKENDS]
    for command, want in (("drain", sorted(rest)), ("undrain", sorted([first, *rest]))):
        run = ctl(command, LB, BACKENDS[0], *nb_db(lab))
        assert run.returncode == 0, run.stderr
        wait_until(lambda w=want: gw_buckets(lab) == w, 10, 0.05, f"buckets {want} on gw1")

    before = groups_of(lab)
    assert [before[b]["position"] for b in sorted([first, *rest])] == [0, 1, 2]
    for bucket_id, row in before.items():
        vm = topo.vm_by_ip(row["backend"].split(":")[0])
        assert buckets[row["backend"]] == bucket_id and row["mac"] == vm.mac

    # Trace some source ports until every bucket was picked at least once.
    chosen: dict[int, dict[str, Any]] = {}
    intercept = defrag_table(lab)
    for sport in range(41000, 41200):
        doc = trace(lab, sport)
        assert doc["intercepted"] and doc["first_table"]["table"] == intercept
        # The printed scores are those of a known hash build (predict.py agrees).
        assert doc["hash_impl"] in ("murmur", "crc32")
        chosen[sport] = doc["backend"]
        if {c["bucket_id"] for c in chosen.values()} == set(buckets.values()):
            break
    assert {c["bucket_id"] for c in chosen.values()} == set(buckets.values())
    assert groups_of(lab) == before, "a trace must not count as traffic"

    expected = {b: 0 for b in buckets.values()}
    for sport, backend in chosen.items():
        vm = topo.vm_by_ip(backend["backend"].split(":")[0])
        assert (backend["mac"], backend["logical_port"], backend["chassis"]) == (
            vm.mac, vm.name, vm.chassis)
        lab.client_inject(P.tcp_syn(topo.client_mac, topo.dgp_mac, topo.client_ip, VIP_IP,
                                    sport, 80))
        hv = lab.chassis[vm.chassis]
        got = wait_until(lambda h=hv, v=vm, s=sport: [
            p for p in h.sent(v.name) if P.is_tcp(p, "S", sport=s)], 10, 0.05,
            f"SYN from port {sport} at {vm.name}")
        assert P.ip(got[0]).dst == vm.ip and P.l4(got[0]).dport == 8080
        for other in topo.vms:  # and nowhere else
            if other.name != vm.name:
                assert not [p for p in lab.chassis[other.chassis].sent(other.name)
                            if P.is_tcp(p, "S", sport=sport)]
        expected[backend["bucket_id"]] += 1

    def counted() -> bool:
        after = groups_of(lab)
        return all(after[b]["packet_count"] - before[b]["packet_count"] == n
                   for b, n in expected.items())

    wait_until(counted, 10, 0.1, f"per-bucket packet counters to grow by {expected}")
    text = ctl("groups", *sock(lab, "gw1")).stdout
    assert "[in sync]" in text and "BUCKET  BACKEND" in text


_SAMPLE = re.compile(r'^(\w+)\{(.*)\} (\d+)$')


def samples(text: str, name: str) -> dict[frozenset, int]:
    """A metric's samples from exposition text, read with a regex of the test's own."""
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) == name:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out[labels] = int(m.group(3))
    return out


def test_metrics_follow_bucket_counters_and_backend_conntrack(lab: Sandbox, topo: Topology,
                                                              tmp_path) -> None:
    # A new connection: the gateway counts a packet on its bucket, the backend's chassis
    # commits it to conntrack.
    sport = 41500
    backend = trace(lab, sport)["backend"]
    vm = topo.vm_by_ip(backend["backend"].split(":")[0])
    lab.client_inject(P.tcp_syn(topo.client_mac, topo.dgp_mac, topo.client_ip, VIP_IP,
                                sport, 80))
    wait_until(lambda: [p for p in lab.chassis[vm.chassis].sent(vm.name)
                        if P.is_tcp(p, "S", sport=sport)], 10, 0.05, f"the SYN at {vm.name}")

    counters = {b: row["packet_count"] for b, row in groups_of(lab).items()}
    text = ctl("metrics", *sock(lab, "gw1")).stdout
    assert "# TYPE statelesslb_bucket_packets_total counter" in text
    packets = samples(text, "statelesslb_bucket_packets_total")
    by_bucket = {dict(labels)["bucket_id"]: (dict(labels), value)
                 for labels, value in packets.items()}
    assert set(by_bucket) == {str(b) for b in counters}
    for bucket_id, (labels, value) in by_bucket.items():
        assert value == counters[int(bucket_id)]
        assert (labels["chassis"], labels["lb"], labels["vip"], labels["group"]) == (
            "gw1", LB, VIP, "gateway")
    assert by_bucket[str(backend["bucket_id"])][1] >= 1
    assert samples(text, "statelesslb_agent_healthy") == {frozenset({("chassis", "gw1")}): 1}
    assert {dict(k)["state"] for k in samples(text, "statelesslb_lb_state")} == {"ok"}

    want = frozenset({("chassis", vm.chassis), ("lb", LB), ("vip", VIP),
                      ("backend", backend["backend"])})
    hv_text = ctl("metrics", *sock(lab, vm.chassis)).stdout
    assert samples(hv_text, "statelesslb_backend_conntrack_entries").get(want, 0) >= 1

    out = tmp_path / "statelesslb.prom"
    run = ctl("metrics", "--output", str(out), *sock(lab, vm.chassis))
    assert run.returncode == 0 and run.stdout.strip() == f"wrote {out}"
    assert samples(out.read_text(), "statelesslb_backend_conntrack_entries").get(want, 0) >= 1
    assert [p.name for p in tmp_path.iterdir()] == ["statelesslb.prom"]   # no temp left


def test_drain_removes_the_bucket_and_keeps_the_dnat_flows(lab: Sandbox) -> None:
    drained = BACKENDS[1]  # vm2 on hv2
    buckets = json.loads(nb_ext(lab)["statelesslb:buckets"])
    bucket_id = buckets[drained]
    sport = next(p for p in range(42000, 42300) if trace(lab, p)["backend"]["bucket_id"]
                 == bucket_id)

    doc = ctl("drain", LB, drained, "--format", "json", *nb_db(lab)).json()
    assert doc == {"action": "drain", "backend": drained, "bucket_id": bucket_id,
                   "changed": True, "drain": [drained], "dropped": [], "lb": LB,
                   "uuid": doc["uuid"]}
    assert json.loads(nb_ext(lab)["statelesslb:drain"]) == [drained]
    wait_until(lambda: bucket_id not in gw_buckets(lab), 10, 0.05, "bucket removed on gw1")
    assert set(groups_of(lab)) == set(buckets.values()) - {bucket_id}
    group = ctl("groups", LB, "--format", "json", *sock(lab, "gw1")).json()["groups"][0]
    assert group["drained"] == [drained] and group["in_sync"]
    # The backend's chassis keeps its DNAT flow: packets already on their way still land.
    flows = our_flows(lab.chassis["hv2"])
    assert any(f"nat(dst={drained})" in f for f in flows), flows
    show = ctl("lb-show", LB, "--format", "json", *sock(lab, "gw1")).json()
    row = next(b for b in show["vips"][0]["backends"] if b["backend"] == drained)
    assert row["drained"] is True and row["in_group"] is False
    assert trace(lab, sport)["backend"]["bucket_id"] != bucket_id

    again = ctl("drain", LB, drained, "--format", "json", *nb_db(lab)).json()
    assert again["changed"] is False

    doc = ctl("undrain", LB, drained, "--format", "json", *nb_db(lab)).json()
    assert doc["changed"] is True and doc["drain"] == []
    wait_until(lambda: bucket_id in gw_buckets(lab), 10, 0.05, "bucket back on gw1")
    # Same bucket id, so the same flows come back to it.
    assert trace(lab, sport)["backend"]["bucket_id"] == bucket_id


def test_drain_refuses_to_empty_a_vip(lab: Sandbox) -> None:
    assert ctl("drain", LB, BACKENDS[0], *nb_db(lab)).returncode == 0
    assert ctl("drain", LB, BACKENDS[1], *nb_db(lab)).returncode == 0
    try:
        run = ctl("drain", LB, BACKENDS[2], *nb_db(lab))
        assert run.returncode == 1
        assert "would leave VIP 172.16.0.100:80" in run.stderr and "--force" in run.stderr
        assert sorted(json.loads(nb_ext(lab)["statelesslb:drain"])) == list(BACKENDS[:2])
    finally:
        for backend in BACKENDS[:2]:
            assert ctl("undrain", LB, backend, *nb_db(lab)).returncode == 0
    wait_until(lambda: len(gw_buckets(lab)) == 3, 10, 0.05, "all buckets back")


def test_trace_through_gateway_affinity_matches_the_packet(lab: Sandbox,
                                                           topo: Topology) -> None:
    gw1 = lab.chassis["gw1"]
    table = defrag_table(lab)

    def intercept_actions() -> str:
        return gw1.ofctl("dump-flows", f"table={table}," + COOKIE_SPEC)

    lab.nbctl("set", "load_balancer", LB, "options:stateless_persistence=affinity")
    try:
        wait_until(lambda: "actions=ct(table=" in intercept_actions(), 10, 0.05,
                   "the intercept flow to look up the affinity zone")
        doc = trace(lab, 43000)
        assert doc["intercepted"] and doc["notes"][0].startswith("affinity:")
        backend = doc["backend"]
        vm = topo.vm(backend["logical_port"])
        lab.client_inject(P.tcp_syn(topo.client_mac, topo.dgp_mac, topo.client_ip, VIP_IP,
                                    43000, 80))
        hv = lab.chassis[vm.chassis]
        wait_until(lambda: [p for p in hv.sent(vm.name) if P.is_tcp(p, "S", sport=43000)],
                   10, 0.05, f"the SYN at {vm.name}")
        # The gateway remembered that bucket for the connection, in ct_mark.
        zone = doc["trace"].split("in zone ", 1)[1].split(")", 1)[0]
        entries = [line for line in gw1.appctl("dpctl/dump-conntrack", f"zone={zone}")
                   .splitlines() if "sport=43000" in line]
        assert len(entries) == 1 and f"mark={backend['bucket_id']}," in entries[0]
    finally:
        lab.nbctl("remove", "load_balancer", LB, "options", "stateless_persistence")
        wait_until(lambda: "actions=group:" in intercept_actions(), 10, 0.05,
                   "the plain intercept flow back")


def test_trace_elsewhere_says_where_the_gateway_is(lab: Sandbox) -> None:
    for chassis in ("gw2", "hv1"):
        run = ctl("trace", LB, "172.16.0.50", "40000", *sock(lab, chassis))
        assert run.returncode == 1
        assert f"{chassis} is not an active gateway of lb1" in run.stderr
        assert "cr-lr0-public is on gw1" in run.stderr
    # gw2 is a standby gateway: its groups are ready, and it says it is a standby.
    doc = ctl("groups", LB, "--format", "json", *sock(lab, "gw2")).json()
    assert doc["groups"] and "cr-lr0-public is on gw1" in doc["notes"][0]
    assert "standby" in doc["notes"][0]
    doc = ctl("groups", LB, "--format", "json", *sock(lab, "hv1")).json()
    assert [g for g in doc["groups"] if g["kind"] == "gateway"] == []
    assert "cr-lr0-public is on gw1" in doc["notes"][0]


def test_errors_say_what_to_do(lab: Sandbox, tmp_path) -> None:
    missing = tmp_path / "nothing.ctl"
    run = ctl("status", "--socket", str(missing))
    assert run.returncode == 3 and run.stdout == ""
    assert run.stderr == (f"statelesslb-ctl: no agent socket at {missing}; is "
                          "statelesslb-agent running? (systemctl status statelesslb-agent, "
                          "or pass --socket PATH)\n")

    for args in (("lb-show", "nope"), ("groups", "nope"),
                 ("trace", "nope", "172.16.0.50", "1000", "tcp")):
        run = ctl(*args, *sock(lab, "gw1"))
        assert run.returncode == 1, args
        assert "no load balancer named nope" in run.stderr
        assert "Traceback" not in run.stderr
    for args in (("drain", "nope", BACKENDS[0]), ("undrain", "nope", BACKENDS[0])):
        run = ctl(*args, *nb_db(lab))
        assert (run.returncode, run.stderr) == (
            1, "statelesslb-ctl: no load balancer named nope in the NB\n")

    run = ctl("drain", LB, "10.0.0.99:8080", *nb_db(lab))
    assert run.returncode == 1 and "not a backend of lb1 (its backends: 10.0.0.11:8080" in (
        run.stderr)
    run = ctl("drain", LB, "10.0.0.11:8080", "--db", f"unix:{tmp_path}/nb.sock")
    assert run.returncode == 3 and "no NB database socket at" in run.stderr

    # Invalid input stops before anything is asked: exit 2 even with no agent around.
    for args in (("trace", LB, "172.16.0.50;reboot", "1000"),
                 ("trace", LB, "172.16.0.50", "99999"),
                 ("trace", LB, "172.16.0.50", "1000", "icmp"),
                 ("trace", LB, "172.16.0.50", "1000", "--vip", "172.16.0.100"),
                 ("drain", LB, "10.0.0.11")):
        run = ctl(*args, "--socket", str(missing), "--db", f"unix:{missing}")
        assert run.returncode == 2, (args, run.stderr)
        assert run.stderr.startswith("statelesslb-ctl: ") and "Traceback" not in run.stderr


def test_weights_are_slots_the_switch_and_ctl_agree_on(lab: Sandbox, topo: Topology) -> None:
    """options:stateless_weights 1:2:4 -> 7 buckets on gw1 (slot ids B + k * 2**20);
    statelesslb-ctl maps every slot to its backend, and its traces pick what predict
    computes from the installed group."""
    vip = "172.16.0.104:80"
    create_lb(lab, "lbw", vip, list(BACKENDS), router=topo.router)
    lab.nbctl("set", "load_balancer", "lbw", "options:stateless_weights="
              f'"{BACKENDS[1]}=2,{BACKENDS[2]}=4"')
    wait_until(lambda: lb_ids(lab, "lbw")[0].get(vip), 10, 0.05, "lbw's ids")
    vip_ids, ids = lb_ids(lab, "lbw")
    gid = GROUP_BASE + vip_ids[vip]
    weights = dict(zip(BACKENDS, (1, 2, 4), strict=True))
    want = sorted(s for b in BACKENDS for s in slot_ids(ids[b], weights[b]))
    gw = lab.chassis["gw1"]
    wait_until(lambda: sorted(our_groups(gw).get(gid, {}).buckets
                              if gid in our_groups(gw) else []) == want,
               10, 0.05, f"7 buckets {want} on gw1")
    doc = ctl("groups", "lbw", "--format", "json", *sock(lab, "gw1")).json()
    by_bucket = {b["bucket_id"]: b["backend"] for b in doc["groups"][0]["buckets"]}
    assert by_bucket == {s: b for b in BACKENDS for s in slot_ids(ids[b], weights[b])}
    fields = installed_fields(gw, gid)
    seen = set()
    for sport in range(42000, 42040):
        got = ctl("trace", "lbw", "172.16.0.50", str(sport), "--format", "json",
                  *sock(lab, "gw1")).json()
        slot = predict_bucket(want, 100, fields, FlowTuple.make("172.16.0.50", vip.split(":")[0],
                                                                 "tcp", sport, 80))
        assert got["backend"]["bucket_id"] == slot
        assert got["backend"]["backend"] == by_bucket[slot]
        seen.add(slot >= SLOT_BASE)
    assert seen == {True, False}   # slots beyond the first were picked too
    lab.nbctl("lb-del", "lbw")
    wait_until(lambda: gid not in our_groups(gw), 10, 0.05, "lbw's group removed")
