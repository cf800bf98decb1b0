"""The deploy files, checked by the real validators (Docker itself can't run here)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from service.config import ROOT
from service.metrics import ApiExporter, WorkerExporter

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "latentserve.json"


def run(*args: str) -> subprocess.CompletedProcess:
    if shutil.which(args[0]) is None:
        pytest.fail(f"{args[0]} not found: `make test` installs it from Debian's packages")
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True)


def test_compose_file_is_valid_and_complete():
    result = run("docker-compose", "-f", "docker-compose.yml", "config", "-q")
    assert result.returncode == 0, result.stderr
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert {"redis", "api", "worker", "prometheus", "grafana"} <= set(compose["services"])
    assert "--appendonly" in compose["services"]["redis"]["command"]
    assert "redis-data:/data" in compose["services"]["redis"]["volumes"]


def test_prometheus_config_and_rules_pass_promtool():
    for args in (("check", "config", "deploy/prometheus.yml"), ("check", "rules", "deploy/alerts.yml")):
        result = run("promtool", *args)
        assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == {"latentserve-api", "latentserve-worker"}


# The part of Grafana's dashboard model that provisioning relies on.
DASHBOARD_SCHEMA = {
    "type": "object",
    "required": ["uid", "title", "schemaVersion", "panels"],
    "properties": {
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "schemaVersion": {"type": "integer", "minimum": 30},
        "panels": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "type", "title", "gridPos", "targets", "datasource"],
                "properties": {
                    "id": {"type": "integer"},
                    "type": {"enum": ["timeseries", "stat", "gauge", "bargauge", "table", "heatmap"]},
                    "title": {"type": "string", "minLength": 1},
                    "gridPos": {
                        "type": "object",
                        "required": ["x", "y", "w", "h"],
                        "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 23},
                                       "w": {"type": "integer", "minimum": 1, "maximum": 24},
                                       "y": {"type": "integer", "minimum": 0},
                                       "h": {"type": "integer", "minimum": 1}},
                    },
                    "targets": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "object", "required": ["refId", "expr"],
                                  "properties": {"expr": {"type": "string", "minLength": 1}}},
                    },
                },
            },
        },
    },
}


def exported_metric_names() -> set[str]:
    registry = CollectorRegistry()
    ApiExporter(registry)
    WorkerExporter(registry)
    names = set()
    for family in registry.collect():
        names.add(family.name)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names |= {family.name + suffix for suffix in suffixes}
    return names


def test_dashboard_is_well_formed_and_shows_what_the_issue_asks():
    dashboard = json.loads(DASHBOARD.read_text())
    jsonschema.validate(dashboard, DASHBOARD_SCHEMA)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for wanted in ("queue depth", "throughput", "latency", "batch size", "failures"):
        assert wanted in titles
    exprs = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    assert all(f"histogram_quantile({q}" in exprs for q in ("0.5", "0.95", "0.99"))
    used = set(re.findall(r"latentserve_[a-z_]+", exprs))
    assert used <= exported_metric_names(), used - exported_metric_names()


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "latentserve.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts


def test_kubernetes_manifests_are_complete_and_use_real_settings():
    from service.config import Settings

    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "latentserve.yaml").read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("StatefulSet", "latentserve-redis"), ("Deployment", "latentserve-api"),
            ("Deployment", "latentserve-worker"), ("ConfigMap", "latentserve")} <= kinds
    known = {f"LATENTSERVE_{name.upper()}" for name in Settings.__dataclass_fields__}
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert set(config["data"]) <= known, set(config["data"]) - known
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
            for container in d["spec"]["template"]["spec"]["containers"]:
                for env in container.get("env", []):
                    assert env["name"] in known
