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
