"""What a worker serves: each model loaded once through its engine (and its guide model), its
engine published as a metric, and warmed up so the first request pays no first-call costs."""

from __future__ import annotations

import logging
import time

import torch

from engines import selection
from engines.cache import EngineCache
from engines.components import component_spec, example_inputs
from engines.layout import ModelLayout
from engines.model import LoadedModel
from engines.registry import ModelSpec, Registry
from engines.tasks import inpaint, superres, txt2img, video
from export import artefacts
from service.config import Settings
from service.metrics import WorkerExporter

log = logging.getLogger("latentserve.worker")


def load_models(registry: Registry, model_ids: list[str], settings: Settings,
                exporter: WorkerExporter) -> dict[str, LoadedModel]:
    cache = EngineCache(settings.engine_cache or None)
    models = {}
    for model_id in model_ids:
        started = time.perf_counter()
        spec = registry.get(model_id)
        if "txt2video" in spec.tasks:
            model = load_video(spec, settings)
        else:
            model = artefacts.load_with_guide(
                registry, spec, engine=settings.engine, precision=settings.precision,
                device=settings.device, cache=cache, on_event=exporter.engine_lookup,
                threads=settings.torch_threads, cuda_graphs=bool(settings.cuda_graphs),
            )
        exporter.engine_info.labels(model_id, model.engine, model.precision, model.device).set(1)
        models[model_id] = model
        log.info("loaded %s on %s %s (%s) in %.2fs; warm-up %.2fs", model_id, model.engine, model.precision,
                 model.device, time.perf_counter() - started, warm_up(model))
    return models


def load_video(spec: ModelSpec, settings: Settings) -> LoadedModel:
    """A txt2video model (an AnimateDiff directory) through engines.tasks.video, on torch: the
    registry allows no other engine for it, and a worker-wide override is not applied to it."""
    engine, precision = selection.requested(spec, settings.engine, settings.precision)
    if engine != "torch":
        log.warning("%s: video models run on torch; engine %s applies to the image models only", spec.id, engine)
    return video.load(spec, precision, settings.device)


def warm_up(model: LoadedModel) -> float:
    """One short generation at the default size, so the first request pays no first-call costs;
    on CUDA graphs, every batch bucket's graph of the denoiser and the VAE decoder captured at
    the default size (a capture during serving would stall every row of the step)."""
    d = model.spec.defaults
    batch = txt2img.Txt2ImgBatch(d.width, d.height, d.sampler, 2,
                                 [txt2img.ImageRequest("warm up", "", 0, d.guidance_scale)])
    started = time.perf_counter()
    if "txt2video" in model.spec.tasks:  # its rows are [C, F, h, w]: a short video of the default length
        video.run(model, video.VideoBatch(batch, d.num_frames, model.spec.max_batch))
    elif inpaint.dedicated(model):  # an inpainting UNet needs its mask channels
        blank = torch.zeros(1, 3, d.height, d.width)
        inpaint.run(model, inpaint.InpaintBatch(batch, blank, torch.ones(1, 1, d.height, d.width)))
    elif superres.is_upscaler(model):  # an upscaler needs its low-res image
        f = model.vae_scale_factor
        superres.run(model, superres.SuperresBatch(batch, torch.zeros(1, 3, d.height // f, d.width // f), [20]))
    else:
        txt2img.run(model, batch)
    graphs = 0
    for name, engine in model.components.items():
        if hasattr(engine, "capture_all") and name in ("denoiser", "vae_decoder"):
            layout = ModelLayout.read(model.spec)
            hw = (d.height // layout.vae_scale_factor, d.width // layout.vae_scale_factor)
            inputs = example_inputs(component_spec(name, model.spec.family, layout), layout, 1, hw)
            upto = model.spec.max_batch if name == "vae_decoder" else None  # decodes: at most a batch of images
            graphs += engine.capture_all(upto, **{k: v.to(model.device) for k, v in inputs.items()})
    if graphs:
        log.info("%s: captured %d CUDA graphs at %dx%d", model.spec.id, graphs, d.width, d.height)
    return time.perf_counter() - started
