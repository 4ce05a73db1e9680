"""The sandbox's underlay survives a Linux link change (OVS 3.5: ovs-vswitchd then flushes
the local route of the encap IP that tunnels with local_ip need; OVS 3.1 loses nothing)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from statelesslb.sandbox import Sandbox, build_lb_topology, wait_until
from statelesslb.sandbox import packets as P

pytestmark = pytest.mark.sandbox


def _link_change() -> None:
    """Add and remove a veth pair in this network namespace (what the netns mode does)."""
    from pyroute2 import IPRoute

    name = f"slbu{os.getpid() % 100000}"
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="veth", peer={"ifname": f"{name}p"})
        try:
            (idx,) = ipr.link_lookup(ifname=name)
            ipr.link("set", index=idx, state="up")
        finally:
            ipr.link("del", ifname=name)


def test_tunnels_work_after_a_link_change_and_restore(sandbox_run_dir: Path,
                                                      require) -> None:
    require(os.geteuid() == 0, "adding a Linux link needs root")
    sb = Sandbox(sandbox_run_dir, gateways=1, hypervisors=1)
    sb.up()
    topo = build_lb_topology(sb, vms=1)
    (vm,) = topo.vms
    hv = sb.chassis[vm.chassis]
    assert all(c.underlay_intact() for c in sb.chassis.values())

    _link_change()
    sb.restore_underlay()
    assert all(c.underlay_intact() for c in sb.chassis.values())

    # Client -> DGP on gw1 -> lr0 -> sw0 -> Geneve tunnel -> vm1 on hv1.
    sb.client_inject(P.tcp_syn(topo.client_mac, topo.dgp_mac, topo.client_ip, vm.ip,
                               45000, 8080))
    wait_until(lambda: [p for p in hv.sent(vm.name) if P.is_tcp(p, "S", sport=45000)],
               10, 0.05, f"the SYN through the tunnel at {vm.name}")
