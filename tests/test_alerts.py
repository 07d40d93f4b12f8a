"""The alerting rules (deploy/prometheus/guichet-alerts.yml) parse as PromQL, name only
metrics and labels a running engine exports, match only label values it exports from its
start (a series born at its first increment is invisible to ``increase``), and each has
its runbook in docs/operations.md. A metric renamed in the engine must fail here, not
leave an alert that never fires. Whether each alert fires when it should, and only then:
Prometheus's own promtool evaluates them on the series of guichet-alerts.test.yml, where
it is installed (apt-get install --no-install-recommends prometheus; CI's .ci/run does
it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from engine.routes import ROUTES

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "guichet-alerts.yml"
RUNBOOK = ROOT / "docs" / "operations.md"
# Series Prometheus itself records about each scrape, with the labels it gives them.
SCRAPE_SERIES = {"up": {"job", "instance"}}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


async def exported(
    client: TestClient,
) -> tuple[dict[str, set[str] | None], dict[tuple[str, str], set[str]]]:
    """Each series name a fresh engine's ``/metrics`` declares, with the label names its
    samples carry (None for a family with no sample yet: its labels cannot be checked),
    and the values each label has."""
    text = await (await client.get("/metrics")).text()
    series: dict[str, set[str] | None] = {}
    values: dict[tuple[str, str], set[str]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES[family.type]:
            series[family.name + suffix] = None
        for sample in family.samples:
            labels = series.get(sample.name) or set()
            series[sample.name] = labels | set(sample.labels)
            for label, value in sample.labels.items():
                values.setdefault((sample.name, label), set()).add(value)
    return series, values


def selectors(expr: promql_parser.Expr) -> tuple[list[promql_parser.VectorSelector], set[str]]:
    """The series an expression reads, and the label names it groups or matches on."""
    found: list[promql_parser.VectorSelector] = []
    grouping: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            matching = node.modifier.matching
            if matching is not None:
                grouping.update(matching.labels)

    promql_parser.walk(expr, pre_visit=visit)
    return found, grouping


async def test_every_alert_reads_what_the_engine_exports(client: TestClient) -> None:
    series, values = await exported(client)
    series.update({name: set(labels) for name, labels in SCRAPE_SERIES.items()})
    paths = {route.path for route in ROUTES}
    checked = 0
    for rule in alerts():
        name = rule["alert"]
        found, grouping = selectors(promql_parser.parse(rule["expr"]))
        assert found, f"{name}: reads no series"
        labels: set[str] = {"job", "instance"}  # Prometheus gives every scraped series these
        for selector in found:
            assert selector.name in series, f"{name}: the engine exports no {selector.name}"
            known = series[selector.name]
            used = {m.name for m in selector.matchers.matchers}
            if used:
                assert known is not None, f"{name}: no sample of {selector.name} to check"
                assert used <= known, f"{name}: {selector.name} has no label {used - known}"
            labels |= known or set()
            for matcher in selector.matchers.matchers:
                if matcher.op == promql_parser.MatchOp.Equal and selector.name in SCRAPE_SERIES:
                    continue
                if matcher.op == promql_parser.MatchOp.Equal:
                    seen = values.get((selector.name, matcher.name), set())
                    assert matcher.value in seen, (
                        f"{name}: {selector.name}{{{matcher.name}={matcher.value!r}}} is not "
                        f"exported from the start (only {sorted(seen)})"
                    )
                elif matcher.name == "route":
                    # Alternatives of exact paths, each a route the engine serves.
                    for path in matcher.value.split("|"):
                        assert any(re.fullmatch(path, p) for p in paths), f"{name}: {path}"
                        checked += 1
        assert grouping <= labels, f"{name}: groups by {grouping - labels}, never exported"
    assert checked >= 2  # the slow-booking alert's two routes


def test_the_example_configuration_loads_these_rules_under_their_job() -> None:
    """deploy/prometheus/prometheus.yml names the rules file and the job GuichetDown reads."""
    config = yaml.safe_load((RULES.parent / "prometheus.yml").read_text())
    assert config["rule_files"] == [RULES.name]
    jobs = [job["job_name"] for job in config["scrape_configs"]]
    down = next(rule for rule in alerts() if rule["alert"] == "GuichetDown")
    assert jobs == ["guichet"] and 'job="guichet"' in down["expr"]
    # The job's own interval: merged into a configuration at Prometheus's default of 1m, the
    # alerts' rates over a minute had one sample in it, and never fired (an audit).
    interval = config["scrape_configs"][0]["scrape_interval"]
    assert promql_parser.parse_duration(interval).total_seconds() <= 20


def test_every_alert_is_complete_and_has_its_runbook() -> None:
    headings = set(re.findall(r"^## (\w+)$", RUNBOOK.read_text(), re.M))
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names))
    assert set(names) == headings, "docs/operations.md has a section per alert, no more"
    for rule in alerts():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("page", "ticket"), name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["runbook_url"] == f"docs/operations.md#{name.lower()}"
        if "for" in rule:
            assert promql_parser.parse_duration(rule["for"]).total_seconds() > 0, name


def test_every_alert_has_cases_where_it_fires_and_where_it_does_not() -> None:
    """A new alert comes with its promtool cases (read here without promtool)."""
    cases = yaml.safe_load((RULES.parent / "guichet-alerts.test.yml").read_text())
    firing: dict[str, set[bool]] = {}
    for case in cases["tests"]:
        for check in case.get("alert_rule_test", []):
            firing.setdefault(check["alertname"], set()).add(bool(check.get("exp_alerts")))
    names = {rule["alert"] for rule in alerts()}
    assert set(firing) <= names, "a case names no alert: promtool passes it, checking nothing"
    for name in names:
        assert firing.get(name) == {True, False}, name


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip(
            "promtool is not installed (apt-get install --no-install-recommends prometheus)"
        )
    return subprocess.run(
        [found, *args], cwd=RULES.parent, capture_output=True, text=True, timeout=120
    )


def test_the_alerts_fire_when_their_cases_say_and_only_then() -> None:
    done = promtool("test", "rules", "guichet-alerts.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_takes_the_example_configuration_and_its_rules() -> None:
    done = promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout
