"""The engine choice through the running service: a worker told LATENTSERVE_ENGINE=onnxruntime
builds its graphs into the engine cache, serves from them, reports them in /v1/models and
counts cache misses; the next worker on the same cache only hits."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, generate


def cache_counts(port: int) -> dict[str, dict[str, float]]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("latentserve_engine_"):
                out.setdefault(s.name, {})[s.labels.get("component", "")] = s.value
    return out


def test_onnxruntime_worker_builds_once_then_serves_from_the_cache(api, start_worker, tmp_path):
    cache = tmp_path / "engine-cache"
    port = free_port()
    first = start_worker("slow-ldm", "ort-a", engine="onnxruntime", engine_cache=cache, metrics_port=port)
    counts = cache_counts(port)
    components = {"text_encoder", "denoiser", "vae_decoder", "vae_encoder"}  # it serves img2img and inpaint too
    assert set(counts["latentserve_engine_cache_misses_total"]) == components
    assert all(v == 1 for v in counts["latentserve_engine_cache_misses_total"].values())
    assert all(v > 0 for v in counts["latentserve_engine_build_seconds_total"].values())
    assert "latentserve_engine_cache_hits_total" not in counts  # no labelled series yet
    info = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'latentserve_engine_info{device="cpu",engine="onnxruntime",model="slow-ldm",precision="fp32"} 1.0' in info

    job = generate(api, model="slow-ldm", prompt="a red circle", steps=4).json()
    assert job["status"] == "succeeded", job
    models = {m["id"]: m for m in api.get("/v1/models").json()["models"]}
    assert models["slow-ldm"]["active_engines"] == [
        {"engine": "onnxruntime", "precision": "fp32", "device": "cpu", "workers": 1}]
    assert models["slow-ldm"]["engine"] == "torch"  # the registry's choice, overridden here
    first.stop()

    port = free_port()
    start_worker("slow-ldm", "ort-b", engine="onnxruntime", engine_cache=cache, metrics_port=port)
    counts = cache_counts(port)
    assert counts["latentserve_engine_cache_hits_total"] == {c: 1.0 for c in components}
    assert "latentserve_engine_cache_misses_total" not in counts
    assert generate(api, model="slow-ldm", prompt="a blue square", steps=4).json()["status"] == "succeeded"
