"""Live previews: a job that asked for them (`preview: true`) gets, in each progress event,
its first image's current x0 estimate (the denoiser's prediction of the clean latents at that
step, kept on the row as `denoised`) as a small PNG at latent resolution:

    "preview": {"mime": "image/png", "data": "<base64 PNG>", "width": w, "height": h}

The projection is the model's fitted latent -> RGB map (engines.latent_preview): one 3 x C
matrix product per preview, no VAE call, so a preview costs a small fraction of a step
(bench/previews.py measures it). A model without a map (or whose map was fitted to another
VAE) sends no previews: its progress events are as without the option. Jobs that did not ask
pay one dictionary look-up per step.
"""

from __future__ import annotations

import base64
import logging

import torch

from engines import latent_preview
from engines.model import LoadedModel
from engines.sampling import Row
from service.active import Active
from service.media import encode_image

log = logging.getLogger("latentserve.worker")


class Previews:
    """Each served model's latent -> RGB map, read once when the worker starts."""

    def __init__(self, models: dict[str, LoadedModel]):
        self.maps: dict[str, latent_preview.LatentRGB | None] = {}
        for model_id, model in models.items():
            self.maps[model_id] = latent_preview.load(model.spec.path, model.vae.scaling_factor,
                                                      model.vae.shift_factor)
            if self.maps[model_id] is None:
                log.info("%s: no %s; its jobs get no previews", model_id, latent_preview.FILENAME)

    def of(self, model: LoadedModel, jobs: list[Active]) -> dict[str, dict]:
        """job id -> the preview its next progress event carries, for the jobs that asked."""
        wanted = [a for a in jobs if a.job.request.get("preview")]
        rgb_map = self.maps.get(model.spec.id) if wanted else None
        if rgb_map is None:
            return {}
        return {a.job.id: preview(rgb_map, a.rows[0]) for a in wanted if a.rows and a.rows[0].denoised is not None}


def estimate(row: Row) -> torch.Tensor:
    """The row's x0 estimate as its image will look: a training-free inpainting row keeps the
    input's latents outside its mask, as its last step will."""
    x0 = row.denoised
    if row.known is not None:
        x0 = row.known.mask * x0 + (1 - row.known.mask) * row.known.x0
    return x0


@torch.inference_mode()
def preview(rgb_map: latent_preview.LatentRGB, row: Row) -> dict:
    pixels = rgb_map(estimate(row)).numpy()
    data, mime = encode_image(pixels, "png")
    height, width = pixels.shape[:2]
    return {"mime": mime, "data": base64.b64encode(data).decode(), "width": width, "height": height}
