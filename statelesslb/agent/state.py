"""What the agent shows its control socket: an immutable copy, taken when asked.

The control socket runs in a thread of its own; it reads this copy, never the
agent's live objects, so a command can neither see a half-updated agent nor
change one. The snapshot and the plan are immutable already (the agent replaces
them whole); the status is copied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from statelesslb.nb.model import Snapshot
from statelesslb.openflow.ofctl import Ofctl
from statelesslb.plan.specs import Plan, PlanConfig


@dataclass(frozen=True)
class AgentState:
    # AgentStatus as a mapping, with the connections, the NB writer's last error and
    # the wipe monitor's restarts.
    status: Mapping[str, Any]
    snapshot: Snapshot | None       # None until the agent has read NB, SB and bridge
    plan: Plan | None
    plan_config: PlanConfig
    bridge: str | None              # the bridge the agent programs, once it knows it
    ofctl: Ofctl | None             # runs ovs-ofctl against that bridge; None while starting
