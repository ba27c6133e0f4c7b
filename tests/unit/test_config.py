"""The YAML configuration: what is accepted, and the one-line error for what is not."""
import ipaddress

import pytest

from l4lb.config import load_config, parse_config
from l4lb.errors import ConfigError

GOOD = """
gateway_mac: "02:00:00:00:00:01"
encap_source: {ipv4: 198.18.20.0/24, ipv6: "fd00:198:18:20::/64"}
mtu: 1500
vips:
  - address: 198.18.10.10
    port: 80
    protocol: tcp
    flags: [no_source_port]
    backends:
      - {address: 198.18.2.1, weight: 1}
      - {address: "fd00:198:18:2::1", weight: 2}
  - address: "fd00:198:18:10::10"
    protocol: udp
    backends: [{address: "fd00:198:18:2:0::2"}]
"""


def test_documented_example_is_accepted_with_every_value(tmp_path):
    f = tmp_path / "lb.yaml"
    f.write_text(GOOD)
    cfg = load_config(f)
    assert cfg.runtime.gateway_mac == "02:00:00:00:00:01"
    assert cfg.runtime.encap_v4 == ipaddress.ip_network("198.18.20.0/24")
    assert cfg.runtime.mtu == 1500
    v4, v6 = cfg.vips
    assert str(v4.key) == "198.18.10.10:80/tcp" and v4.flags == {"no_source_port"}
    assert v4.backends == {"198.18.2.1": 1, "fd00:198:18:2::1": 2}
    assert v6.key.port == 0 and v6.backends == {"fd00:198:18:2::2": 1}  # canonical, default weight 1


@pytest.mark.parametrize("doc, where", [
    ("[1, 2]", "top level"),
    ("colour: blue", "unknown key(s) colour"),
    ("gateway_mac: 02:00", "gateway_mac"),
    ("gateway_mac: '01:00:5e:00:00:01'", "multicast"),
    ("mtu: 100", "mtu: 100 is out of range"),
    ("next_hop: router", "next_hop: 'router' is not a next-hop mode"),
    ("next_hop: [fib]", "next_hop"),
    ("mtu: '1500'", "mtu"),
    ("encap_source: {ipv4: 'fd00::/64'}", "encap_source.ipv4"),
    ("vips: {}", "vips: expected a list"),
    ("vips: [{address: 198.18.10.1, protocol: sctp}]", "vips[0].protocol"),
    ("vips: [{address: 198.18.10.1, protocol: tcp, port: 70000}]", "vips[0].port"),
    ("vips: [{address: 198.18.10.300, protocol: tcp}]", "vips[0].address"),
    ("vips: [{protocol: tcp}]", "vips[0]: missing address"),
    ("vips: [{address: 198.18.10.1, protocol: tcp, flags: [fast]}]", "unknown flag 'fast'"),
    ("vips: [{address: 198.18.10.1, protocol: tcp}, {address: 198.18.10.1, protocol: tcp}]", "listed twice"),
    ("vips: [{address: 'fd00:198:18:10::1', protocol: tcp, backends: [{address: 198.18.2.1}]}]", "is IPv4 but VIP"),
    ("vips: [{address: 198.18.10.1, protocol: tcp, backends: [{address: 198.18.2.1, weight: -1}]}]", "weight"),
    ("vips: [{address: 198.18.10.1, protocol: tcp, backends: [{address: 198.18.2.1, weight: true}]}]", "weight"),
    ("vips: [{address: 198.18.10.1, protocol: tcp, backends: [{address: 198.18.2.1}, {address: 198.18.2.1}]}]", "listed twice"),
    ("vips: [{address: 198.18.10.1, protocol: tcp, backends: [{address: 198.18.2.1, wieght: 2}]}]", "unknown key(s) wieght"),
    ("vips: [{address: 198.18.10.1, protocol: tcp, encap: vxlan}]", "vips[0].encap: 'vxlan' is not an encapsulation"),
    ("vips: [{address: 198.18.10.1, protocol: tcp, encap: 4}]", "vips[0].encap: 4"),
    ("vips: [{address: 198.18.10.1, protocol: tcp, encap: [gue]}]", "vips[0].encap"),
    ("gue_port: 0", "gue_port: 0 is out of range (1-65535"),
    ("gue_port: 65536", "gue_port: 65536 is out of range"),
    ("gue_port: -1", "gue_port: -1"),
    ("gue_port: true", "gue_port: True is not a port number"),
    ("gue_port: 6080.5", "gue_port: 6080.5"),
    ("gue_port: 'http'", "gue_port: 'http' is not a whole number"),
])
def test_bad_configuration_names_the_place_and_the_value(tmp_path, doc, where):
    f = tmp_path / "lb.yaml"
    f.write_text(doc)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert msg.startswith(str(f)) and where in msg and "\n" not in msg


def test_next_hop_is_gateway_unless_the_file_says_fib():
    assert parse_config({}).runtime.next_hop == "gateway" and not parse_config({}).next_hop_set
    cfg = parse_config({"next_hop": "fib"})
    assert cfg.runtime.next_hop == "fib" and cfg.next_hop_set


def test_encap_and_gue_port_are_read_and_default_to_ipip_and_6080():
    cfg = parse_config({"gue_port": 5555, "vips": [
        {"address": "198.18.10.10", "port": 80, "protocol": "tcp", "encap": "gue"},
        {"address": "198.18.10.10", "port": 443, "protocol": "tcp", "encap": "GUE"},
        {"address": "198.18.10.10", "port": 53, "protocol": "udp", "encap": "ipip"},
        {"address": "198.18.10.10", "port": 22, "protocol": "tcp"}]})
    assert cfg.runtime.gue_port == 5555
    assert [v.encap for v in cfg.vips] == ["gue", "gue", "ipip", "ipip"]
    assert parse_config({}).runtime.gue_port == 6080


def test_yaml_syntax_error_gives_line_and_column(tmp_path):
    f = tmp_path / "lb.yaml"
    f.write_text("vips:\n  - address: [198.18.10.1\n")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+"):
        load_config(f)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_empty_document_is_an_empty_configuration():
    assert parse_config(None).vips == []


def test_health_checks_read_back_what_they_save():
    from l4lb.health import HealthCheck, parse_health

    for check in (HealthCheck(), HealthCheck(kind="http", path="/healthz", expect=(200, 204), host="svc"),
                  HealthCheck(kind="tcp", port=8080, via="direct", min_healthy=0)):
        assert parse_health(check.to_dict()) == check
