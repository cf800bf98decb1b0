"""Guidance per row: CFG, autoguidance, APG and none, each with a guidance interval, equal to
their formulas computed from the networks called directly, and rows guided differently share
calls exactly as if each ran alone."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from engines import loader
from engines.guidance import Guidance, apg_update, evaluator, interval_from_fraction
from engines.registry import load_registry
from engines.sampling import sample, start
from engines.schedules import make_schedule
from engines.tasks.txt2img import ImageRequest, Txt2ImgBatch, run
from service.config import ROOT

REGISTRY = load_registry(ROOT / "models" / "registry.json")


@pytest.fixture(scope="module")
def model():
    return loader.load_with_guide(REGISTRY, REGISTRY.get("shapes-mmdit"))


def rows_for(model, guidances: list[Guidance], sigma_index: int = 5):
    prompts = ["a red circle", "a blue star on the left", "a green square", "a pink triangle"][: len(guidances)]
    cond = model.encode_prompts(prompts).rows()
    uncond = model.encode_prompts([""] * len(prompts)).rows()
    guide_cond = model.guide.encode_prompts(prompts).rows()
    schedule = make_schedule(model.scheduler_config, "flow_euler", 10)
    out = []
    for k, g in enumerate(guidances):
        noise = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(k))
        row = start(noise, schedule, "flow_euler", cond=cond[k], uncond=uncond[k], guide_cond=guide_cond[k], guidance=g)
        out.append(replace(row, sigma=float(schedule.sigmas[sigma_index])))
    return out


@torch.no_grad()
def test_each_mode_is_its_formula_over_direct_network_calls(model):
    w = 3.0
    rows = rows_for(model, [Guidance("cfg", w), Guidance("autoguidance", w), Guidance("none", w),
                            Guidance("apg", w, apg_momentum=0.0, apg_eta=1.0)])
    counter = [0]
    x0, _ = evaluator(model.denoiser, model.guide.denoiser, counter)(rows)
    x = torch.stack([r.x for r in rows])
    sigma = torch.tensor([r.sigma for r in rows])
    d1 = model.denoiser(x, sigma, Conditioning_stack([r.cond for r in rows]))
    d_unc = model.denoiser(x, sigma, Conditioning_stack([r.uncond for r in rows]))
    d0 = model.guide.denoiser(x, sigma, Conditioning_stack([r.guide_cond for r in rows]))
    tol = dict(atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(x0[0], d_unc[0] + w * (d1[0] - d_unc[0]), **tol)  # CFG
    torch.testing.assert_close(x0[1], d0[1] + w * (d1[1] - d0[1]), **tol)  # autoguidance: w D1 + (1 - w) D0
    torch.testing.assert_close(x0[2], d1[2], **tol)  # none
    torch.testing.assert_close(x0[3], d_unc[3] + w * (d1[3] - d_unc[3]), **tol)  # APG, eta 1, no momentum: CFG
    assert counter[0] == 4 + 2 + 1  # cond rows, uncond for cfg and apg, one guide row


def Conditioning_stack(parts):
    from engines.conditioning import Conditioning

    return Conditioning.stack(parts)


def test_apg_drops_the_parallel_part_and_keeps_momentum():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    out, avg = apg_update(cond, uncond, 5.0, Guidance("apg", 5.0, apg_momentum=-0.5), None)
    update = (out - cond) / 4.0
    assert abs(float((update * cond).sum())) < 1e-3 * float(update.norm() * cond.norm())  # orthogonal to cond
    out2, avg2 = apg_update(cond, uncond, 5.0, Guidance("apg", 5.0, apg_momentum=-0.5), avg)
    torch.testing.assert_close(avg2, (cond - uncond) - 0.5 * avg)
    capped, _ = apg_update(cond, uncond, 5.0, Guidance("apg", 5.0, apg_norm_threshold=0.5), None)
    assert float((capped - cond).norm()) <= 4.0 * 0.5 + 1e-4  # the update's norm is at most r


@torch.no_grad()
def test_outside_its_interval_a_row_sends_only_its_conditional_half(model):
    schedule = make_schedule(model.scheduler_config, "flow_euler", 10)
    lo, hi = interval_from_fraction(schedule.sigmas, 0.2, 0.6)  # steps 2, 3, 4, 5
    inside = [lo < float(s) <= hi for s in schedule.sigmas[:-1]]
    assert inside == [False, False, True, True, True, True, False, False, False, False]
    counter = [0]
    rows = rows_for(model, [Guidance("cfg", 4.0, lo, hi)] * 2, sigma_index=0)
    sample(evaluator(model.denoiser, None, counter), rows)
    assert counter[0] == 2 * 10 + 2 * 4  # the unconditional half only in 4 of the 10 steps


@torch.no_grad()
def test_rows_guided_differently_share_calls_as_if_each_ran_alone(model):
    images = [ImageRequest("a red circle on the left", "", 1, 4.0),
              ImageRequest("a blue star", "", 2, 3.0, guidance="autoguidance"),
              ImageRequest("a green square", "", 3, 4.0, guidance_interval_fraction=(0.3, 0.8)),
              ImageRequest("a yellow circle", "", 4, 5.0, guidance="apg"),
              ImageRequest("a cyan triangle", "", 5, 4.0, guidance="none")]
    together = run(model, Txt2ImgBatch(64, 64, "flow_euler", 8, images)).numpy().astype(int)
    for k, image in enumerate(images):
        alone = run(model, Txt2ImgBatch(64, 64, "flow_euler", 8, [image])).numpy()[0].astype(int)
        assert abs(together[k] - alone).max() <= 2, k


def test_fraction_intervals_cover_exactly_their_steps():
    sigmas = torch.linspace(1, 0, 11)
    lo, hi = interval_from_fraction(sigmas, 0.0, 1.0)
    assert lo == 0.0 and hi == 1.0
    assert interval_from_fraction(sigmas, 0.5, 0.5) == (0.0, 0.0)
    assert not Guidance("cfg", 4.0, *interval_from_fraction(sigmas, 0.5, 0.55)).active(float(sigmas[6]))
    assert math.isinf(Guidance().sigma_hi)
