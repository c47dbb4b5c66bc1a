"""The alert rules and the Grafana dashboard, as shipped in systemd/.

promtool checks the rules and runs their unit tests (every alert fires, and stays quiet, in
at least one case each), and parses every dashboard query (each wrapped as a recording rule).
The metric names both use are compared with a real scrape of `python -m sniproxy run`, one
process and two workers, taken here, so neither can drift from what sniproxy exports.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests import promtool as promtool_mod
from tests.helpers import REPO, DnsServer, Proxy, Server, clean_env, free_port, recv_all

FILES = REPO / "systemd"
ALERTS = FILES / "sniproxy-alerts.yml"
ALERT_TESTS = FILES / "sniproxy-alerts.test.yml"
DASHBOARD = FILES / "sniproxy-dashboard.json"

#: The alerts issue 12 asks for, and the worker crash loop.
REQUIRED_ALERTS = {"SniproxyDown", "SniproxyRejectionSpike", "SniproxyUpstreamConnectFailures", "SniproxyNoTraffic",
                   "SniproxyFdsNearLimit", "SniproxyReloadFailed", "SniproxyWorkerRestarts"}
#: Prometheus's own series an alert may use besides sniproxy's.
PROMETHEUS_SERIES = {"up"}
#: Grafana's variables, as a query would see them.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}


@pytest.fixture(scope="session")
def promtool() -> str:
    path = promtool_mod.find()
    if path is None:
        message = "promtool not found and Debian's prometheus package could not be fetched (apt-get download prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def run(promtool: str, *args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], input=stdin, capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=clean_env())


# -- a real scrape ---------------------------------------------------------------------------------

def scrape_of(workers: int, tmp_path: Path) -> str:
    """/metrics of a real proxy that has carried one connection (so per-route series exist)."""
    from tests.integration.conftest import NAME, echo, make_hello, proxy_config

    dns = DnsServer()
    upstream = Server(echo, host="127.0.0.2")
    dns.add(NAME, "127.0.0.2")
    port = free_port()
    routes = f'[[route]]\nname = "echo"\nsni = "{NAME}"\nport = {upstream.port}\n'
    proxy = Proxy(tmp_path, proxy_config(port, dns, routes, server=f"workers = {workers}"))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            hello = make_hello(NAME)
            s.sendall(hello)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == hello
        proxy.log.wait_for(r'"close":"done"')
        return proxy.metrics_text()
    finally:
        assert proxy.stop() == 0
        upstream.close()
        dns.close()


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory) -> dict[str, str]:
    """A single process, and a supervisor with two workers (which adds the sniproxy_worker* metrics)."""
    return {name: scrape_of(workers, tmp_path_factory.mktemp(name)) for name, workers in (("single", 1), ("workers", 2))}


@pytest.fixture(scope="module")
def exported(scrapes) -> dict[str, set[str]]:
    """Sample name -> its `le` values (empty for non-buckets), over both scrapes; families
    without samples yet count with their type's sample names."""
    names: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}
    for text in scrapes.values():
        for family in text_string_to_metric_families(text):
            for suffix in suffixes.get(family.type, ("",)):
                names.setdefault(family.name + suffix, set())
            for sample in family.samples:
                names.setdefault(sample.name, set()).update([sample.labels["le"]] if "le" in sample.labels else [])
    return names


@pytest.mark.parametrize("mode", ["single", "workers"])
def test_promtool_check_metrics_is_clean_on_a_real_scrape(promtool, scrapes, mode):
    out = run(promtool, "check", "metrics", stdin=scrapes[mode])
    assert (out.returncode, out.stdout, out.stderr) == (0, "", ""), out.stdout + out.stderr


# -- PromQL: the metric names an expression reads -------------------------------------------------

_KEYWORDS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
             "quantile", "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
             "bool", "offset", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The series names ``expr`` selects: identifiers that are not functions, keywords,
    label names (inside {} or a by/on/... list), strings or durations."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^}]*\}", "{}", s)
    s = re.sub(r"\[[^\]]*\]", "[]", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1 ()", s)
    found = re.findall(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", s)
    return {name for name in found if name not in _KEYWORDS}


def test_metric_names_reads_what_a_query_selects():
    expr = ('sum by (route, le) (rate(sniproxy_hello_records_bucket{instance=~"a|b", le="1.0"}[5m] offset 1h)) '
            '/ on (route) group_left sum by (route) (rate(sniproxy_x_count{job="by"}[$__rate_interval])) > bool 0.5 '
            'or vector(1) and up unless time() - process_start_time_seconds > 7200')
    assert metric_names(expr) == {"sniproxy_hello_records_bucket", "sniproxy_x_count", "up", "process_start_time_seconds"}


# -- alerts ----------------------------------------------------------------------------------------

def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_alert_rules_pass_promtool_check(promtool):
    out = run(promtool, "check", "rules", str(ALERTS))
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_alert_unit_tests_pass(promtool):
    out = run(promtool, "test", "rules", ALERT_TESTS.name, cwd=FILES)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_every_alert_is_tested_firing_and_quiet():
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    assert REQUIRED_ALERTS <= set(names)
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    assert tests["rule_files"] == [ALERTS.name]
    firing, quiet = set(), set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == set(names), set(names) - firing
    assert quiet == set(names), set(names) - quiet


def test_every_alert_says_how_bad_and_what_to_do():
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_alerts_name_only_metrics_sniproxy_exports(exported):
    for rule in alert_rules():
        unknown = metric_names(rule["expr"]) - set(exported) - PROMETHEUS_SERIES
        assert not unknown, (rule["alert"], unknown)


# -- dashboard -------------------------------------------------------------------------------------

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # a collapsed row keeps its panels inside
    return out


def queries(board: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables filled in)."""
    out = []
    for panel in panels(board):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            out.append((panel["title"], expr))
    return out


def test_dashboard_queries_parse(promtool, tmp_path):
    board = dashboard()
    found = queries(board)
    assert len(found) >= 20
    assert not [expr for _, expr in found if "$" in expr], "a Grafana variable the test does not fill in"
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(found)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = run(promtool, "check", "rules", str(path))
    assert out.returncode == 0 and f"SUCCESS: {len(found)} rules found" in out.stdout, out.stdout + out.stderr


def test_dashboard_names_only_metrics_sniproxy_exports(exported):
    board = dashboard()
    for title, expr in queries(board):
        unknown = metric_names(expr) - set(exported)
        assert not unknown, (title, unknown)
        for metric, le in re.findall(r'([a-zA-Z_:][\w:]*_bucket)\{[^}]*\ble="([^"]*)"', expr):
            assert le in exported[metric], (title, metric, le, sorted(exported[metric]))
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"]).groups()
            assert metric in exported, variable


def test_dashboard_shows_every_metric_sniproxy_exports(exported):
    """A new metric gets a panel: each exported family appears in some query."""
    shown = set().union(*(metric_names(expr) for _, expr in queries(dashboard())))
    families = {re.sub(r"(_total|_bucket|_sum|_count)$", "", name) for name in shown}
    missing = {name for name in exported if re.sub(r"(_total|_bucket|_sum|_count)$", "", name) not in families}
    assert not missing, sorted(missing)


def test_dashboard_structure():
    board = dashboard()
    every = panels(board)
    ids = [panel["id"] for panel in every]
    assert len(ids) == len(set(ids))
    assert board["uid"] == "sniproxy"
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "instance"}
    for panel in every:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel.get("description"), panel["title"]
        assert all(re.search(r'instance=~"\$instance"', t["expr"]) for t in panel["targets"]), panel["title"]


# -- the docs ---------------------------------------------------------------------------------------

def documented_metrics() -> set[str]:
    text = (REPO / "docs" / "operations.md").read_text()
    table = text[text.index("| metric | labels | meaning |"):]
    return set(re.findall(r"^\| `([a-z_]+)` \|", table, re.M))


def test_the_docs_list_every_metric_sniproxy_exports_and_no_other(exported):
    """docs/operations.md's table names histograms by their base name, counters with _total."""
    families = set()
    for name in exported:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        families.add(base if f"{base}_bucket" in exported else name)
    assert documented_metrics() == families
