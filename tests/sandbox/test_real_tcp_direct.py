"""Direct return with real TCP stacks: the client and the VMs are Linux namespaces (the
netns mode, docs/real-tcp.md) and the hypervisors are on the external segment, so a
stateless VIP's replies leave the backend's chassis while the client's packets still come
through the gateway. TCP does not mind the two paths: curl and long-lived echo sessions
work, through a backend change under second chance too, and the gateway forwards none of
the replies (its counters say so; the hypervisors' uplink ports carry them).
"""

from __future__ import annotations

import time

from statelesslb.sandbox.core import Sandbox
from statelesslb.sandbox.topology import Topology
from statelesslb.sandbox.traffic import set_backends, wait_lb_ready

SANDBOX_KWARGS = {"gateways": 2, "hypervisors": 2, "enable_dummy": "",
                  "external_hypervisors": True}
IPS = ["10.0.0.11", "10.0.0.12", "10.0.0.13"]
REAL_VMS = len(IPS)


def _direct_lb(sb: Sandbox, topo: Topology, name: str, vip: str, backends: list[str],
               persistence: str = "second-chance") -> None:
    sb.nbctl("lb-add", name, vip, ",".join(backends), "tcp",
             "--", "set", "load_balancer", name, "options:stateless_mode=mac",
             f"options:stateless_persistence={persistence}", "options:stateless_return=direct")
    sb.nbctl("lr-lb-add", topo.router, name)
    wait_lb_ready(sb, name, vip, len(backends), topo=topo)


def _hypervisors_sent(sb: Sandbox) -> int:
    return sum(hv.sent_to_external() for hv in sb.hypervisor_chassis)


def test_curl_and_echo_sessions_through_direct_return(sandbox, real):
    topo, lab = real
    vip = "172.16.0.130"
    _direct_lb(sandbox, topo, "direct", f"{vip}:80", [f"{ip}:8080" for ip in IPS[:2]])
    _direct_lb(sandbox, topo, "direct-echo", f"{vip}:7", [f"{ip}:7007" for ip in IPS[:2]])
    gw1 = sandbox.chassis["gw1"]
    hv0, gw0 = _hypervisors_sent(sandbox), gw1.sent_to_external()
    served = set()
    for sport in range(45500, 45516):
        rc, body = lab.curl(f"http://{vip}/who", local_port=sport)
        assert rc == 0, f"curl from port {sport} failed with exit code {rc}"
        served.add(body.strip())
    assert served == {"vm1", "vm2"}
    hv1, gw_1 = _hypervisors_sent(sandbox), gw1.sent_to_external()
    # 16 connections: their replies (SYN-ACK, response, FIN, ACKs) left the hypervisors...
    assert hv1 - hv0 >= 16 * 3, (hv0, hv1)
    # ...and the gateway sent none of them to the client (a GARP at most).
    assert gw_1 - gw0 < 16, (gw0, gw_1)

    # Long-lived sessions across a backend change (second chance), replies direct.
    run = lab.echo_client("de", vip, 7, range(46500, 46516), duration=60, timeout=4.0)
    before = run.wait_established()
    assert all(not c["error"] for c in before.values()), before
    set_backends(sandbox, topo, "direct-echo", f"{vip}:7", [f"{ip}:7007" for ip in IPS])
    time.sleep(2.5)
    after = run.finish()
    failed = {s: c["error"] for s, c in after.items() if c["error"]}
    assert failed == {}
    assert all(after[s]["ok"] > before[s]["ok"] for s in after), "a session stalled"
