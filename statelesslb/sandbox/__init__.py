"""A real multi-chassis OVN in user space (dummy datapath) for tests and demos.

See docs/sandbox.md. The main entry points::

    from statelesslb.sandbox import Sandbox, build_lb_topology
"""

from statelesslb.sandbox.chassis import Chassis
from statelesslb.sandbox.core import CLIENT_MAC, Sandbox
from statelesslb.sandbox.processes import (
    BinaryNotFoundError,
    CommandError,
    DaemonFailedError,
    ProcessRecord,
    RunDirInUseError,
    SandboxError,
    binaries_available,
    wait_until,
)
from statelesslb.sandbox.topology import Topology, Vm, build_lb_topology

__all__ = [
    "CLIENT_MAC",
    "BinaryNotFoundError",
    "Chassis",
    "CommandError",
    "DaemonFailedError",
    "ProcessRecord",
    "RunDirInUseError",
    "Sandbox",
    "SandboxError",
    "Topology",
    "Vm",
    "binaries_available",
    "build_lb_topology",
    "wait_until",
]
