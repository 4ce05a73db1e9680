"""One standalone Open vSwitch (no OVN): ovsdb-server + ovs-vswitchd on the dummy datapath.

For checking OpenFlow behaviour against the real switch (the hash predictor's tests
and benchmark): bridge br0 with dummy ports p1 (ofport 1) and any extra ports asked
for, traces over the vswitchd's unixctl socket (no process per trace). Its daemons
are stopped by pid.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import ovs.unixctl.client

from statelesslb.observe.predict import FlowTuple, bucket_hash16
from statelesslb.sandbox.processes import (
    ProcessRecord,
    dir_env,
    find_vswitchd,
    ovs_daemon_argv,
    proc_stat,
    stop_records,
    wait_until,
)

SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
TOOLS = ("ovsdb-tool", "ovsdb-server", "ovs-vsctl", "ovs-ofctl", "ovs-appctl")


def find_tools() -> dict[str, str] | None:
    """Paths of the OVS programs (and the schema), or None if something is missing."""
    tools = {t: shutil.which(t) for t in TOOLS}
    tools["ovs-vswitchd"] = find_vswitchd()
    if not all(tools.values()) or not os.path.exists(SCHEMA):
        return None
    return {**tools, "schema": SCHEMA}  # type: ignore[dict-item]


class Switch:
    """ovsdb-server + ovs-vswitchd --enable-dummy in `rundir`, bridge br0 (dummy dp)."""

    def __init__(self, rundir: Path, tools: dict[str, str],
                 extra_ports: dict[str, int] | None = None):
        self.dir = rundir
        self.tools = tools
        self.extra_ports = dict(extra_ports or {})
        self.env = {**os.environ, **dir_env(rundir)}
        self.procs: list[ProcessRecord] = []
        self.ctl = f"{rundir}/ovs-vswitchd.ctl"
        self.mgmt = f"unix:{rundir}/br0.mgmt"
        self._client: ovs.unixctl.client.UnixctlClient | None = None

    def run(self, *argv: str) -> str:
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60,
                              check=False)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr}")
        return proc.stdout

    def _daemon(self, program: str, *args: str) -> None:
        name = Path(program).name
        self.run(*ovs_daemon_argv(program, self.dir, *args))
        pid = int((self.dir / f"{name}.pid").read_text().split()[0])
        stat = proc_stat(pid)
        self.procs.append(ProcessRecord(name, pid, stat.start_time if stat else None,
                                        [program]))

    def start(self) -> None:
        db = f"{self.dir}/conf.db"
        self.run(self.tools["ovsdb-tool"], "create", db, self.tools["schema"])
        self._daemon(self.tools["ovsdb-server"], db, f"--remote=punix:{self.dir}/db.sock")
        ports = {"p1": 1, **self.extra_ports}
        args = ["init", "--", "add-br", "br0",
                "--", "set", "Bridge", "br0", "datapath_type=dummy"]
        for name, ofport in ports.items():
            args += ["--", "add-port", "br0", name,
                     "--", "set", "Interface", name, "type=dummy", f"ofport_request={ofport}"]
        self.run(self.tools["ovs-vsctl"], f"--db=unix:{self.dir}/db.sock", "--no-wait", *args)
        self._daemon(self.tools["ovs-vswitchd"], f"unix:{self.dir}/db.sock",
                     "--enable-dummy=system", "-vvconn:warn")
        wait_until(lambda: os.path.exists(f"{self.dir}/br0.mgmt"), 10, 0.02, "br0.mgmt")
        wait_until(lambda: all(p in self.ofctl("show") for p in ports), 10, 0.05,
                   "br0 ports")

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        stop_records(self.procs, 5.0)

    def ofctl(self, command: str, *args: str) -> str:
        return self.run(self.tools["ovs-ofctl"], "-O", "OpenFlow15", command, self.mgmt,
                        *args)

    def trace(self, flow: str) -> str:
        """ofproto/trace br0 FLOW over the unixctl socket."""
        if self._client is None:
            err, self._client = ovs.unixctl.client.UnixctlClient.create(self.ctl)
            if err:
                raise RuntimeError(f"unixctl {self.ctl}: {os.strerror(err)}")
        err, error, result = self._client.transact("ofproto/trace", ["br0", flow])
        if err or error is not None:
            raise RuntimeError(f"trace {flow}: {err} {error}")
        return result

    def appctl_trace(self, flow: str) -> str:
        return self.run(self.tools["ovs-appctl"], "-t", self.ctl, "ofproto/trace", "br0", flow)


# -- flows to check the predictor with ---------------------------------------------------


def random_tuples(n: int, seed: int = 1, sports: range = range(65536),
                  dports: range = range(65536)) -> list[FlowTuple]:
    """n TCP/UDP flows, half IPv4 and half IPv6, the same for the same arguments."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            src, dst = IPv6Address(rng.getrandbits(128)), IPv6Address(rng.getrandbits(128))
        else:
            src, dst = IPv4Address(rng.getrandbits(32)), IPv4Address(rng.getrandbits(32))
        out.append(FlowTuple.make(src, dst, rng.choice(("tcp", "udp")),
                                  rng.randrange(sports.start, sports.stop),
                                  rng.randrange(dports.start, dports.stop)))
    return out


def tied_bucket_ids(basis: int) -> tuple[int, int]:
    """The first two bucket ids (from 1 up) whose 16-bit hashes of `basis` are equal."""
    seen: dict[int, int] = {}
    for bid in range(1, 100000):
        h = bucket_hash16(bid, basis)
        if h in seen:
            return seen[h], bid
        seen[h] = bid
    raise AssertionError("no two bucket ids below 100000 hash alike")
