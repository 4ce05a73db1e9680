"""Shipped configuration artifacts stay in step with the code: the generated sample
configuration and the systemd unit."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATOR_CONF = ROOT / "etc/statelesslb/config-generator.conf"
SAMPLE = ROOT / "etc/statelesslb/statelesslb.conf.sample"
UNIT = ROOT / "systemd/statelesslb-agent.service"


def test_sample_config_is_current(tmp_path: Path) -> None:
    out = tmp_path / "statelesslb.conf.sample"
    proc = subprocess.run(
        [sys.executable, "-m", "oslo_config.generator", "--config-file", str(GENERATOR_CONF),
         "--output-file", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == SAMPLE.read_text(), (
        "etc/statelesslb/statelesslb.conf.sample is stale: regenerate it with "
        "`tox -e genconfig` or `oslo-config-generator --config-file "
        "etc/statelesslb/config-generator.conf`")


def test_sample_config_documents_every_option() -> None:
    from statelesslb.config import list_opts

    text = SAMPLE.read_text()
    for group, opts in list_opts():
        assert f"[{group or 'DEFAULT'}]" in text
        for opt in opts:
            assert re.search(rf"^#{opt.name} = ", text, re.M), opt.name


@pytest.fixture
def analyze(require) -> str:
    path = shutil.which("systemd-analyze")
    require(path is not None, "systemd-analyze is not installed (Debian package systemd): "
            "cannot verify the unit file here")
    return path


def _unit_for_verify(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's agent: `verify` checks that the
    binary exists, and /usr/local/bin/statelesslb-agent exists only once installed."""
    agent = Path(sys.executable).parent / "statelesslb-agent"
    if not agent.exists():
        pytest.skip(f"{agent} is not installed (pip install -e .)")
    text = UNIT.read_text().replace("/usr/local/bin/statelesslb-agent", str(agent))
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    return unit


def test_systemd_unit_verifies(tmp_path: Path, analyze: str) -> None:
    unit = _unit_for_verify(tmp_path)
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    # Unknown keys and bad values are only warnings: any output is a failure too.
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_systemd_unit_is_hardened(tmp_path: Path, analyze: str) -> None:
    unit = _unit_for_verify(tmp_path)
    proc = subprocess.run([analyze, "security", "--offline=true", str(unit)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout[-500:]
    # 2.0 ("OK") at the time of writing; 10 is an unconfined service.
    assert float(m.group(1)) <= 2.5, proc.stdout


def test_systemd_unit_ties_the_agent_to_ovn_controller() -> None:
    text = UNIT.read_text()
    settings = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    assert "ovn-controller.service" in settings["PartOf"][0]
    assert {"ovn-controller.service", "openvswitch-switch.service"} <= set(
        settings["After"][0].split())
    assert settings["Restart"] == ["on-failure"]
    assert settings["RuntimeDirectory"] == ["statelesslb"]
    assert settings["ProtectSystem"] == ["strict"]
    assert "/run/openvswitch" in settings["ReadWritePaths"][0]
    assert settings["CapabilityBoundingSet"] == [""]
    assert settings["NoNewPrivileges"] == ["yes"]
    # The socket path the unit creates is the CLI's and the agent's default.
    from statelesslb.config import DEFAULT_OPTS

    unixctl = next(o for o in DEFAULT_OPTS if o.name == "unixctl_path")
    assert unixctl.default.startswith("/var/run/statelesslb/")
