"""Metric labels only take values from closed sets: a client's free text never mints a
series (finding 3 of the correctness issue)."""

from __future__ import annotations

import uuid

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import generate


def series(api) -> set[tuple]:
    text = api.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))) for f in text_string_to_metric_families(text)
            for s in f.samples}


def test_random_model_names_and_methods_do_not_grow_the_series(api):
    assert generate(api, wait=False, model="no-such-model", prompt="x").status_code == 404
    api.request("BREW", "/v1/generate")
    series(api)  # so the /metrics route's own series exists before we count
    before = series(api)
    for _ in range(200):
        response = generate(api, wait=False, model=f"m-{uuid.uuid4().hex}", prompt="x")
        assert response.status_code == 404
    for method in ("BREW", "PROPFIND", "X" + uuid.uuid4().hex[:8]):
        api.request(method, "/v1/generate")
    after = series(api)
    assert {name for name, _ in after - before} == set(), sorted(after - before)[:5]
    labels = {dict(l)["model"] for name, l in after if name == "latentserve_generate_requests_total"}
    assert "unknown" in labels and not any(m.startswith("m-") for m in labels)
    methods = {dict(l)["method"] for name, l in after if name == "latentserve_http_requests_total"}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}


def test_a_job_record_times_only_what_happened():
    from service.metrics import JobRecord

    ran = JobRecord.finished(model="m", task="txt2img", status="succeeded", images=1, created_at=10.0,
                             started_at=12.0, now=15.0, failure="ignored")
    assert (ran.queue_s, ran.inference_s, ran.end_to_end_s, ran.failure_reason) == (2.0, 3.0, 5.0, None)
    never_started = JobRecord.finished(model="m", task="txt2img", status="failed", images=0, created_at=10.0,
                                       started_at=None, now=11.0, failure="invalid_input")
    assert (never_started.queue_s, never_started.inference_s, never_started.failure_reason) == \
        (None, None, "invalid_input")
    cancelled = JobRecord.finished(model="m", task="txt2img", status="cancelled", images=0, created_at=10.0,
                                   started_at=12.0, now=13.0, failure=None)
    assert (cancelled.queue_s, cancelled.inference_s) == (2.0, None)
