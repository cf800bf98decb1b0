"""Live previews: progress events of a job that asks carry a PNG of its current x0 estimate,
projected by the model's fitted latent -> RGB map (engines.latent_preview); jobs that don't
ask get none. The shipped map is checked against its VAE on scenes it was not fitted on."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from engines import latent_preview
from service.config import ROOT
from tests.conftest import generate

MODELS = ROOT / "models"


def watch(api, ids: list[str]) -> list[Future]:
    """Each job's events to its `done`, read in threads from streams opened now: the caller
    starts the worker only after this returns, so no progress event is missed."""
    pool = ThreadPoolExecutor(len(ids))
    opened = [threading.Event() for _ in ids]
    futures = [pool.submit(stream_events, api, job_id, ready) for job_id, ready in zip(ids, opened)]
    for ready in opened:
        assert ready.wait(30), "an event stream did not open"
    pool.shutdown(wait=False)
    return futures


def stream_events(api, job_id: str, opened: threading.Event) -> list[tuple[str, dict]]:
    events, name = [], None
    with api.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                opened.set()  # the first event (status) comes once the stream is subscribed
                if name == "done":
                    break
    return events


def decode_png(preview: dict) -> np.ndarray:
    assert preview["mime"] == "image/png" and set(preview) == {"mime", "data", "width", "height"}, preview.keys()
    image = Image.open(io.BytesIO(base64.b64decode(preview["data"])))
    assert image.format == "PNG" and image.mode == "RGB"
    assert image.size == (preview["width"], preview["height"])
    return np.asarray(image).astype(float)


def previews_of(events: list[tuple[str, dict]]) -> list[dict]:
    return [data["preview"] for name, data in events if name == "progress" and "preview" in data]


# ---------------------------------------------------------------- the map


def test_shipped_shapes_ldm_map_reconstructs_held_out_latents():
    """On scenes of a seed neither the fit nor its own held-out set used: the map applied to
    sampler-space latents (as the worker applies it) against the VAE's decoded colours per
    latent cell. Bounds from the fit's report (45/255 RMSE, 15 dB) with a margin; a map that
    learnt nothing (the best constant colour) scores 95/255."""
    from training.fit_preview import held_out_error, load_vae

    model_dir = MODELS / "shapes-ldm"
    vae = load_vae(model_dir)
    rgb_map = latent_preview.load(model_dir, vae.config.scaling_factor, vae.config.shift_factor or 0.0)
    assert rgb_map is not None, "models/shapes-ldm has no latent_rgb.json fitted to its VAE"
    error = held_out_error(rgb_map, vae, n=96, seed=4242)
    assert error["rmse_8bit"] < 55 and error["psnr_db"] > 13.5, error
    report = json.loads((model_dir / latent_preview.FILENAME).read_text())["fit"]
    assert report["held_out"]["rmse_8bit"] < report["held_out_constant_colour"]["rmse_8bit"] / 1.5, report


def test_shipped_maps_match_their_vaes_and_the_default_model_has_one():
    """A map fitted to another VAE than its directory's would show wrong colours: load refuses
    it, and so does this test (refit with python -m training.fit_preview). A model without a
    map sends no previews, but the default model must have one."""
    registry = json.loads((MODELS / "registry.json").read_text())
    for entry in registry["models"]:
        model_dir = MODELS / entry["path"]
        if (model_dir / latent_preview.FILENAME).is_file():
            assert latent_preview.load(model_dir, 1.0, 0.0) is not None, f"{model_dir}: stale map"
    default = next(e for e in registry["models"] if e["id"] == registry["default"])
    assert latent_preview.load(MODELS / default["path"], 1.0, 0.0) is not None


def test_map_folds_the_vae_scaling_and_shift_and_refuses_another_vae(tmp_path):
    """SD3-style VAEs shift their latents: the map, fitted on raw latents z, must give the same
    colours for sampler-space latents (z - shift) * scaling. A map whose VAE changed is refused."""
    weight, bias = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5, 0.4, 0.3])
    z = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    folded = latent_preview.LatentRGB.from_raw(weight, bias, scaling_factor=1.5305, shift_factor=0.0609)
    raw = latent_preview.LatentRGB(weight, bias)
    assert torch.allclose(folded.rgb((z - 0.0609) * 1.5305), raw.rgb(z), atol=1e-5)
    pixels = folded((z[0] - 0.0609) * 1.5305)
    assert pixels.dtype == torch.uint8 and pixels.shape == (5, 6, 3)

    model_dir = tmp_path / "model"
    shutil.copytree(MODELS / "tiny-ldm" / "vae", model_dir / "vae")
    assert latent_preview.load(model_dir, 1.0, 0.0) is None  # no file: no previews
    latent_preview.save(model_dir, weight, bias, {"method": "test"})
    assert latent_preview.load(model_dir, 1.0, 0.0) is not None
    config = model_dir / "vae" / "config.json"
    config.write_text(config.read_text().replace('"scaling_factor": 1.0', '"scaling_factor": 0.5'))
    assert latent_preview.load(model_dir, 1.0, 0.0) is None  # fitted to another VAE


# ---------------------------------------------------------------- through the service


def test_progress_events_carry_previews_only_when_asked(api, start_worker):
    asked = generate(api, wait=False, model="slow-ldm", prompt="a star", steps=6, width=64, height=48,
                     preview=True).json()["id"]
    plain = generate(api, wait=False, model="slow-ldm", prompt="a star", steps=6).json()["id"]
    streams = watch(api, [asked, plain])
    start_worker("slow-ldm", "preview-tiny-worker", fill_window_s=0.5)
    events = streams[0].result(60)
    progress = [data for name, data in events if name == "progress"]
    assert events[-1][1]["status"] == "succeeded" and len(progress) == 6, events
    assert all("preview" in data for data in progress), progress
    for preview in previews_of(events):  # latent resolution: the VAE's factor 4
        assert (preview["width"], preview["height"]) == (16, 12)
        assert decode_png(preview).shape == (12, 16, 3)

    events = streams[1].result(60)
    assert events[-1][1]["status"] == "succeeded"
    assert len([data for name, data in events if name == "progress"]) == 6
    assert previews_of(events) == []

    response = generate(api, model="slow-ldm", prompt="a star", preview="often")
    assert response.status_code == 422 and response.json()["error"]["field"] == "preview"


def test_previews_move_toward_the_final_image(api, start_worker):
    """shapes-mmdit asked for "a star" (colour, size, place and background left open): its
    first x0 estimate is the average over everything the prompt allows, its last the picture
    delivered. Each preview is compared with its own job's delivered image box-averaged to the
    preview's size: the error falls, and the mean colour comes closer. Two jobs share the
    batch, and each job's last preview is closer to its own image than to the other's."""
    ids = [generate(api, wait=False, model="shapes-mmdit", prompt="a star", steps=12, seed=seed,
                    preview=True).json()["id"] for seed in (0, 2)]
    streams = watch(api, ids)
    start_worker("shapes-mmdit", "preview-worker", fill_window_s=0.5)
    finals, previews = [], []
    for stream in streams:
        events = stream.result(120)
        done = events[-1][1]
        assert done["status"] == "succeeded", done
        shown = [decode_png(p) for p in previews_of(events)]
        assert len(shown) == 12 and all(p.shape == (16, 16, 3) for p in shown)
        final = Image.open(io.BytesIO(base64.b64decode(done["images"][0]["data"]))).convert("RGB")
        finals.append(np.asarray(final.resize((16, 16), Image.Resampling.BOX)).astype(float))
        previews.append(shown)
    for (first, *_, last), target, other in zip(previews, finals, finals[::-1]):
        error = [float(np.abs(p - target).mean()) for p in (first, last)]
        assert error[1] < 0.7 * error[0], error
        colour = [float(np.abs(p.mean((0, 1)) - target.mean((0, 1))).mean()) for p in (first, last)]
        assert colour[1] < colour[0], colour
        assert error[1] < float(np.abs(last - other).mean()), "a preview resembles another job's image"


def test_preview_is_carried_into_the_job_request():
    """The worker reads the option from the job's stored request (validation.resolve)."""
    from engines.registry import load_registry
    from service.schemas import GenerateRequest
    from service.validation import resolve

    registry = load_registry(MODELS / "registry.json")
    assert resolve(GenerateRequest(prompt="a star", preview=True), registry).request["preview"] is True
    assert resolve(GenerateRequest(prompt="a star"), registry).request["preview"] is False


def test_preview_benchmark_runs_and_reports_the_fraction_of_a_step(tmp_path):
    """Smoke run on a tiny model (the real run, on the default model, writes bench/reports/)."""
    result = subprocess.run([sys.executable, "-m", "bench.previews", "--model", "tiny-mmdit", "--repeats", "1",
                             "--batches", "1,2", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [b["batch"] for b in report["batches"]] == [1, 2] and report["cpu"]
    for b in report["batches"]:
        assert b["step_ms"] > 0 and b["preview_ms"] > 0 and b["preview_size"] == [16, 16]
        assert b["every_job_previews_pct"] == pytest.approx(100 * b["batch"] * b["preview_ms"] / b["step_ms"], rel=0.05)
    assert "Target < 5%" in (tmp_path / "report.md").read_text()
