"""A real Prometheus scrapes the running API and worker with deploy/prometheus.yml's jobs and
rules, and every query of the Grafana dashboard, as Grafana would send it, parses and shows
data after real traffic. A dashboard query on a misspelt metric or label, or one that errors,
fails here; one that can only show data after an event this test does not cause is listed in
NO_DATA_EXPECTED with the reason."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
import yaml

from service.config import ROOT
from tests import grafana_queries as gq
from tests.conftest import free_port, generate, start_api, wait_until

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None,
                                reason="prometheus not found: `make test` installs Debian's prometheus package")

DEPLOY = ROOT / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
SCRAPE_S = 1
# The models the traffic goes to (served by the shared worker of conftest).
MODELS = ("tiny-mmdit", "tiny-ldm")

# (panel title, refId) -> why it has no data after this test's traffic. A panel added without
# data fails the test until it is listed here; an entry naming no target fails it too.
NO_DATA_EXPECTED = {
    ("Failures by reason", "A"): "latentserve_job_failures_total gets its first series when a job "
                                 "fails (tests/test_failures.py makes jobs fail); every job here succeeds",
    ("Failures by reason", "B"): "jobs_finished_total{status!=\"succeeded\"} needs a failed or "
                                 "cancelled job; every job here succeeds",
    ("Engine builds (cache misses) and build seconds", "A"):
        "only engines built into the engine cache (onnxruntime, tensorrt) look it up; the test "
        "worker serves through torch (tests/test_engines_service.py counts these at the worker)",
    ("Engine builds (cache misses) and build seconds", "B"): "as A: no engine is built for torch",
    ("Engine builds (cache misses) and build seconds", "C"): "as A: no engine cache lookup for torch",
}


class PromError(AssertionError):
    pass


@dataclass
class Prometheus:
    http: httpx.Client
    started: float  # unix seconds, the start of the dashboard's time range

    def api(self, path: str, **params) -> object:
        response = self.http.get(f"/api/v1/{path}", params=params)
        body = response.json()
        if body.get("status") != "success":
            raise PromError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def instant(self, query: str) -> list[dict]:
        return self.api("query", query=query)["result"]

    def ranged(self, query: str, window: gq.Window) -> list[dict]:
        start, end = window.aligned()
        return self.api("query_range", query=query, start=start, end=end, step=window.step_s)["result"]

    def window(self, scrape_interval_s: int) -> gq.Window:
        return gq.Window(self.started, time.time(), scrape_interval_s)


def has_data(result: list[dict]) -> bool:
    """A series with a number Grafana would draw (NaN is a gap: an empty rate's quantile)."""
    values = [v for s in result for _t, v in s.get("values", []) + ([s["value"]] if "value" in s else [])]
    return any(not math.isnan(float(v)) for v in values)


def eventually(problems, timeout: float) -> None:
    """Polls `problems()` (a list of strings) until it is empty; fails with the last list."""
    deadline = time.monotonic() + timeout
    while True:
        found = problems()
        if not found or time.monotonic() > deadline:
            break
        time.sleep(SCRAPE_S)
    assert not found, "\n".join(found)


def prometheus_config(targets: dict[str, list[str]]) -> dict:
    """deploy/prometheus.yml with its jobs, paths and relabelings as deployed; only the targets
    (docker DNS there) become this test's ports, scraped and evaluated every second."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == set(targets), f"deploy/prometheus.yml scrapes {jobs}; this test knows {set(targets)}"
    for job in config["scrape_configs"]:
        for key in [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]:
            del job[key]
        job.pop("scrape_interval", None)
        job.pop("scrape_timeout", None)
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    config["global"].update(scrape_interval=f"{SCRAPE_S}s", scrape_timeout=f"{SCRAPE_S}s",
                            evaluation_interval=f"{SCRAPE_S}s")
    config["rule_files"] = [str(DEPLOY / f) for f in config.get("rule_files", [])]  # relative to deploy/
    return config


@pytest.fixture(scope="module")
def apis(api, redis_url, registry_path, tmp_path_factory):
    """Two API replicas, as deploy/k8s runs them: each reports the queue's figures from Redis."""
    proc, second = start_api(redis_url, registry_path, tmp_path_factory.mktemp("api-replica"))
    yield [api, second]
    second.close()
    proc.stop()


@pytest.fixture(scope="module")
def prometheus(apis, worker, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config({
        "latentserve-api": [f"127.0.0.1:{a.base_url.port}" for a in apis],
        "latentserve-worker": [f"127.0.0.1:{worker.metrics_port}"],
    })))
    port = free_port()
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    prom = Prometheus(http, time.time())
    try:
        def ready():
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()
            try:
                return http.get("/-/ready").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 30, "prometheus", interval=0.2)
        eventually(lambda: [f"{t['scrapePool']} {t['scrapeUrl']}: {t['health']} {t['lastError']}"
                            for t in prom.api("targets")["activeTargets"] if t["health"] != "up"], 20)
        send_traffic(apis, prom)
        yield prom
    finally:
        http.close()
        proc.terminate()
        proc.wait(10)
        log.close()


def send_traffic(apis: list[httpx.Client], prom: Prometheus) -> None:
    """Two waves of generations with a scrape between them: a series appears with its first
    observation, so only increments after a scrape make rates (and their quantiles) non-zero."""
    def wave() -> int:
        bodies = [dict(model=m, prompt="a red circle", steps=4, seed=i, num_images=1 + i % 2)
                  for m in MODELS for i in range(3)]
        with ThreadPoolExecutor(len(bodies)) as pool:  # together, so some share a batch
            jobs = [r.json() for r in pool.map(lambda i: generate(apis[i % len(apis)], **bodies[i]),
                                                 range(len(bodies)))]
        assert all(j["status"] == "succeeded" for j in jobs), jobs
        return sum(b["num_images"] for b in bodies)

    def images() -> float:  # as last scraped (the session's worker may have served earlier tests)
        result = prom.instant("sum(latentserve_images_generated_total)")
        return float(result[0]["value"][1]) if result else 0.0

    before = images()
    first = wave()

    def scraped():
        return images() >= before + first

    wait_until(scraped, 20, "a scrape of the worker after the first wave", interval=0.2)
    wave()


# The series the dashboard exists for, by their metric names (independent of its JSON).
KEY_SERIES = {
    "queue depth": 'latentserve_queue_depth{model="tiny-mmdit"}',
    "request rate": 'sum(rate(latentserve_http_requests_total{route="/v1/generate"}[15s]))',
    "generate rate": 'sum(rate(latentserve_generate_requests_total{model="tiny-mmdit", code="200"}[15s]))',
    **{f"end-to-end p{round(q * 100)}": f"histogram_quantile({q}, sum by (le) (rate("
       'latentserve_job_end_to_end_seconds_bucket{model="tiny-mmdit"}[15s])))' for q in (0.5, 0.95, 0.99)},
    "batch size": 'sum(rate(latentserve_batch_size_images_sum{model="tiny-ldm"}[15s]))'
                  ' / sum(rate(latentserve_batch_size_images_count{model="tiny-ldm"}[15s]))',
    "api scraped": 'up{job="latentserve-api"} == 1',
    "worker scraped": 'up{job="latentserve-worker"} == 1',
}


def test_key_series_reach_prometheus(prometheus):
    eventually(lambda: [f"{name}: no data for {query}" for name, query in KEY_SERIES.items()
                        if not has_data(prometheus.ranged(query, prometheus.window(SCRAPE_S)))], 45)

    def queue_drained() -> list[str]:  # every job has finished, as the next API scrapes show
        depth = {s["metric"]["model"]: float(s["value"][1]) for s in prometheus.instant("latentserve_queue_depth")}
        return [] if set(MODELS) <= set(depth) and not any(depth.values()) else [f"queue depth {depth}"]

    eventually(queue_drained, 10)
    batch = prometheus.ranged(KEY_SERIES["batch size"], prometheus.window(SCRAPE_S))
    sizes = [float(v) for s in batch for _t, v in s["values"] if not math.isnan(float(v))]
    assert sizes and all(1 <= size <= 8 for size in sizes), sizes  # tiny-ldm's max_batch is 8


def data_source_scrape_interval_s() -> int:
    """The provisioned data source's scrape interval (Grafana's default when unset: 15s), from
    which Grafana derives $__interval's floor and $__rate_interval."""
    provisioned = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    interval = provisioned["datasources"][0].get("jsonData", {}).get("timeInterval", "15s")
    assert interval.endswith("s"), interval
    return int(interval[:-1])


def variable_options(prom: Prometheus, variables: list[gq.Variable], window: gq.Window) -> dict[str, list[str]]:
    """Each variable's values as Grafana's label_values asks Prometheus for them."""
    options = {}
    for variable in variables:
        query = gq.interpolate(variable.query, variables, {v.name: gq.ALL for v in variables}, options, window)
        match, label = gq.label_values_query(query)
        params = {"start": window.start, "end": window.end}
        if match is not None:
            prom.instant(match)  # the selector parses
            params["match[]"] = match
        options[variable.name] = prom.api(f"label/{label}/values", **params)
    return options


def check_dashboard(prom: Prometheus, dashboard: dict) -> list[str]:
    """Every target under each selection of the variables a user can make: All, several, one."""
    window = prom.window(data_source_scrape_interval_s())
    variables = gq.variables(dashboard)
    options = variable_options(prom, variables, window)
    problems = [f"variable {v.name}: no values" for v in variables if not options[v.name]]
    selections = [{v.name: gq.ALL for v in variables}]
    for v in variables:
        if v.multi:
            selections.append({**selections[0], v.name: [o for o in options[v.name] if o in MODELS]})
        selections.append({**selections[0], v.name: [MODELS[0]] if v.multi else MODELS[0]})
    for target in gq.targets(dashboard):
        key = (target.panel, target.ref_id)
        for selected in selections:
            expr = gq.interpolate(target.expr, variables, selected, options, window)
            instant = prom.instant(expr)  # every query must parse and evaluate, data or not
            result = instant if target.instant else prom.ranged(expr, window)
            if not has_data(result):
                if key not in NO_DATA_EXPECTED:
                    problems.append(f"{target.panel!r} {target.ref_id} shows no data with {selected}: {expr}")
                continue
            for series in result:
                missing = target.legend_labels - set(series["metric"])
                if missing:
                    problems.append(f"{target.panel!r} {target.ref_id}: legend {target.legend!r} names "
                                    f"{sorted(missing)}, absent from {series['metric']}")
    return problems


# Gauges every API replica reads from Redis: each reports the same global figure, so a panel
# must show one replica's value, never the sum over replicas (deploy/k8s runs two).
REPLICATED_GAUGES = ("latentserve_queue_depth", "latentserve_live_workers")
UNSERVED = "huge-ldm"  # no worker in the test session serves it: a job there stays queued


@contextmanager
def job_nobody_serves(api: httpx.Client):
    """One job queued for UNSERVED while the block runs, then cancelled (the queue left empty)."""
    response = generate(api, wait=False, model=UNSERVED, prompt="a red circle", steps=4)
    assert response.status_code == 202, response.text
    try:
        yield
    finally:
        assert api.delete(f"/v1/jobs/{response.json()['id']}").json()["status"] == "cancelled"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panels_count_replicated_gauges_once(prometheus, apis, path):
    dashboard = json.loads(path.read_text())
    variables = gq.variables(dashboard)
    window = prometheus.window(data_source_scrape_interval_s())
    options = variable_options(prometheus, variables, window)
    models = [MODELS[0], UNSERVED]  # one live worker, no queue / one queued job, no worker
    selected = {v.name: models if v.multi else MODELS[0] for v in variables}
    checked = [(t, gauge) for t in gq.targets(dashboard) for gauge in REPLICATED_GAUGES if gauge in t.expr]
    assert checked, "no panel shows the queue depth or live workers"

    def problems() -> list[str]:
        found = []
        for target, gauge in checked:
            reported: dict[str, set[float]] = {}
            for s in prometheus.instant(f'{gauge}{{model=~"{"|".join(models)}"}}'):
                reported.setdefault(s["metric"]["model"], set()).add(float(s["value"][1]))
            replicas = {s["metric"]["model"]: float(s["value"][1])
                        for s in prometheus.instant(f'count by (model) ({gauge})')}
            if any(len(reported.get(m, ())) != 1 or replicas.get(m) != len(apis) for m in models):
                found.append(f"{gauge}: the {len(apis)} replicas do not agree yet: {reported}")
                continue
            expr = gq.interpolate(target.expr, variables, selected, options, window)
            shown = {s["metric"].get("model"): float(s["value"][1]) for s in prometheus.instant(expr)}
            expected = {m: next(iter(values)) for m, values in reported.items()}
            if shown != expected:
                found.append(f"{target.panel!r} {target.ref_id} shows {shown}, each replica reports "
                             f"{expected}: {expr}")
        return found

    with job_nobody_serves(apis[0]):
        eventually(problems, 15)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_dashboard_query_runs_and_shows_data(prometheus, path):
    dashboard = json.loads(path.read_text())
    assert gq.targets(dashboard), path
    every = {(t.panel, t.ref_id) for d in DASHBOARDS for t in gq.targets(json.loads(d.read_text()))}
    assert set(NO_DATA_EXPECTED) <= every, f"NO_DATA_EXPECTED names no target: {set(NO_DATA_EXPECTED) - every}"
    eventually(lambda: check_dashboard(prometheus, dashboard), 30)


def test_alert_rules_are_loaded_parse_and_evaluate(prometheus, apis):
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    rules = [rule for f in config.get("rule_files", []) for group in yaml.safe_load((DEPLOY / f).read_text())["groups"]
             for rule in group["rules"]]
    assert rules
    for rule in rules:
        prometheus.instant(rule["expr"])  # parses and runs; firing is not expected
    names = {rule.get("alert") or rule.get("record") for rule in rules}

    def loaded() -> list[str]:
        found = {r["name"]: r for g in prometheus.api("rules")["groups"] for r in g["rules"]}
        problems = [f"rule {n} not loaded" for n in names - set(found)]
        return problems + [f"rule {n}: {r['health']} {r.get('lastError', '')}"
                           for n, r in found.items() if r["health"] != "ok"]

    eventually(loaded, 15)

    def no_worker_alert() -> list[str]:
        alerts = prometheus.api("alerts")["alerts"]
        if any(a["labels"] == {**a["labels"], "alertname": "LatentserveNoLiveWorker", "model": UNSERVED}
               for a in alerts):
            return []
        return [f"no LatentserveNoLiveWorker alert for {UNSERVED} while its job waits: {alerts}"]

    with job_nobody_serves(apis[0]):  # a job waits for a model nobody serves: the alert goes pending
        eventually(no_worker_alert, 15)


def test_variables_and_macros_interpolate_as_grafana_does():
    model = gq.Variable("model", "label_values(latentserve_queue_depth, model)", multi=True,
                        include_all=True, all_value=".*")
    hour = gq.Window(0, 3600, scrape_interval_s=15)

    def text(expr: str, value) -> str:
        return gq.interpolate(expr, [model], {"model": value}, {"model": ["a.b", "c"]}, hour)

    # Each value matched literally inside the PromQL regex string (the dot escaped for the regex).
    assert text('{m=~"$model"} ${model} [[model]]', ["a.b", "c"]) == r'{m=~"(a\\.b|c)"} (a\\.b|c) (a\\.b|c)'
    assert text('{m=~"$model"}', gq.ALL) == '{m=~".*"}'  # the custom all value, as written
    assert text("[$__rate_interval] [$__interval] [$__range] $__range_s $__range_ms", "c") == \
        "[60s] [15s] [3600s] 3600 3600000"
    assert text('label_replace(x, "y", "$1", "z", "(.*)")', "c") == 'label_replace(x, "y", "$1", "z", "(.*)")'
    with pytest.raises(gq.UnsupportedQuery):
        text('{m=~"$modle"}', "c")
    assert gq.label_values_query(model.query) == ("latentserve_queue_depth", "model")
