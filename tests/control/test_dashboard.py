"""deploy/grafana-dashboard.json: every expression parses (promtool's own
PromQL parser, through a rules file) and names only metrics that the real
exporter of a running `l4lb run` exports."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from control.l4lb.v1 import l4lb_pb2 as pb
from test_metrics_endpoint import BACKENDS, VIP, msrv, udp_lookups  # noqa: F401  (module-scoped fixture)

pytestmark = pytest.mark.kernel
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"
GRAFANA_VARS = {"$__rate_interval": "1m", "$vip": ".*"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}


def expressions() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    out = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", var["definition"])
            assert m, var["definition"]
            out.append(m.group(1))
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: what is left once strings, label
    matchers, ranges, grouping clauses, functions, keywords and numbers are gone."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, rest = m.group(0), text[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in KEYWORDS:
            continue  # a function or an aggregation
        names.add(word)
    return names


def test_the_dashboard_covers_traffic_backends_drops_conntrack_and_control_plane():
    exprs = expressions()
    assert len(exprs) >= 10
    used = set().union(*(metric_names(e) for e in exprs))
    for must in ("l4lb_vip_packets_total", "l4lb_backend_packets_total", "l4lb_packets_total",
                 "l4lb_conntrack_entries", "l4lb_conntrack_capacity", "l4lb_grpc_request_duration_seconds_bucket"):
        assert must in used, must


def test_every_expression_parses(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": []}]}
    for i, e in enumerate(expressions()):
        for var, value in GRAFANA_VARS.items():
            e = e.replace(var, value)
        rules["groups"][0]["rules"].append({"record": f"dashboard:expr{i}", "expr": e})
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_name_check_catches_a_misspelt_metric():
    assert metric_names('sum by (vip) (rate(l4lb_vip_packet_total{vip=~"$vip"}[$__rate_interval]))') == \
        {"l4lb_vip_packet_total"}


def test_every_metric_the_dashboard_names_is_exported(msrv):  # noqa: F811
    with msrv.client() as c:
        c.call("AddVip", pb.AddVipRequest(id=VIP, backends=[pb.Backend(address=a, weight=w) for a, w in BACKENDS.items()]))
        try:
            c.call("SetHealthCheck", pb.SetHealthCheckRequest(id=VIP, health=pb.HealthCheck(
                kind="tcp", via="direct", interval=60, timeout=1)))
            udp_lookups(c, 3, base=40000)
            exported = {name for name, _ in msrv.metrics.samples()}
        finally:
            c.call("DeleteVip", pb.DeleteVipRequest(id=VIP))
    used = set().union(*(metric_names(e) for e in expressions()))
    missing = sorted(used - exported)
    assert not missing, f"the dashboard names metrics the exporter does not export: {missing}"
