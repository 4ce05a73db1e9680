"""The sandbox's independent group reading agrees with the agent's parser, or says so."""

from __future__ import annotations

import dataclasses

import pytest

from statelesslb.openflow.ofctl import parse_groups
from statelesslb.sandbox.ovsread import cross_check, read_groups

GID = 1879048193
# As OVS 3.1 prints a gateway bucket and two previous-set buckets (listed 1, 3, 2).
DUMP = (
    "OFPST_GROUP_DESC reply (OF1.5) (xid=0x2):\n"
    f" group_id={GID},type=select,selection_method=hash,fields(ip_src,ip_dst,ipv6_src,"
    "ipv6_dst,nw_proto,tcp_src,tcp_dst,udp_src,udp_dst),bucket=bucket_id:1,weight:100,"
    "actions=set_field:00:00:00:00:ff:02->eth_src,set_field:50:54:00:00:00:01->eth_dst,"
    "dec_ttl,set_field:0x2->reg15,resubmit(,37),bucket=bucket_id:3,weight:100,"
    "actions=set_field:50:54:00:00:00:03->eth_dst,set_field:0x2->metadata,"
    "set_field:0->reg14,set_field:0x4->reg15,resubmit(,203),bucket=bucket_id:2,"
    "weight:100,actions=ct(commit,table=43,zone=NXM_NX_REG13[0..15],"
    "nat(dst=10.0.0.11:8080))\n"
    f" group_id={GID + 1},type=select,selection_method=hash,fields(ip_src)\n"
)


def test_both_readings_agree_on_a_real_dump():
    ours, theirs = parse_groups(DUMP, 0, 2**32), read_groups(DUMP)
    assert ours.keys() == theirs.keys() == {GID, GID + 1}
    assert [b.bucket_id for b in theirs[GID].buckets] == [1, 3, 2]
    assert theirs[GID + 1].buckets == ()
    for gid in ours:
        cross_check(ours[gid], theirs[gid])


@pytest.mark.parametrize("damage", [
    lambda b: dict(reversed(b.items())),                          # order lost
    lambda b: {k: v for k, v in b.items() if k != 2},             # a bucket lost
    lambda b: {**b, 3: b[3].replace("0x4->reg15", "0x5->reg15")},  # an action misread
    lambda b: {**b, 1: b[1].replace("weight:100", "weight:10")},   # a weight misread
])
def test_a_misreading_parser_is_caught(damage):
    ours = parse_groups(DUMP, 0, 2**32)[GID]
    broken = dataclasses.replace(ours, buckets=damage(dict(ours.buckets)))
    with pytest.raises(AssertionError):
        cross_check(broken, read_groups(DUMP)[GID])
