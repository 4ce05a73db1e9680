"""The Prometheus exposition: its format, label escaping and the conntrack reading."""

from __future__ import annotations

import pytest

from statelesslb.observe.metrics import (
    AGENT_HEALTHY,
    BUCKET_PACKETS,
    Metric,
    conntrack_counts,
    render,
)

# dpctl/dump-conntrack lines as OVS 3.1 prints them (userspace datapath).
DUMP = """\
tcp,orig=(src=172.16.0.50,dst=172.16.0.100,sport=40000,dport=80),reply=(src=10.0.0.12,dst=172.16.0.50,sport=8080,dport=40000),zone=5,protoinfo=(state=SYN_SENT)
tcp,orig=(src=172.16.0.51,dst=172.16.0.100,sport=40001,dport=80),reply=(src=10.0.0.12,dst=172.16.0.51,sport=8080,dport=40001),zone=5,protoinfo=(state=ESTABLISHED)
tcp,orig=(src=172.16.0.50,dst=10.0.0.13,sport=40002,dport=8080),reply=(src=10.0.0.13,dst=172.16.0.50,sport=8080,dport=40002),zone=6,protoinfo=(state=ESTABLISHED)
udp,orig=(src=fd00::50,dst=fd00::100,sport=5000,dport=53),reply=(src=fd00::12,dst=fd00::50,sport=5353,dport=5000),zone=5
"""


def test_conntrack_counts_only_dnated_entries():
    assert conntrack_counts(DUMP) == {
        ("172.16.0.100", 80, "10.0.0.12", 8080): 2,
        ("fd00::100", 53, "fd00::12", 5353): 1,
    }
    assert conntrack_counts("") == {}


def test_render_groups_samples_under_one_help_and_type():
    text = render([
        (BUCKET_PACKETS, {"chassis": "gw1", "bucket_id": 1}, 10),
        (AGENT_HEALTHY, {"chassis": "gw1"}, 1),
        (BUCKET_PACKETS, {"chassis": "gw1", "bucket_id": 2}, 0),
        (BUCKET_PACKETS, {"chassis": "gw1", "bucket_id": 3}, None),  # OVS said nothing
    ])
    assert text.splitlines() == [
        f"# HELP statelesslb_bucket_packets_total {BUCKET_PACKETS.help}",
        "# TYPE statelesslb_bucket_packets_total counter",
        'statelesslb_bucket_packets_total{chassis="gw1",bucket_id="1"} 10',
        'statelesslb_bucket_packets_total{chassis="gw1",bucket_id="2"} 0',
        f"# HELP statelesslb_agent_healthy {AGENT_HEALTHY.help}",
        "# TYPE statelesslb_agent_healthy gauge",
        'statelesslb_agent_healthy{chassis="gw1"} 1',
    ]


def test_label_values_from_the_nb_cannot_break_the_format():
    # An LB name is whatever an NB client wrote: quotes, backslashes, newlines.
    text = render([(BUCKET_PACKETS, {"lb": 'a"b\\c\nd} 1\nfake_metric{x="y'}, 5)])
    sample = text.splitlines()[2]
    assert sample == ('statelesslb_bucket_packets_total{lb="a\\"b\\\\c\\nd} 1\\nfake_metric'
                      '{x=\\"y"} 5')
    assert len(text.splitlines()) == 3


def test_a_bad_metric_name_is_refused():
    with pytest.raises(ValueError):
        render([(Metric("bad name", "gauge", "x"), {}, 1)])
