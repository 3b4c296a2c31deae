"""platform/: the alert rules, the Grafana dashboard and their wiring refer to metrics that
the code really exposes, and docker-compose mounts what Prometheus and Grafana load."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from observability.collectors import state_registry
from tests.observability.conftest import parse_samples

ROOT = Path(__file__).resolve().parents[2]
PLATFORM = ROOT / "platform"
ALERTS = PLATFORM / "prometheus" / "alerts.yml"
DASHBOARD = PLATFORM / "grafana" / "dashboards" / "agentledger.json"
METRIC_NAME = re.compile(r"\b((?:agentledger|django)_[a-z0-9_]+)")


@pytest.fixture
def exposed(db, settings, client) -> set[str]:
    """Sample names the web and worker /metrics can expose (process registry and state)."""
    client.get("/healthz")  # django_prometheus' request counters
    from prometheus_client import generate_latest

    import observability.influx
    from observability import metrics

    # Touch one child of each labelled metric so that its samples exist.
    metrics.attempt_outcome_observe(
        agent_id="x", status="succeeded", cause="success", duration_ms=1, input_tokens=1, output_tokens=1, cost_usd=1,
        task_status="completed",
    )  # fmt: skip
    metrics.attempt_started_observe(agent_id="x", attempt_number=2)
    metrics.queue_wait_observe(queue="normal", seconds=0.1)
    observability.influx.POINTS_DROPPED.labels(reason="buffer_full")
    from observability.collectors import COLLECTOR_ERRORS

    COLLECTOR_ERRORS.labels(collector="queues")
    settings.METRICS_STATE_CACHE_SECONDS = 0
    text = (generate_latest(REGISTRY) + generate_latest(state_registry)).decode()
    names = {name for name, _ in parse_samples(text)}
    # Families a collector emits only when there is something to report (a consumer group,
    # a successful export): their names, from the collector source.
    source = (ROOT / "observability" / "collectors.py").read_text()
    names |= set(re.findall(r'"(agentledger_[a-z0-9_]+)"', source))
    return names


def expressions() -> list[tuple[str, str]]:
    found = []
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        found += [(rule["alert"], rule["expr"]) for rule in group["rules"]]
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        found += [(panel["title"], target["expr"]) for target in panel["targets"]]
    return found


def test_alerts_and_dashboard_use_only_exposed_metrics(exposed):
    for where, expr in expressions():
        assert expr.count("(") == expr.count(")"), where
        for name in METRIC_NAME.findall(expr):
            assert name in exposed, f"{where}: {name} is not exposed"


def test_every_alert_rule_is_complete():
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    covered = " ".join(rule["expr"] for rule in rules)
    needed_names = ("tasks_finished_total", "queue_depth_messages", "attempts_overdue", "relay_lag", "consumer_lag")
    for needed in (*needed_names, "dead_lettered_total"):
        assert needed in covered, f"no alert on {needed}"


def test_every_scraped_job_has_an_alert_for_having_no_target_at_all():
    """`up == 0` fires for a target that is down, not for a job whose service discovery finds
    none (every worker gone): its `up` series do not exist."""
    prometheus = yaml.safe_load((PLATFORM / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in prometheus["scrape_configs"]} & {"web", "worker"}
    assert jobs == {"web", "worker"}
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    covered = " ".join(rule["expr"] for group in groups for rule in group["rules"])
    for job in sorted(jobs):
        assert f'absent(up{{job="{job}"}})' in covered, f"no alert when no {job} target is scraped"


def test_prometheus_loads_the_alert_rules_docker_compose_mounts():
    prometheus = yaml.safe_load((PLATFORM / "prometheus" / "prometheus.yml").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = dict(v.split(":")[:2][::-1] for v in compose["services"]["prometheus"]["volumes"] if v.startswith("./"))
    for rule_file in prometheus["rule_files"]:
        assert (ROOT / mounts[rule_file]).resolve() == ALERTS


def test_grafana_is_optional_and_provisions_the_dashboard_with_its_datasource():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    assert grafana["profiles"] == ["grafana"]
    mounts = dict(v.split(":")[:2][::-1] for v in grafana["volumes"] if v.startswith("./"))
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    provider = yaml.safe_load((provisioning / "dashboards" / "agentledger.yml").read_text())["providers"][0]
    assert (ROOT / mounts[provider["options"]["path"]]).resolve() == DASHBOARD.parent
    uids = {
        target["datasource"]["uid"]
        for panel in json.loads(DASHBOARD.read_text())["panels"]
        for target in [panel, *panel["targets"]]
    }
    assert uids == {datasource["uid"]}
    titles = " ".join(panel["title"].lower() for panel in json.loads(DASHBOARD.read_text())["panels"])
    for needed in ("throughput", "failure", "retry", "p95", "queue depth", "tokens", "cost"):
        assert needed in titles
