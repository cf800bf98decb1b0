"""Engines on CPU: every component of every shipped model through ONNX + onnxruntime against
torch, end-to-end image parity between engines and precisions, the cache keys, profiles and
engine selection. GPU-only paths (CUDA graphs, TensorRT) run where a GPU / TensorRT exists
and skip with the reason elsewhere."""

from __future__ import annotations

import json
import shutil
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from engines import loader, selection
from engines.backends.base import EngineError
from engines.cache import EngineCache, EngineKey
from engines.components import FAMILY_COMPONENTS, component_spec, example_inputs
from engines.layout import ModelLayout
from engines.profiles import Profile, batch_buckets, profiles, select_profile
from engines.registry import load_registry
from engines.tasks import txt2img
from export import artefacts, onnx_export

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = load_registry(ROOT / "models" / "registry.json")
CUDA = torch.cuda.is_available()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()


def batch_for(spec, n: int = 4) -> txt2img.Txt2ImgBatch:
    d = spec.defaults
    prompts = ["a red circle on the left", "two shapes: a blue square and a green star",
               "a small yellow triangle at the top on black", "a large pink star in the center"]
    return txt2img.Txt2ImgBatch(d.width, d.height, d.sampler, d.steps,
                                [txt2img.ImageRequest(prompts[i % 4], "", 100 + i, d.guidance_scale) for i in range(n)])


# ------------------------------------------------------------------ ONNX parity, every component


@pytest.mark.parametrize("model_id", sorted(SHIPPED.models))
def test_onnx_matches_torch_on_every_component(model_id, tmp_path):
    """Each component exported with dynamic axes and run by onnxruntime at batch sizes and
    latent sizes other than the traced ones: max |onnx - torch| <= 1e-3 on outputs of order 1
    (relative for larger outputs). Goes through the cache like the worker does."""
    spec = SHIPPED.get(model_id)
    events = []
    builder = artefacts.builder(spec, EngineCache(tmp_path), "cpu", events.append)
    for name in FAMILY_COMPONENTS[spec.family]:
        path = builder.onnx(name)
        info = json.loads((path.parent / "key.json").read_text())["info"]
        assert info["max_abs_diff"] <= onnx_export.tolerance(info["ref_max_abs"]), (name, info)
        assert info["max_abs_diff"] < 1e-3, (name, info)  # every shipped output is of order 1..10
    assert [e.component for e in events] == list(FAMILY_COMPONENTS[spec.family])
    assert not any(e.hit for e in events)


@pytest.fixture(scope="module")
def engine_cache(tmp_path_factory) -> EngineCache:
    return EngineCache(tmp_path_factory.mktemp("engine-cache"))


@pytest.mark.parametrize("model_id", [m for m in ("shapes-mmdit", "shapes-ldm", "tiny-ldm") if m in SHIPPED.models][:2])
def test_onnxruntime_end_to_end_matches_torch(model_id, engine_cache):
    spec = SHIPPED.get(model_id)
    batch = batch_for(spec)
    ours = txt2img.run(loader.load(spec, engine="torch", cache=engine_cache), batch)
    ort = artefacts.load(spec, engine="onnxruntime", cache=engine_cache)
    assert ort.engine == "onnxruntime" and type(ort.components["denoiser"]).__name__ == "OrtEngine"
    value = psnr(ours, txt2img.run(ort, batch))
    assert value >= 40, f"torch fp32 vs onnxruntime PSNR {value:.1f} dB"


def test_bf16_end_to_end_close_to_fp32(engine_cache):
    spec = SHIPPED.get("shapes-mmdit")
    batch = batch_for(spec)
    fp32 = txt2img.run(loader.load(spec, engine="torch", precision="fp32"), batch)
    bf16_model = loader.load(spec, engine="torch", precision="bf16")
    assert bf16_model.components["denoiser"].module.transformer.dtype == torch.bfloat16
    value = psnr(fp32, txt2img.run(bf16_model, batch))
    assert value >= 30, f"bf16 vs fp32 PSNR {value:.1f} dB"


# ------------------------------------------------------------------ the cache


def key(**changes) -> EngineKey:
    base = dict(model="m", component="denoiser", kind="onnx", precision="fp32", weights="w" * 64,
                profile="{}", versions='{"torch":"2.13.0"}', device="any")
    return EngineKey(**{**base, **changes})


def test_cache_key_changes_exactly_with_its_parts():
    base = key()
    assert key().digest() == base.digest()
    assert key(model="another-id").digest() == base.digest()  # same weights, same artefact
    for part, value in dict(component="vae_decoder", kind="tensorrt", precision="fp16", weights="v" * 64,
                            profile='{"batch":[1,4]}', versions='{"torch":"2.14.0"}', device="cuda-sm90").items():
        assert key(**{part: value}).digest() != base.digest(), part


def copy_model(tmp_path: Path, model_id: str):
    spec = SHIPPED.get(model_id)
    dst = tmp_path / model_id
    shutil.copytree(spec.path, dst)
    from dataclasses import replace

    return replace(spec, path=dst)


def test_weights_change_rebuilds_only_the_components_it_touches(tmp_path):
    spec = copy_model(tmp_path, "tiny-ldm")
    cache = EngineCache(tmp_path / "cache")
    names = FAMILY_COMPONENTS[spec.family]

    def build_all():
        events = []
        builder = artefacts.builder(spec, cache, "cpu", events.append)
        paths = {n: builder.onnx(n) for n in names}
        return paths, {e.component: e.hit for e in events}

    first, hits = build_all()
    assert hits == {n: False for n in names}
    again, hits = build_all()
    assert again == first and hits == {n: True for n in names}

    # New denoiser weights: only the denoiser's graph is rebuilt.
    from safetensors.torch import load_file, save_file

    weights = spec.path / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights)
    rebuilt, hits = build_all()
    assert hits == {n: n != "denoiser" for n in names}
    assert rebuilt["denoiser"] != first["denoiser"]
    assert all(rebuilt[n] == first[n] for n in names if n != "denoiser")


def test_precision_and_device_are_separate_entries(tmp_path):
    """An fp16 graph (what TensorRT 11 builds strongly typed) is its own entry, traced in fp16."""
    import onnx

    spec = SHIPPED.get("tiny-mmdit")
    builder = artefacts.builder(spec, EngineCache(tmp_path), "cpu")
    fp32, fp16 = builder.onnx("vae_decoder", "fp32"), builder.onnx("vae_decoder", "fp16")
    assert fp32 != fp16
    graph = onnx.load(str(fp16)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert onnx.load(str(fp32)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "", "latent_height", "latent_width"]


def test_concurrent_builders_share_one_entry(tmp_path):
    """Two processes asking for the same entry at once: one builds, the other waits and hits."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.map(_build_in_process, [str(tmp_path)] * 2)
    assert sorted(hit for hit, _ in results) == [False, True]
    assert results[0][1] == results[1][1]


def _build_in_process(root: str):
    cache = EngineCache(root)
    import time

    def slow_build(tmp: Path) -> dict:
        time.sleep(1.0)
        (tmp / "artefact").write_text("x")
        return {}

    result = cache.get_or_build(key(), slow_build)
    return result.hit, str(result.path)


# ------------------------------------------------------------------ profiles (TensorRT, CUDA graphs)


def test_batch_buckets_and_profiles():
    assert batch_buckets(1) == [(1, 1)]
    assert batch_buckets(16) == [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16)]
    assert batch_buckets(12) == [(1, 1), (2, 2), (3, 4), (5, 8), (9, 12)]

    spec = SHIPPED.get("tiny-mmdit")  # sizes 32..128, default 64, max_batch 8
    layout = ModelLayout.read(spec)
    den = profiles(component_spec("denoiser", "mmdit", layout), layout, spec.limits, spec.defaults, spec.max_batch)
    assert [p.shapes["sample"][2][0] for p in den] == [1, 2, 4, 8, 16]  # cond + uncond rows
    sample = den[-1].shapes["sample"]
    assert sample == ((9, 4, 8, 8), (16, 4, 16, 16), (16, 4, 32, 32))  # latent 32/4 .. 128/4, opt 64/4
    tokens = layout.text_length + layout.t5_tokens
    assert den[0].shapes["encoder_hidden_states"][0] == (1, tokens, layout.context_width)
    dec = profiles(component_spec("vae_decoder", "mmdit", layout), layout, spec.limits, spec.defaults, spec.max_batch)
    assert [p.shapes["latent"][2][0] for p in dec] == [1, 2, 4, 8]

    assert select_profile(den, {"sample": (3, 4, 16, 16), "timestep": (3,), "pooled_projections": (3, layout.pooled_width),
                                "encoder_hidden_states": (3, tokens, layout.context_width)}) == 2
    with pytest.raises(ValueError):
        select_profile(den, {"sample": (1, 4, 64, 64)})  # beyond max_size
    assert Profile({"x": ((1, 2), (2, 2), (4, 2))}).fits({"x": (4, 2)})


def test_example_inputs_follow_the_profile_dims():
    spec = SHIPPED.get("tiny-ldm")
    layout = ModelLayout.read(spec)
    inputs = example_inputs(component_spec("denoiser", "ldm", layout), layout, batch=3, latent_hw=(8, 12))
    assert inputs["sample"].shape == (3, 4, 8, 12)
    assert inputs["encoder_hidden_states"].shape == (3, layout.text_length, layout.context_width)


# ------------------------------------------------------------------ selection


def test_selection_rules():
    spec = SHIPPED.get("shapes-mmdit")
    assert selection.requested(spec) == (spec.engine, spec.precision)
    assert selection.requested(spec, "onnxruntime", "") == ("onnxruntime", spec.precision)
    assert selection.requested(spec, "", "bf16") == (spec.engine, "bf16")
    with pytest.raises(selection.SelectionError, match="engine"):
        selection.requested(spec, "tensorflow")
    with pytest.raises(selection.SelectionError, match="precision"):
        selection.requested(spec, "", "int8")
    assert "CUDA" in selection.runnable("tensorrt", "fp16", "cpu")
    assert selection.runnable("onnxruntime", "bf16", "cpu")
    assert selection.runnable("torch", "fp16", "cpu")
    # Half precision on CUDA gave wrong images in the last GPU check: refused, with the reason.
    assert "wrong images" in selection.runnable("torch", "bf16", "cuda")
    assert selection.runnable("torch", "fp32", "cuda") is None
    assert selection.candidates("fp32", "cpu") == ["torch", "onnxruntime"]
    assert selection.candidates("bf16", "cpu") == ["torch"]
    assert selection.fastest({"torch": 0.2, "onnxruntime": 0.1}) == "onnxruntime"
    assert selection.fastest({"torch": 0.1, "onnxruntime": 0.1}) == "torch"


def test_unrunnable_choice_is_a_clear_error(tmp_path):
    with pytest.raises(EngineError, match="bf16"):
        artefacts.load(SHIPPED.get("tiny-mmdit"), engine="onnxruntime", precision="bf16", cache=EngineCache(tmp_path))


def test_auto_measures_once_then_reuses_the_measurement(tmp_path):
    spec = SHIPPED.get("tiny-ldm")
    cache = EngineCache(tmp_path)
    events = []
    model = artefacts.load(spec, engine="auto", cache=cache, on_event=events.append)
    timings = {e.kind: e.hit for e in events if e.kind.startswith("timing-")}
    assert timings == {"timing-torch": False, "timing-onnxruntime": False}
    measured = {}
    for kind in ("torch", "onnxruntime"):
        entry = next((tmp_path / spec.id / "denoiser").glob(f"timing-{kind}-fp32-*"))
        measured[kind] = json.loads((entry / "key.json").read_text())["info"]["seconds"]
    assert model.engine == selection.fastest(measured)

    events.clear()
    again = artefacts.load(spec, engine="auto", cache=cache, on_event=events.append)
    assert again.engine == model.engine
    assert not any(e.kind.startswith("timing-") and not e.hit for e in events)


# ------------------------------------------------------------------ GPU paths (skip without one)


@pytest.mark.skipif(not CUDA, reason="no CUDA device on this host (CI and dev machines are CPU-only)")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_graphs_match_fp32(precision):
    spec = SHIPPED.get("shapes-mmdit")
    batch = batch_for(spec, 3)  # a batch below its bucket: padded inside the graph
    ref = txt2img.run(loader.load(spec, engine="torch", precision="fp32", device="cuda", cuda_graphs=False), batch)
    graphed = loader.load(spec, engine="torch", precision=precision, device="cuda", cuda_graphs=True)
    assert type(graphed.components["denoiser"]).__name__ == "CudaGraphEngine"
    assert psnr(ref, txt2img.run(graphed, batch)) >= 30
    assert psnr(txt2img.run(graphed, batch), txt2img.run(graphed, batch)) == float("inf")


@pytest.mark.skipif(not (CUDA and find_spec("tensorrt")), reason="TensorRT needs the tensorrt package and a CUDA device")
def test_tensorrt_matches_torch(tmp_path):
    spec = SHIPPED.get("shapes-mmdit")
    batch = batch_for(spec)
    ref = txt2img.run(loader.load(spec, engine="torch", device="cuda"), batch)
    cache = EngineCache(tmp_path)
    trt32 = artefacts.load(spec, engine="tensorrt", precision="fp32", device="cuda", cache=cache)
    assert psnr(ref, txt2img.run(trt32, batch)) >= 40
    trt16 = artefacts.load(spec, engine="tensorrt", precision="fp16", device="cuda", cache=cache)
    assert psnr(ref, txt2img.run(trt16, batch)) >= 30


@pytest.mark.parametrize("field,value", [("engine", "tensorflow"), ("precision", "int4")])
def test_registry_names_a_known_engine_and_precision(tmp_path, field, value):
    from engines.registry import RegistryError

    manifest = json.loads((ROOT / "models" / "registry.json").read_text())
    entry = next(m for m in manifest["models"] if m["id"] == "tiny-mmdit")
    entry.update(path=str(ROOT / "models" / "tiny-mmdit"), **{field: value})
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"default": "tiny-mmdit", "models": [entry]}))
    with pytest.raises(RegistryError, match=field):
        load_registry(path)


def test_engines_alone_load_torch_and_ask_for_builders_otherwise(tmp_path):
    """engines never imports export: without its builders, an ONNX engine is a clear error."""
    spec = SHIPPED.get("tiny-ldm")
    with pytest.raises(EngineError, match="export.artefacts.load"):
        loader.load(spec, engine="onnxruntime", cache=EngineCache(tmp_path))
    assert loader.load(spec, engine="torch", cache=EngineCache(tmp_path)).engine == "torch"
