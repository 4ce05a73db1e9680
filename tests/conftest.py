"""Shared fixtures: a real OVN sandbox per test module.

A module can size its sandbox and topology with module-level dicts::

    SANDBOX_KWARGS = {"gateways": 3, "hypervisors": 2}
    TOPOLOGY_KWARGS = {"vms": 4}
    REAL_VMS = 3      # the netns mode: `real` gives (topology, NetnsLab) with 3 VMs

Set STATELESSLB_KEEP_SANDBOX=1 to keep run directories (logs, pcaps, databases) after
the tests; the processes are stopped either way.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from statelesslb.sandbox import Sandbox, Topology, binaries_available, build_lb_topology

LOG = logging.getLogger(__name__)


def require_or_skip(ok: bool, why: str) -> None:
    """Skip unless ok, except in CI (CI=true) where what cannot run is a failure."""
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and this cannot run: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="session")
def require() -> Callable[[bool, str], None]:
    """require_or_skip, for test modules (which do not import conftest)."""
    return require_or_skip


def require_sandbox_binaries() -> None:
    ok, why = binaries_available()
    require_or_skip(ok, f"sandbox tests need OVS/OVN: {why}")


def new_run_dir() -> Path:
    # Short on purpose: unix socket paths inside must stay under 108 bytes.
    return Path(tempfile.mkdtemp(prefix="slb-", dir="/tmp"))


def remove_run_dir(run_dir: Path) -> None:
    if os.environ.get("STATELESSLB_KEEP_SANDBOX"):
        LOG.warning("keeping sandbox run dir %s", run_dir)
        return
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """A running sandbox (2 gateways, 2 hypervisors unless SANDBOX_KWARGS says else)."""
    require_sandbox_binaries()
    kwargs = {"gateways": 2, "hypervisors": 2, **getattr(request.module, "SANDBOX_KWARGS", {})}
    run_dir = new_run_dir()
    sbx = Sandbox(run_dir, **kwargs)
    try:
        sbx.up()
        LOG.info("sandbox %s up in %.2fs", run_dir, sbx.timings["registered"])
        yield sbx
    finally:
        sbx.down()
        remove_run_dir(run_dir)


@pytest.fixture
def sandbox_run_dir() -> Iterator[Path]:
    """An empty short run dir for a test's own Sandbox (skips without OVS/OVN).

    Whatever the test left running there is stopped afterwards.
    """
    require_sandbox_binaries()
    run_dir = new_run_dir()
    try:
        yield run_dir
    finally:
        Sandbox.stop_dir(run_dir)
        remove_run_dir(run_dir)


@pytest.fixture(scope="module")
def topo(sandbox: Sandbox, request: pytest.FixtureRequest) -> Topology:
    """The standard LB topology (lr0, public, sw0, vm1.. on the hypervisors)."""
    return build_lb_topology(sandbox, **getattr(request.module, "TOPOLOGY_KWARGS", {}))


@pytest.fixture(scope="module", autouse=True)
def _netns_required(request: pytest.FixtureRequest) -> None:
    """Before a netns-mode module's sandbox starts: root, namespaces, veths and curl."""
    if not hasattr(request.module, "REAL_VMS"):
        return
    from statelesslb.sandbox import netns

    ok, why = netns.netns_available()
    require_or_skip(ok, f"netns mode unavailable: {why}")
    require_or_skip(shutil.which("curl") is not None,
                    "curl not installed (scripts/setup installs it)")


@pytest.fixture(scope="module")
def real(sandbox: Sandbox, request: pytest.FixtureRequest):
    """The netns mode's topology and lab (REAL_VMS VM namespaces), agents on every chassis,
    an HTTP and an echo server in every VM. The sandbox fixture's down() also removes
    the run's namespaces and veths, whatever failed."""
    from statelesslb.sandbox import agents, netns

    topo, lab = netns.build_real_topology(sandbox, vms=request.module.REAL_VMS)
    agents.start_agents(sandbox, debug=False)
    agents.wait_agents_ready(sandbox)
    lab.start_http_servers()
    lab.start_echo_servers()
    return topo, lab


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Anything that uses a sandbox runs real daemons: mark it so `-m "not sandbox"` works.
    for item in items:
        if {"sandbox", "sandbox_run_dir"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.sandbox)
