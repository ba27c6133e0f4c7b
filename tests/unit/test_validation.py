"""Validation of addresses, ports, weights and MACs from outside (gRPC, config
files, CLI): one canonical form per address, nothing that is not one
reachable host, short messages whatever the input's size."""
import ipaddress

import pytest

from l4lb.errors import ValidationError
from l4lb.model import (VipKey, check_backend_family, parse_address, parse_backends, parse_flags, parse_mac,
                        parse_port, parse_protocol, parse_weight)

VIP = VipKey.parse("198.18.10.10", 80, "tcp")
VIP6 = VipKey.parse("fd00:198:18:10::10", 80, "tcp")


@pytest.mark.parametrize("text", ["fd00:198:18:10::30%a", "fd00:198:18:10::30%b", "fe80::1%eth0", "198.18.10.1%1"])
def test_zone_indexes_are_refused_everywhere(text):
    with pytest.raises(ValidationError, match="zone"):
        parse_address(text)
    with pytest.raises(ValidationError, match="zone"):
        VipKey.parse(text, 80, "tcp")
    with pytest.raises(ValidationError, match="zone"):
        parse_backends(VIP6, [{"address": text}], "backends")


def test_an_ipv6_address_object_with_a_zone_is_refused_too():
    with pytest.raises(ValidationError, match="zone"):
        parse_address(ipaddress.IPv6Address("fd00:198:18:10::30%a"))


@pytest.mark.parametrize("text, canonical", [
    ("FD00:198:18:10::30", "fd00:198:18:10::30"),
    ("fd00:0198:0018:0010:0000:0000:0000:0030", "fd00:198:18:10::30"),
    (" 198.18.10.1 ", "198.18.10.1"),
    ("64:ff9b::198.18.2.1", "64:ff9b::c612:201"),
])
def test_unambiguous_spellings_are_stored_in_canonical_form(text, canonical):
    assert VipKey.parse(text, 80, "tcp").address == canonical


@pytest.mark.parametrize("text", ["198.18.010.1", "010.18.10.1", "198.18.10.01"])
def test_ipv4_octets_with_leading_zeros_are_refused_as_ambiguous(text):
    with pytest.raises(ValidationError, match="leading zero"):
        parse_address(text)


@pytest.mark.parametrize("text", ["١٩٨.18.2.1", "fd00::١", "198.18.2.1\x00", "0x1.2.3.4", "1.2.3"])
def test_other_spellings_are_not_addresses(text):
    with pytest.raises(ValidationError, match="not an IP address"):
        parse_address(text)


@pytest.mark.parametrize("text, why", [
    ("255.255.255.255", "broadcast"),
    ("127.0.0.1", "loopback"),
    ("127.1.2.3", "loopback"),
    ("::1", "loopback"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("::ffff:198.18.2.1", "IPv4-mapped"),
    ("::198.18.2.1", "IPv4-compatible"),
])
def test_what_is_not_one_reachable_host_is_neither_vip_nor_backend(text, why):
    with pytest.raises(ValidationError, match=why) as e:
        VipKey.parse(text, 80, "tcp")
    assert "\n" not in str(e.value)
    vip = VIP6 if ":" in text else VIP
    with pytest.raises(ValidationError, match=why):
        parse_backends(vip, [{"address": text}], "backends")
    with pytest.raises(ValidationError, match=why):  # the check the controller runs on every backend
        check_backend_family(vip.ip, ipaddress.ip_address(text), "backend")


@pytest.mark.parametrize("vip", [VIP, VIP6])
def test_a_backend_cannot_be_its_own_vip(vip):
    with pytest.raises(ValidationError, match="the VIP itself"):
        parse_backends(vip, [{"address": vip.address.upper()}], "backends")
    with pytest.raises(ValidationError, match="the VIP itself"):
        check_backend_family(vip.ip, vip.ip, "backend")


@pytest.mark.parametrize("mac, why", [
    ("00:00:00:00:00:00", "no station"),
    ("ff:ff:ff:ff:ff:ff", "broadcast"),
    ("FF:FF:FF:FF:FF:FF", "broadcast"),
    ("01:00:5e:00:00:01", "multicast"),
    ("33:33:00:00:00:01", "multicast"),
])
def test_gateway_mac_must_be_one_station(mac, why):
    with pytest.raises(ValidationError, match=why):
        parse_mac(mac)


def test_a_unicast_mac_is_stored_lower_case():
    assert parse_mac("02:AB:00:00:00:01") == "02:ab:00:00:00:01"


HUGE = "1" * 100_000


@pytest.mark.parametrize("check", [
    lambda: parse_address(HUGE),
    lambda: parse_address(HUGE + "%a"),
    lambda: parse_address("::" + "f" * 100_000),
    lambda: VipKey.parse("198.18.10.10", HUGE, "tcp"),
    lambda: VipKey.parse("198.18.10.10", 80, HUGE),
    lambda: parse_port(10 ** 100_000),
    lambda: parse_weight(10 ** 5000),
    lambda: parse_mac(HUGE),
    lambda: parse_flags([HUGE]),
    lambda: parse_flags(HUGE),
    lambda: parse_protocol(HUGE),
    lambda: parse_backends(VIP, [{"address": "198.18.2.1", HUGE: 1}], "backends"),
    lambda: parse_backends(VIP, [HUGE], "backends"),
])
def test_error_messages_cut_what_they_echo(check):
    with pytest.raises(ValidationError) as e:
        check()
    assert len(str(e.value)) < 300


def test_shown_cuts_at_64_characters_with_an_ellipsis():
    from l4lb.errors import shown  # noqa: PLC0415

    assert shown("a" * 10) == "'aaaaaaaaaa'"
    assert shown("a" * 1000) == "'" + "a" * 63 + "…"


@pytest.mark.parametrize("text", ["٨٠", "８０", "²", "80\u0660", "-1", "+80", "8 0", ""])
def test_ports_are_ascii_digits_only(text):
    with pytest.raises(ValidationError, match="ASCII digits"):
        parse_port(text)


@pytest.mark.parametrize("text, port", [("80", 80), ("0", 0), ("65535", 65535), ("080", 80)])
def test_ascii_ports_are_accepted(text, port):
    assert parse_port(text) == port


def test_a_port_with_many_digits_is_out_of_range_not_a_crash():
    with pytest.raises(ValidationError, match="out of range"):
        parse_port("9" * 10_000)
