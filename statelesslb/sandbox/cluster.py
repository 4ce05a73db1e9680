"""NB and SB as 3-member RAFT clusters, as production OVN runs them (`Sandbox(clustered=True)`).

Each member is an ovsdb-server of its own on a database file of its own, in the
database's directory (`nb/`, `sb/`)::

    nb/nb1.db  nb/nb1.sock  nb/ovsdb-server-1.{pid,log,ctl}     (and 2, 3; sb/ the same)

The first member's file comes from `ovsdb-tool create-cluster`, the others' from
`ovsdb-tool join-cluster`; members talk RAFT over TCP on 127.0.0.1 (RAFT accepts only
tcp: or ssl:) on ports picked free at start, and serve clients on their unix socket.
Clients (ovn-northd, every ovn-controller, the agents, ovn-nbctl) get every member as one
comma-separated remote list and, leader-only, settle on the leader.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from statelesslb.sandbox.processes import CommandError, SandboxError, dir_env, wait_until

if TYPE_CHECKING:
    from statelesslb.sandbox.core import Sandbox

MEMBERS = 3
SCHEMA_NAMES = {"nb": "OVN_Northbound", "sb": "OVN_Southbound"}


@dataclass
class Member:
    """One ovsdb-server of a cluster."""

    db: str          # "nb" or "sb"
    index: int       # 1..3
    directory: str   # the database's directory (<run>/nb)
    raft: str        # tcp:127.0.0.1:PORT, where the other members reach it

    @property
    def stem(self) -> str:
        return f"ovsdb-server-{self.index}"

    @property
    def name(self) -> str:
        """Its process name in the sandbox ("nb/ovsdb-server-1")."""
        return f"{self.db}/{self.stem}"

    @property
    def db_file(self) -> str:
        return f"{self.directory}/{self.db}{self.index}.db"

    @property
    def sock(self) -> str:
        return f"{self.directory}/{self.db}{self.index}.sock"

    @property
    def remote(self) -> str:
        return f"unix:{self.sock}"

    @property
    def ctl(self) -> str:
        return f"{self.directory}/{self.stem}.ctl"

    def manifest(self) -> dict[str, Any]:
        return {"index": self.index, "raft": self.raft, "remote": self.remote,
                "ctl": self.ctl, "db_file": self.db_file}


@dataclass
class ClusterStatus:
    """What `ovs-appctl -t <member ctl> cluster/status <db>` says, the parts we use."""

    server_id: str
    role: str            # leader, follower, candidate
    term: int
    leader: str | None   # server id (short), "self", or None ("unknown")
    member: bool         # "Status: cluster member"
    servers: int         # members it knows


def parse_cluster_status(text: str) -> ClusterStatus:
    def field(name: str) -> str:
        m = re.search(rf"^{name}: (.*)$", text, re.MULTILINE)
        if m is None:
            raise ValueError(f"no {name!r} in cluster/status output: {text!r}")
        return m.group(1).strip()

    leader = field("Leader")
    servers = text.split("Servers:", 1)[1] if "Servers:" in text else ""
    return ClusterStatus(
        server_id=field("Server ID").split()[0],
        role=field("Role"),
        term=int(field("Term")),
        leader=None if leader == "unknown" else leader,
        member=field("Status") == "cluster member",
        servers=sum(1 for line in servers.splitlines() if line.strip()),
    )


class Cluster:
    """The 3 members of one database (NB or SB) of a sandbox."""

    def __init__(self, sandbox: Sandbox, db: str, ports: list[int] | None = None):
        self.sandbox = sandbox
        self.db = db
        self.schema_name = SCHEMA_NAMES[db]
        directory = str(sandbox.run_dir / db)
        ports = ports or [0] * MEMBERS
        self.members = [Member(db, i + 1, directory, f"tcp:127.0.0.1:{port}")
                        for i, port in enumerate(ports)]

    @property
    def remote(self) -> str:
        """Every member, comma separated: what clients connect to."""
        return ",".join(m.remote for m in self.members)

    @property
    def ports(self) -> list[int]:
        return [int(m.raft.rsplit(":", 1)[1]) for m in self.members]

    def manifest(self) -> dict[str, Any]:
        return {"schema": self.schema_name, "remote": self.remote,
                "members": [m.manifest() for m in self.members]}

    def member(self, index: int) -> Member:
        return self.members[index - 1]

    def socket_paths(self) -> list[str]:
        return [p for m in self.members for p in (m.sock, m.ctl)]

    # -- start ---------------------------------------------------------------------
    def create(self, schema: str) -> None:
        """Create the 3 database files and start the 3 servers (no leader wait)."""
        sbx = self.sandbox
        directory = Path(self.members[0].directory)
        directory.mkdir(parents=True, exist_ok=True)
        env = dir_env(directory)
        ports = free_tcp_ports(MEMBERS)
        for member, port in zip(self.members, ports, strict=True):
            member.raft = f"tcp:127.0.0.1:{port}"
        first = self.members[0]
        tool = sbx.bin["ovsdb-tool"]
        sbx.run([tool, "create-cluster", first.db_file, schema, first.raft], env=env)
        for member in self.members[1:]:
            sbx.run([tool, "join-cluster", member.db_file, self.schema_name, member.raft,
                     first.raft], env=env)
        for member in self.members:
            self.start_member(member)

    def start_member(self, member: Member) -> None:
        self.sandbox.start_daemon(member.name, self.sandbox.bin["ovsdb-server"],
                                  Path(member.directory), member.db_file,
                                  f"--remote=punix:{member.sock}")

    # -- inspect -------------------------------------------------------------------
    def status(self, member: Member) -> ClusterStatus:
        out = self.sandbox.run([self.sandbox.bin["ovs-appctl"], "-t", member.ctl,
                                "cluster/status", self.schema_name], timeout=5)
        return parse_cluster_status(out)

    def running(self) -> list[Member]:
        return [m for m in self.members if self.sandbox.is_running(m.name)]

    def leader(self) -> Member | None:
        """The member that says it leads, if a running one does."""
        for member in self.running():
            with contextlib.suppress(CommandError, ValueError):
                if self.status(member).role == "leader":
                    return member
        return None

    def healthy(self, members: int = MEMBERS) -> bool:
        """A leader, and `members` running members that know each other."""
        running = self.running()
        if len(running) < members or self.leader() is None:
            return False
        try:
            states = [self.status(m) for m in running]
        except (CommandError, ValueError):
            return False
        return all(s.member and s.servers == MEMBERS and s.leader is not None for s in states)

    def wait_leader(self, timeout: float = 30.0) -> Member:
        return wait_until(self.leader, timeout, 0.05, f"a leader of the {self.db} cluster",
                          ignore=(CommandError,))

    def wait_healthy(self, timeout: float = 30.0, members: int = MEMBERS) -> None:
        wait_until(lambda: self.healthy(members), timeout, 0.05,
                   f"{members} members of the {self.db} cluster and a leader")

    # -- faults --------------------------------------------------------------------
    def kill(self, member: Member, sig: int = signal.SIGKILL) -> int:
        """Signal the member's recorded pid (SIGKILL: no goodbye); returns the pid."""
        rec = self.sandbox.processes[member.name]
        if not rec.alive():
            raise SandboxError(f"{member.name} does not run")
        rec.signal(sig)
        wait_until(lambda: not rec.alive(), 5.0, 0.01, f"{member.name} to die")
        return rec.pid

    def restart(self, member: Member, timeout: float = 30.0) -> None:
        """Start a stopped member again on its database file; returns once it is back
        in the cluster (it knows the leader)."""
        self.start_member(member)

        def rejoined() -> bool:
            st = self.status(member)
            return st.member and st.leader is not None
        wait_until(rejoined, timeout, 0.05, f"{member.name} back in the cluster",
                   ignore=(CommandError, ValueError))


def free_tcp_ports(count: int) -> list[int]:
    """Ports on 127.0.0.1 free right now (the kernel's picks, held together, released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
