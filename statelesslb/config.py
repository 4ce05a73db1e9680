"""Every option statelesslb reads, in one place (oslo.config).

`list_opts()` feeds oslo-config-generator, which writes
etc/statelesslb/statelesslb.conf.sample.
"""

from __future__ import annotations

from oslo_config import cfg

CONF = cfg.CONF

DEFAULT_OPTS = [
    cfg.BoolOpt("debug", default=False, help="Log at DEBUG level."),
    cfg.StrOpt("log_file", help="Log to this file instead of standard error."),
    cfg.StrOpt(
        "unixctl_path",
        default="/var/run/statelesslb/statelesslb-agent.ctl",
        help="Unix socket where statelesslb-ctl reaches the agent. Created mode 0600.",
    ),
]

OVN_OPTS = [
    cfg.StrOpt(
        "ovn_nb_connection",
        default="unix:/var/run/ovn/ovnnb_db.sock",
        help="OVN Northbound database remote, e.g. ssl:192.0.2.10:6641.",
    ),
    cfg.StrOpt(
        "ovn_sb_connection",
        help="OVN Southbound database remote. Default: external_ids:ovn-remote of the "
        "local Open_vSwitch row, the one ovn-controller uses.",
    ),
    cfg.StrOpt("ovn_nb_private_key", help="SSL private key for the NB connection."),
    cfg.StrOpt("ovn_nb_certificate", help="SSL certificate for the NB connection."),
    cfg.StrOpt("ovn_nb_ca_cert", help="SSL CA certificate for the NB connection."),
    cfg.StrOpt("ovn_sb_private_key", help="SSL private key for the SB connection."),
    cfg.StrOpt("ovn_sb_certificate", help="SSL certificate for the SB connection."),
    cfg.StrOpt("ovn_sb_ca_cert", help="SSL CA certificate for the SB connection."),
    cfg.IntOpt(
        "ovsdb_timeout", default=60, min=1, help="Timeout in seconds for OVSDB transactions."
    ),
    cfg.FloatOpt(
        "ovsdb_max_backoff",
        default=2.0,
        min=1.0,
        help="Longest wait in seconds between two attempts to reconnect to the NB or SB. "
        "With a clustered database (several remotes, comma separated) the agent tries each "
        "member in turn, refuses followers and backs off, doubling from 1 s, while no "
        "leader is elected; python-ovs's own limit (8 s) then delays the recovery after a "
        "leader failure by up to 8 s more than the election.",
    ),
]

OVS_OPTS = [
    cfg.StrOpt(
        "ovsdb_connection",
        default="unix:/var/run/openvswitch/db.sock",
        help="The local Open vSwitch database (where ovn-controller's settings live).",
    ),
    cfg.StrOpt(
        "bridge",
        help="Integration bridge. Default: external_ids:ovn-bridge of the local "
        "Open_vSwitch row, else br-int.",
    ),
    cfg.StrOpt(
        "ofctl_target",
        help="What ovs-ofctl connects to for the bridge, e.g. unix:/var/run/openvswitch/"
        "br-int.mgmt. Default: that path, built from ovs_rundir and the bridge name.",
    ),
    cfg.StrOpt("ovs_rundir", default="/var/run/openvswitch", help="OVS run directory."),
    cfg.StrOpt("ofctl_path", default="ovs-ofctl", help="The ovs-ofctl binary."),
    cfg.StrOpt(
        "appctl_path",
        help="The ovs-appctl binary (statelesslb-ctl trace runs ofproto/trace). "
        "Default: ovs-appctl next to ofctl_path.",
    ),
    cfg.StrOpt(
        "vswitchd_ctl",
        help="ovs-vswitchd's control socket, for traces. Default: "
        "<ovs_rundir>/ovs-vswitchd.<pid>.ctl found through its pid file.",
    ),
    cfg.IntOpt("ofctl_timeout", default=20, min=1, help="Seconds before ovs-ofctl is killed."),
]

STATELESSLB_OPTS = [
    cfg.IntOpt(
        "group_id_base",
        default=0x70000000,
        min=0x100000,
        max=0xE0000000,
        help="Our OpenFlow group ids are this plus each VIP's id. Keep it far above "
        "OVN's own range (1..65535 in 23.03, a compact pool from 1 up in later releases).",
    ),
    cfg.IntOpt(
        "cookie_prefix",
        default=0x51B0,
        min=1,
        max=0xFFFF,
        help="Top 16 bits of every flow cookie we install. Non-zero, so no cookie of ours "
        "can equal one of OVN's (which are below 2**32); deletions use this as a mask.",
    ),
    cfg.IntOpt(
        "gateway_priority",
        default=1000,
        min=101,
        max=65535,
        help="Priority of the gateway's VIP intercept flows (above northd's LB flows).",
    ),
    cfg.IntOpt(
        "backend_priority",
        default=1000,
        min=101,
        max=65534,
        help="Priority of the DNAT / un-DNAT flows on the backend's chassis (the SYN flows "
        "of the ownership record use this priority + 1).",
    ),
    cfg.IntOpt(
        "sentinel_table",
        default=250,
        min=100,
        max=254,
        help="Table of the sentinel flow whose deletion reveals that ovn-controller "
        "wiped the bridge. Must be a table OVN does not use.",
    ),
    cfg.IntOpt(
        "private_table_base",
        default=200,
        min=100,
        max=249,
        help="First of 6 OpenFlow tables of our own (persistence layers, the backend's "
        "ownership record). OVN 23.03 uses "
        "tables up to about 80 and later releases about 100; the agent refuses to start "
        "if they clash with the derived OVN layout.",
    ),
    cfg.IntOpt(
        "gateway_zone",
        default=64000,
        min=1,
        max=65535,
        help="Conntrack zone of the gateway-affinity layer. ovn-controller hands out zones "
        "from 1 upward, one per local port and router: pick one it will not reach.",
    ),
    cfg.IntOpt(
        "backend_zone",
        default=64001,
        min=1,
        max=65535,
        help="Conntrack zone of the ownership record on a backend's chassis: which path "
        "(a stateless VIP, or anything else such as OVN's native LB) opened the connection "
        "a backend's reply belongs to, so that only stateless connections are un-DNATed. "
        "Must differ from gateway_zone; like it, a zone ovn-controller will not reach.",
    ),
    cfg.BoolOpt(
        "nb_writer",
        default=True,
        help="Take part in the election (an OVSDB lock) for the one agent that validates "
        "marked load balancers and writes their bucket ids and status to the NB.",
    ),
    cfg.FloatOpt(
        "ack_timeout",
        default=30.0,
        min=0.0,
        help="With second chance, the NB writer moves the gateways to a changed bucket "
        "set only once every chassis where a backend of the new or the previous set is "
        "bound acknowledged the previous set (SB Chassis_Private "
        "external_ids:statelesslb:installed), or after this many seconds (at most half "
        "the LB's second-chance window). A chassis still missing then is named in "
        "statelesslb:status and in the log: its sessions may break.",
    ),
    cfg.FloatOpt(
        "resync_interval",
        default=60.0,
        min=1.0,
        help="Seconds between full re-reads of installed flows and groups, compared "
        "against the desired state (catches anything changed behind our back).",
    ),
    cfg.FloatOpt(
        "debounce",
        default=0.02,
        min=0.0,
        help="Seconds to gather database changes before recomputing. Not waited for "
             "when all that changed is load balancers that are valid as they are now "
             "(e.g. a backend added or removed) and acknowledgements in the SB: those are "
             "applied at once. Anything else (a topology change, a new load balancer not "
             "attached to its router yet) waits, so that a change made in several "
             "transactions is not reported as an error half-way.",
    ),
]


def register_opts(conf: cfg.ConfigOpts = CONF) -> None:
    conf.register_opts(DEFAULT_OPTS)
    conf.register_opts(OVN_OPTS, group="ovn")
    conf.register_opts(OVS_OPTS, group="ovs")
    conf.register_opts(STATELESSLB_OPTS, group="statelesslb")


def list_opts():
    return [
        (None, DEFAULT_OPTS),
        ("ovn", OVN_OPTS),
        ("ovs", OVS_OPTS),
        ("statelesslb", STATELESSLB_OPTS),
    ]
