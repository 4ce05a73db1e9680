"""The agent's patch ports from br-int to the bridges of physical networks, through which
a backend's chassis sends direct-return replies (options:stateless_return=direct).

One pair per physical network that this chassis both maps to a bridge
(ovn-bridge-mappings) and has a MAC of its own on (ovn-chassis-mac-mappings): setting
the chassis MAC is what allows a chassis to send on a network for a router. The pair is
`slbup-<id>` on br-int and `slbpe-<id>` on the network's bridge (<id>: 8 hex digits of
the network name's CRC), both marked `external_ids:statelesslb-uplink=<network>`; pairs
no longer wanted are removed. ovn-controller leaves ports without its own external_ids
alone, and br-int drops what arrives on them (no table-0 flow matches their port).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import zlib
from collections.abc import Mapping

from statelesslb.nb.model import LocalChassis

LOG = logging.getLogger(__name__)
MARK = "statelesslb-uplink"
INT_PREFIX, EXT_PREFIX = "slbup-", "slbpe-"
MAX_OFPORT = 0xFEFF


class UplinkError(RuntimeError):
    pass


def port_names(network: str) -> tuple[str, str]:
    """(br-int side, bridge side) names: short, fixed per network."""
    tag = f"{zlib.crc32(network.encode()):08x}"
    return INT_PREFIX + tag, EXT_PREFIX + tag


def vsctl_binary(ofctl_path: str) -> str:
    """ovs-vsctl from the same installation as the configured ovs-ofctl."""
    head, _ = os.path.split(ofctl_path)
    return os.path.join(head, "ovs-vsctl") if head else "ovs-vsctl"


class Uplinks:
    def __init__(self, db: str, integration_bridge: str, binary: str = "ovs-vsctl",
                 timeout: float = 20.0):
        self.db = db
        self.bridge = integration_bridge
        self.binary = binary
        self.timeout = timeout

    def vsctl(self, *args: str) -> str:
        argv = [self.binary, f"--db={self.db}", f"--timeout={int(self.timeout)}", *args]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=self.timeout + 5)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UplinkError(f"ovs-vsctl {' '.join(args[:3])}: {exc}") from exc
        if proc.returncode != 0:
            raise UplinkError(f"ovs-vsctl {' '.join(args[:3])} failed: "
                              f"{proc.stderr.strip()[:300]}")
        return proc.stdout

    def sync(self, local: LocalChassis) -> dict[str, int]:
        """Make the pairs match `local`; return network -> br-int OpenFlow port."""
        wanted = {n: b for n, b in local.bridges.items() if n in local.chassis_macs}
        present = self._present()
        for network, name in sorted(present.items()):
            if network not in wanted:
                LOG.info("removing uplink %s (network %s no longer mapped with a chassis "
                         "MAC)", name, network)
                _, peer = port_names(network)
                self.vsctl("--if-exists", "del-port", name, "--", "--if-exists", "del-port",
                           peer)
        ports = {}
        for network, bridge in sorted(wanted.items()):
            inner, outer = port_names(network)
            if network not in present:
                LOG.info("adding uplink %s <-> %s on %s for network %s", inner, outer,
                         bridge, network)
            # Idempotent: --may-exist, and the settings written again.
            self.vsctl(
                "--may-exist", "add-port", self.bridge, inner,
                "--", "set", "Interface", inner, "type=patch", f"options:peer={outer}",
                f"external_ids:{MARK}={network}",
                "--", "--may-exist", "add-port", bridge, outer,
                "--", "set", "Interface", outer, "type=patch", f"options:peer={inner}",
                f"external_ids:{MARK}={network}")
            ofport = _ofport(self.vsctl("get", "Interface", inner, "ofport"))
            if ofport is None:
                LOG.warning("uplink %s has no OpenFlow port yet", inner)
                continue
            ports[network] = ofport
        return ports

    def _present(self) -> Mapping[str, str]:
        """network -> br-int side name, of the pairs that exist."""
        out = self.vsctl("--format=json", "--columns=name,external_ids", "find",
                         "Interface", "type=patch")
        present = {}
        for name, ext in json.loads(out).get("data", []):
            pairs = dict(ext[1]) if isinstance(ext, list) and ext[0] == "map" else {}
            network = pairs.get(MARK)
            if isinstance(name, str) and name.startswith(INT_PREFIX) and network:
                present[network] = name
        return present


def _ofport(text: str) -> int | None:
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if 1 <= value <= MAX_OFPORT else None
