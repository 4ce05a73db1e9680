from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statelesslb.nb.model import NbLoadBalancer, NbRouterPort, NbSwitchPort
from statelesslb.nb.parse import canonical_endpoint_key, parse_endpoint, parse_mac
from statelesslb.nb.validate import LbError, ValidLb, validate_lb
from statelesslb.ofstrings import endpoint_text

from .factories import basic_topo


def error_of(topo, name: str = "lb0") -> str:
    result = validate_lb(topo.lb(name), topo.nb())
    assert isinstance(result, LbError), result
    assert result.uuid == f"uuid-lb-{name}"
    return result.message


def valid_of(topo, name: str = "lb0") -> ValidLb:
    result = validate_lb(topo.lb(name), topo.nb())
    assert isinstance(result, ValidLb), result
    return result


def with_vips(vips: dict[str, str], **kwargs):
    topo = basic_topo(with_lb=False)
    topo.add_lb("lb0", vips, **kwargs)
    return topo


# -- the happy path -------------------------------------------------------------


def test_basic_lb_resolves_every_backend():
    valid = valid_of(basic_topo())
    assert (valid.uuid, valid.name, valid.protocol) == ("uuid-lb-lb0", "lb0", "tcp")
    assert (valid.router_uuid, valid.router_name, valid.dgps) == (
        "uuid-lr-lr0", "lr0", ("lr0-public",))
    [vip] = valid.vips
    assert (vip.ip, vip.port, vip.key) == (IPv4Address("172.16.0.100"), 80, "172.16.0.100:80")
    first, second = vip.backends
    assert first.key == "10.0.0.11:8080" and first.ip == IPv4Address("10.0.0.11")
    assert (first.lsp_name, first.mac, first.switch_uuid) == (
        "vm1", "50:54:00:00:00:01", "uuid-ls-ls0")
    assert (first.router_port_name, first.router_port_mac) == ("lr0-ls0", "00:00:00:00:ff:02")
    assert second.lsp_name == "vm2"
    assert valid.backend_keys == ("10.0.0.11:8080", "10.0.0.12:8080")


def test_ipv6_keys_are_canonical():
    valid = valid_of(with_vips({"[FD00:0::100]:80": "[fd00:0:0::11]:8080, [fd00::12]:8080"}))
    [vip] = valid.vips
    assert vip.key == "[fd00::100]:80" and vip.ip == IPv6Address("fd00::100")
    assert [b.key for b in vip.backends] == ["[fd00::11]:8080", "[fd00::12]:8080"]
    assert [b.lsp_name for b in vip.backends] == ["vm1", "vm2"]


@pytest.mark.parametrize("protocol, expected", [(None, "tcp"), ("tcp", "tcp"), ("udp", "udp")])
def test_supported_protocols(protocol, expected):
    topo = with_vips({"172.16.0.100:53": "10.0.0.11:53"}, protocol=protocol)
    assert valid_of(topo).protocol == expected


@pytest.mark.parametrize("protocol", ["sctp", "TCP", "", "tcp ", "icmp"])
def test_unsupported_protocols(protocol):
    message = error_of(with_vips({"172.16.0.100:80": "10.0.0.11:80"}, protocol=protocol))
    assert "is not supported by stateless_mode=mac (only tcp and udp)" in message


def test_whitespace_around_commas_is_tolerated():
    valid = valid_of(with_vips({"172.16.0.100:80": " 10.0.0.12:8080 ,\t10.0.0.11:8080 "}))
    assert [b.key for b in valid.vips[0].backends] == ["10.0.0.11:8080", "10.0.0.12:8080"]


def test_mac_is_normalised_and_keywords_skipped():
    topo = basic_topo(with_lb=False)
    topo.add_vif("ls0", "vm3", "0A:00:00:00:AB:03", "10.0.0.13", "hv1",
                 "unknown", "router", "dynamic", "not-a-mac 10.0.0.14")
    topo.add_lb("lb0", {"172.16.0.100:80": "10.0.0.13:80"})
    assert valid_of(topo).vips[0].backends[0].mac == "0a:00:00:00:ab:03"
    topo.update_lb("lb0", vips={"172.16.0.100:80": "10.0.0.14:80"})
    assert "matches no logical switch port" in error_of(topo)


def test_same_backend_in_two_vips_is_fine():
    valid = valid_of(with_vips({"172.16.0.100:80": "10.0.0.11:8080",
                                "172.16.0.101:80": "10.0.0.11:8080"}))
    assert valid.vip_keys == ("172.16.0.100:80", "172.16.0.101:80")
    assert valid.backend_keys == ("10.0.0.11:8080",)


# -- VIP and backend syntax ---------------------------------------------------------


@pytest.mark.parametrize("vip, expected", [
    ("172.16.0.100", "stateless_mode=mac needs a port on VIP 172.16.0.100"),
    ("[fd00::100]", "stateless_mode=mac needs a port on VIP [fd00::100]"),
    ("fd00::100", "stateless_mode=mac needs a port on VIP fd00::100"),
    ("172.16.0.100:0", "VIP 172.16.0.100:0 has an invalid port (must be 1..65535)"),
    ("172.16.0.100:65536", "has an invalid port (must be 1..65535)"),
    ("172.16.0.100:99999999999999999999", "has an invalid port (must be 1..65535)"),
    ("172.16.0.100:+80", "has an invalid port (must be 1..65535)"),
    ("172.16.0.100: 80", "has an invalid port (must be 1..65535)"),
    ("172.16.0.100:٨٠", "has an invalid port (must be 1..65535)"),
    ("172.16.0.100:", "has an invalid port (must be 1..65535)"),
    ("172.016.0.100:80", "is not IP:port or [IPv6]:port"),
    ("172.16.0.100.5:80", "is not IP:port or [IPv6]:port"),
    ("[fe80::1%eth0]:80", "is not IP:port or [IPv6]:port"),
    ("[172.16.0.100]:80", "is not IP:port or [IPv6]:port"),
    ("fd00::100:80", "needs a port"),     # a valid IPv6 address, not IP:port
    ("１７２.16.0.100:80", "is not IP:port or [IPv6]:port"),
    ("lb.example.com:80", "is not IP:port or [IPv6]:port"),
    ("224.0.0.1:80", "address is multicast"),
    ("0.0.0.0:80", "address is unspecified"),
    ("255.255.255.255:80", "address is reserved/broadcast"),
    ("127.0.0.1:80", "address is loopback"),
    ("[::ffff:172.16.0.100]:80", "address is IPv4-mapped"),
    ("x" * 100_000, "is too long"),
])
def test_bad_vip_keys(vip, expected):
    message = error_of(with_vips({vip: "10.0.0.11:8080"}))
    assert expected in message
    assert len(message) < 300


@pytest.mark.parametrize("backends, expected", [
    ("", "VIP 172.16.0.100:80 has no backends"),
    (" \t ", "VIP 172.16.0.100:80 has no backends"),
    ("10.0.0.11:8080,", "VIP 172.16.0.100:80 has an empty backend entry"),
    ("10.0.0.11:8080,,10.0.0.12:8080", "has an empty backend entry"),
    ("10.0.0.11", "backend 10.0.0.11 of VIP 172.16.0.100:80 has no port"),
    ("10.0.0.11:0",
     "backend 10.0.0.11:0 of VIP 172.16.0.100:80 has an invalid port (must be 1..65535)"),
    ("10.0.0.11:8080;10.0.0.12:8080", "is not IP:port"),
    ("[fd00::11]:8080", "backend [fd00::11]:8080 of VIP 172.16.0.100:80 is IPv6, the VIP is IPv4"),
    ("10.0.0.11:8080, 10.0.0.11:8080",
     "backend 10.0.0.11:8080 is listed twice in VIP 172.16.0.100:80"),
    ("10.0.0.11:8080,10.0.0.11:8081",
     "backends 10.0.0.11:8080 and 10.0.0.11:8081 of VIP 172.16.0.100:80 are behind the same "
     "port vm1"),
])
def test_bad_backends(backends, expected):
    assert expected in error_of(with_vips({"172.16.0.100:80": backends}))


def test_vip_listed_twice_in_different_spellings():
    message = error_of(with_vips({"[fd00::100]:80": "[fd00::11]:80",
                                  "[fd00:0::100]:80": "[fd00::12]:80"}))
    assert "VIP [fd00::100]:80 is listed twice" in message


def test_vip_without_vips_is_valid_and_empty():
    assert valid_of(with_vips({})).vips == ()


def test_unmarked_lb_is_rejected():
    topo = with_vips({"172.16.0.100:80": "10.0.0.11:80"}, marked=False)
    assert "stateless_mode" in error_of(topo)


def test_non_printable_values_are_shown_escaped():
    message = error_of(with_vips({"172.16.0.100:80\nflow add": "10.0.0.11:80"}))
    assert "\n" not in message and "'172.16.0.100:80\\nflow add'" in message


# -- topology ----------------------------------------------------------------------


def test_not_attached_to_a_router():
    topo = with_vips({"172.16.0.100:80": "10.0.0.11:80"}, routers=())
    assert error_of(topo) == "not attached to any logical router"


def test_attached_to_two_routers():
    topo = basic_topo(with_lb=False)
    topo.add_router("lr1", 4, {"lr1-public": "gw2"})
    topo.add_lb("lb0", {"172.16.0.100:80": "10.0.0.11:80"}, routers=("lr0", "lr1"))
    message = error_of(topo)
    assert "attached to 2 logical routers (lr0, lr1)" in message
    assert "exactly one router per load balancer" in message


def test_router_without_gateway_port():
    topo = basic_topo(with_lb=False)
    topo.add_router("lr1", 4, {})
    topo.add_switch("ls1", 5, router="lr1", router_port_mac="00:00:00:00:ee:01")
    topo.add_vif("ls1", "vm5", "50:54:00:00:00:05", "10.1.0.5", "hv1")
    topo.add_lb("lb1", {"172.16.0.100:80": "10.1.0.5:80"}, routers=("lr1",))
    assert error_of(topo, "lb1") == "router lr1 has no distributed gateway port"


def test_backend_matching_no_port():
    message = error_of(with_vips({"172.16.0.100:80": "10.0.0.11:8080,10.0.0.99:8080"}))
    assert message == ("backend 10.0.0.99:8080 of VIP 172.16.0.100:80 matches no logical switch"
                       " port on a switch attached to router lr0")


def test_backend_on_a_switch_not_attached_to_the_router():
    topo = basic_topo(with_lb=False)
    topo.add_switch("ls9", 9, router=None)
    topo.add_vif("ls9", "vm9", "50:54:00:00:00:09", "10.9.0.9", "hv1")
    topo.add_lb("lb0", {"172.16.0.100:80": "10.9.0.9:80"})
    assert "matches no logical switch port on a switch attached to router lr0" in error_of(topo)


@pytest.mark.parametrize("port_type", ["localport", "virtual", "router", "localnet"])
def test_only_vif_ports_are_backends(port_type):
    topo = basic_topo(with_lb=False)
    topo.add_vif("ls0", "odd", "50:54:00:00:00:77", "10.0.0.77", "hv1", port_type=port_type)
    topo.add_lb("lb0", {"172.16.0.100:80": "10.0.0.77:80"})
    assert "matches no logical switch port" in error_of(topo)


def test_ambiguous_backend_lists_the_ports_and_ip_port_mappings_resolves_it():
    topo = basic_topo(with_lb=False)
    topo.add_switch("ls1", 5, router_port_mac="00:00:00:00:ee:01")
    topo.add_vif("ls1", "vm1-twin", "50:54:00:00:01:01", "10.0.0.11", "hv2")
    topo.add_lb("lb0", {"172.16.0.100:80": "10.0.0.11:8080"})
    message = error_of(topo)
    assert "backend 10.0.0.11:8080 of VIP 172.16.0.100:80 is ambiguous" in message
    assert "ports vm1, vm1-twin" in message and "ip_port_mappings" in message

    topo.update_lb("lb0", ip_port_mappings={"10.0.0.11": "vm1-twin:10.0.0.1"})
    backend = valid_of(topo).vips[0].backends[0]
    assert (backend.lsp_name, backend.mac) == ("vm1-twin", "50:54:00:00:01:01")
    assert (backend.router_port_name, backend.router_port_mac) == (
        "lr0-ls1", "00:00:00:00:ee:01")


def test_ip_port_mappings_with_bracketed_ipv6_key():
    topo = with_vips({"[fd00::100]:80": "[fd00::11]:80"},
                     ip_port_mappings={"[fd00:0::11]": "vm2:[fd00::1]"})
    assert valid_of(topo).vips[0].backends[0].lsp_name == "vm2"


def test_ip_port_mappings_uses_the_only_mac_when_the_ip_is_not_announced():
    topo = with_vips({"172.16.0.100:80": "10.0.0.50:80"},
                     ip_port_mappings={"10.0.0.50": "vm2:10.0.0.1"})
    backend = valid_of(topo).vips[0].backends[0]
    assert (backend.lsp_name, backend.mac) == ("vm2", "50:54:00:00:00:02")


@pytest.mark.parametrize("mappings, expected", [
    ({"10.0.0.11": "nosuchport:10.0.0.1"}, "names port nosuchport, which does not exist"),
    ({"10.0.0.11": "ls0-lr0:10.0.0.1"}, "of type router; only VIF ports"),
    ({"10.0.0.11": "vm1"}, "ip_port_mappings entry for 10.0.0.11 is malformed"),
    ({"10.0.0.11": "vm1:10.0.0.1", "[10.0.0.11]": "vm2:10.0.0.1"}, "malformed or repeated"),
])
def test_bad_ip_port_mappings(mappings, expected):
    topo = with_vips({"172.16.0.100:80": "10.0.0.11:80"}, ip_port_mappings=mappings)
    assert expected in error_of(topo)


def test_ip_port_mappings_to_a_port_on_an_unattached_switch():
    topo = basic_topo(with_lb=False)
    topo.add_switch("ls9", 9, router=None)
    topo.add_vif("ls9", "vm9", "50:54:00:00:00:09", "10.0.0.11", "hv1")
    topo.add_lb("lb0", {"172.16.0.100:80": "10.0.0.11:80"},
                ip_port_mappings={"10.0.0.11": "vm9:10.0.0.1"})
    assert "port vm9 is on a switch not attached to router lr0" in error_of(topo)


def test_port_announcing_the_ip_with_two_macs_is_ambiguous():
    topo = basic_topo(with_lb=False)
    topo.add_vif("ls0", "vm3", "50:54:00:00:00:03", "10.0.0.13", "hv1",
                 "50:54:00:00:00:33 10.0.0.13")
    topo.add_lb("lb0", {"172.16.0.100:80": "10.0.0.13:80"})
    assert "port vm3 announces 10.0.0.13 with MACs" in error_of(topo)


@pytest.mark.parametrize("mac", ["", "garbage", "01:00:5e:00:00:01", "00:00:00:00:00:00",
                                 "00:00:00:00:ff:02 ", "00-00-00-00-ff-02"])
def test_router_port_facing_the_backend_needs_a_valid_mac(mac):
    topo = basic_topo()
    port = topo.router_ports["lr0-ls0"]
    topo.router_ports["lr0-ls0"] = dataclasses.replace(port, mac=mac)
    assert ("backend 10.0.0.11:8080 of VIP 172.16.0.100:80: router port lr0-ls0 facing its "
            "switch has no valid unicast MAC") in error_of(topo)


def test_switch_attached_to_the_router_twice():
    topo = basic_topo()
    topo.switch_ports["ls0-lr0-b"] = NbSwitchPort("u1", "ls0-lr0-b", "router", ("router",),
                                                  {"router-port": "lr0-ls0-b"})
    topo.router_ports["lr0-ls0-b"] = NbRouterPort("u2", "lr0-ls0-b", "00:00:00:00:ff:0b", ())
    switch = topo.switches["uuid-ls-ls0"]
    topo.switches["uuid-ls-ls0"] = dataclasses.replace(
        switch, ports=switch.ports + ("ls0-lr0-b",))
    router = topo.routers["uuid-lr-lr0"]
    topo.routers["uuid-lr-lr0"] = dataclasses.replace(
        router, ports=router.ports + ("lr0-ls0-b",))
    assert "is attached to router lr0 through 2 ports (lr0-ls0, lr0-ls0-b)" in error_of(topo)


# -- scalar parsers -------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("50:54:00:00:00:01", "50:54:00:00:00:01"),
    ("0A:BC:DE:F0:12:34", "0a:bc:de:f0:12:34"),
    ("01:00:5e:00:00:01", None),            # multicast
    ("ff:ff:ff:ff:ff:ff", None),
    ("00:00:00:00:00:00", None),
    ("50:54:00:00:00:1", None),
    ("50:54:00:00:00:01\n", None),
    ("５0:54:00:00:00:01", None),
    (None, None),
])
def test_parse_mac(text, expected):
    assert parse_mac(text) == expected


@given(st.text(max_size=80))
def test_parse_endpoint_accepts_only_canonicalisable_text(text):
    parsed = parse_endpoint(text)
    if isinstance(parsed, str):
        return
    ip, port = parsed
    key = endpoint_text(ip, port)
    assert canonical_endpoint_key(key) == key
    assert text.isascii() and " " not in text and "\n" not in text


@given(st.ip_addresses(), st.integers(1, 65535))
def test_canonical_keys_round_trip(ip, port):
    key = endpoint_text(ip, port)
    parsed = parse_endpoint(key)
    if isinstance(parsed, str):      # loopback, multicast, ... are refused
        assert parsed.startswith("address ")
    else:
        assert parsed == (ip, port)


# -- fuzzing: never raise, never the catch-all ---------------------------------------

garbage = st.one_of(
    st.none(), st.integers(), st.booleans(), st.binary(max_size=10), st.text(max_size=30),
    st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.integers(), st.none()),
)
text_maps = st.dictionaries(st.text(max_size=40), st.text(max_size=80), max_size=4)
endpointish = st.sampled_from(["10.0.0.11:8080", "10.0.0.12:8080", "[fd00::11]:80",
                               "172.16.0.100:80", "10.0.0.99:1", " ", ",", "[", "]", ":"])
vip_maps = st.dictionaries(
    st.one_of(st.text(max_size=30), endpointish),
    st.lists(st.one_of(endpointish, st.text(max_size=15)), max_size=4).map(",".join),
    max_size=4,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(vips=st.one_of(text_maps, vip_maps),
       protocol=st.one_of(st.none(), st.sampled_from(["tcp", "udp"]), st.text(max_size=5)),
       mappings=text_maps)
def test_text_inputs_never_reach_the_catch_all(vips, protocol, mappings):
    topo = with_vips(vips, protocol=protocol, ip_port_mappings=mappings)
    result = validate_lb(topo.lb("lb0"), topo.nb())
    if isinstance(result, LbError):
        assert not result.message.startswith("cannot validate")
        assert "\n" not in result.message
    else:
        for vip in result.vips:
            assert canonical_endpoint_key(vip.key) == vip.key
            assert all(canonical_endpoint_key(b.key) == b.key for b in vip.backends)


@settings(max_examples=200)
@given(uuid=garbage, name=garbage, protocol=garbage, vips=garbage, options=garbage,
       ext=garbage, mappings=garbage)
def test_wrongly_typed_fields_give_an_error_not_an_exception(
        uuid, name, protocol, vips, options, ext, mappings):
    topo = basic_topo()
    lb = NbLoadBalancer(uuid, name, protocol, vips, options, ext, mappings)
    result = validate_lb(lb, topo.nb())
    # `options` is never {"stateless_mode": "mac"} here, so always an error.
    assert isinstance(result, LbError)


@settings(max_examples=200)
@given(protocol=garbage, vips=garbage, ext=garbage, mappings=garbage)
def test_wrongly_typed_fields_of_a_marked_lb(protocol, vips, ext, mappings):
    topo = basic_topo()
    lb = NbLoadBalancer("uuid-lb-lb0", "lb0", protocol, vips, {"stateless_mode": "mac"}, ext,
                        mappings)
    result = validate_lb(lb, topo.nb())
    assert isinstance(result, LbError | ValidLb)
    if isinstance(result, LbError):
        assert not result.message.startswith("cannot validate")
