"""Run a statelesslb-agent on every sandbox chassis, against that chassis' OVS."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from statelesslb.sandbox.chassis import Chassis
from statelesslb.sandbox.core import Sandbox
from statelesslb.sandbox.processes import wait_until

AGENT = "statelesslb-agent"

CONFIG_TEMPLATE = """\
[DEFAULT]
debug = {debug}
log_file = {log}
unixctl_path = {ctl}

[ovn]
ovn_nb_connection = {nb}
{ovn_extra}
[ovs]
ovsdb_connection = {ovs_db}
ofctl_target = {br_int}
ovs_rundir = {rundir}

[statelesslb]
resync_interval = {resync}
"""


def agent_argv(config_file: str) -> list[str]:
    # The venv's interpreter runs the agent from this checkout.
    return [sys.executable, "-m", "statelesslb.agent.service", "--config-file", config_file]


def start_agent(sandbox: Sandbox, chassis: Chassis, debug: bool = True,
                resync: float = 30.0, extra_config: str = "",
                ovn: dict[str, str] | None = None) -> dict:
    """Start the agent of `chassis`; `ovn` overrides [ovn] options (e.g. SSL remotes)."""
    rundir = chassis.rundir
    conf_path = rundir / "statelesslb.conf"
    log = rundir / "statelesslb-agent.log"
    ctl = rundir / "slb.ctl"
    ovn = dict(ovn or {})
    nb = ovn.pop("ovn_nb_connection", sandbox.nb)
    ovn_extra = "".join(f"{key} = {value}\n" for key, value in sorted(ovn.items()))
    conf_path.write_text(CONFIG_TEMPLATE.format(
        debug=str(debug).lower(), log=log, ctl=ctl, nb=nb, ovn_extra=ovn_extra,
        ovs_db=chassis.ovs_db, br_int=chassis.br_int, rundir=rundir,
        resync=resync) + extra_config)
    if ctl.exists():
        ctl.unlink()   # left by an agent that was killed: `ready` must see the new one
    env = dict(chassis.env)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + os.environ.get(
        "PYTHONPATH", "")
    rec = sandbox.start_process(
        f"{chassis.name}/{AGENT}", agent_argv(str(conf_path)), env=env,
        pidfile=str(rundir / f"{AGENT}.pid"), log=str(rundir / "statelesslb-agent.stdout"),
        detach=False, ready=lambda: ctl.exists(), timeout=60,
    )
    info = {"pid": rec.pid, "config": str(conf_path), "log": str(log), "ctl": str(ctl)}
    sandbox.agents[chassis.name] = info
    sandbox.save()
    return info


def start_agents(sandbox: Sandbox, **kwargs) -> dict[str, dict]:
    for chassis in sandbox.chassis.values():
        start_agent(sandbox, chassis, **kwargs)
    return sandbox.agents


def stop_agent(sandbox: Sandbox, chassis: Chassis) -> None:
    sandbox.stop_process(f"{chassis.name}/{AGENT}")


def agent_ctl(sandbox: Sandbox, chassis: str, command: str, *args: str) -> str:
    """Ask one agent over its control socket, as ovs-appctl would."""
    ctl = sandbox.agents[chassis]["ctl"]
    return sandbox.run(["ovs-appctl", "-t", ctl, command, *args])


def wait_agents_ready(sandbox: Sandbox, timeout: float = 30.0) -> None:
    import json

    def ready() -> bool:
        for name in sandbox.agents:
            status = json.loads(agent_ctl(sandbox, name, "status"))
            if not status.get("last_full_sync") or status.get("layout") is None:
                return False
        return True

    wait_until(ready, timeout, 0.1, "agents to complete a first sync")
    # Agents starting together load the machine (cold on a fresh one): BFD may flap and
    # a chassisredirect port move and back, and its GARPs teach the external segment
    # the router MAC at the wrong gateway. Settle again so tests start from the same state.
    sandbox.wait_settled(timeout)
