"""Fixtures of the sandbox tests that need real OVSDB servers but no whole sandbox."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from statelesslb.sandbox.processes import wait_until

SCHEMA = "/usr/share/ovn/ovn-nb.ovsschema"


@pytest.fixture
def nb_server(require):
    tools = {t: shutil.which(t) for t in ("ovsdb-tool", "ovsdb-server", "ovn-nbctl")}
    require(all(tools.values()) and os.path.exists(SCHEMA),
            "needs ovsdb-server, ovsdb-tool (openvswitch-switch) and ovn-nbctl (ovn-central)")
    run = Path(tempfile.mkdtemp(prefix="slb-nbw-", dir="/tmp"))
    server = None
    try:
        subprocess.run([tools["ovsdb-tool"], "create", f"{run}/nb.db", SCHEMA], check=True)
        server = subprocess.Popen(
            [tools["ovsdb-server"], f"{run}/nb.db", f"--remote=punix:{run}/nb.sock",
             f"--unixctl={run}/nb.ctl", "--no-chdir", "-vconsole:off"])
        wait_until(lambda: os.path.exists(f"{run}/nb.sock"), 10, 0.02, "ovsdb-server")
        yield f"unix:{run}/nb.sock", tools["ovn-nbctl"]
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(run, ignore_errors=True)
