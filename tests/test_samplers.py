"""Samplers: each one's final latents equal the diffusers scheduler it follows (same network,
noise, steps and generators), rows at different steps share calls exactly, and the catalog's
schedule table says what diffusers' schedulers really take."""

from __future__ import annotations

import inspect
import json

import diffusers
import pytest
import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from engines.denoisers import DiscreteVPDenoiser, FlowDenoiser
from engines.sampler_catalog import CATALOG, SCHEDULE_OPTIONS, canonical
from engines.guidance import plain
from engines.sampling import call_inputs, sample, start, step_rows
from engines.schedules import ScheduleError, make_schedule
from service.config import ROOT
from tests.device import DEVICE, DTYPE, latent_tolerance, report

MODELS = ROOT / "models"
SEEDS = [3, 11]


def conds(c: torch.Tensor, n: int, shared: bool) -> torch.Tensor:
    """Each row's own conditioning, or row 0's for every row (rows then differ only in noise)."""
    return c[:1].expand(n, *c.shape[1:]) if shared else c[:n]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class VP:
    """tiny-ldm's UNet, called by diffusers' loop and wrapped by our denoiser alike."""

    def __init__(self, **overrides):
        self.unet = UNet2DConditionModel.from_pretrained(MODELS / "tiny-ldm" / "unet").eval().to(DEVICE, DTYPE)
        config = json.loads((MODELS / "tiny-ldm" / "scheduler" / "scheduler_config.json").read_text())
        self.config = {**config, **overrides}
        self.cond = torch.randn(len(SEEDS), 8, self.unet.config.cross_attention_dim,
                                generator=torch.Generator().manual_seed(0)).to(DEVICE)
        self.shape = (4, 8, 8)

    def net(self, x, t, cond):
        return self.unet(x.to(DTYPE), t.to(DEVICE), encoder_hidden_states=cond.to(DTYPE)).sample.float()

    def denoiser(self, shared: bool = False):
        vp = DiscreteVPDenoiser.from_scheduler_config(self.net, self.config)
        return lambda x, sigma, t=None: vp(x, sigma, conds(self.cond, len(x), shared), t)

    def to_latents(self, rows):
        x = torch.stack([r.x for r in rows])
        end = torch.tensor([float(r.schedule.sigmas[-1]) for r in rows], device=x.device)
        return x * ((end**2 + 1) ** -0.5).view(-1, 1, 1, 1)


class Flow:
    def __init__(self, **overrides):
        self.net_ = SD3Transformer2DModel.from_pretrained(MODELS / "tiny-mmdit" / "transformer").eval().to(DEVICE, DTYPE)
        config = json.loads((MODELS / "tiny-mmdit" / "scheduler" / "scheduler_config.json").read_text())
        self.config = {**config, **overrides}
        g = torch.Generator().manual_seed(0)
        c = self.net_.config
        self.cond = torch.randn(len(SEEDS), 8, c.joint_attention_dim, generator=g).to(DEVICE)
        self.pooled = torch.randn(len(SEEDS), c.pooled_projection_dim, generator=g).to(DEVICE)
        self.shape = (c.in_channels, 8, 8)

    def net(self, x, t, cond):
        embeds, pooled = cond if isinstance(cond, tuple) else (self.cond[: len(x)], self.pooled[: len(x)])
        return self.net_(hidden_states=x.to(DTYPE), timestep=t.to(DEVICE), encoder_hidden_states=embeds.to(DTYPE),
                         pooled_projections=pooled.to(DTYPE)).sample.float()

    def denoiser(self, shared: bool = False):
        flow = FlowDenoiser(self.net)
        return lambda x, sigma, t=None: flow(x, sigma, (conds(self.cond, len(x), shared),
                                                         conds(self.pooled, len(x), shared)), t)

    def to_latents(self, rows):
        return torch.stack([r.x for r in rows])


def diffusers_loop(model, sampler: str, steps: int, schedule: str, eta: float) -> torch.Tensor:
    """The scheduler's own loop, as a pipeline runs it, with one generator per image."""
    info = CATALOG[sampler]
    cls = getattr(diffusers, info.scheduler)
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    scheduler = cls.from_config(config, **dict(info.fixed), **SCHEDULE_OPTIONS[schedule])
    if schedule == "turbo":
        scheduler.set_timesteps(sigmas=[1 - k / steps for k in range(steps)], device=DEVICE)
    else:
        scheduler.set_timesteps(steps, device=DEVICE)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    latents = randn_tensor((len(SEEDS), *model.shape), generator=generators, device=torch.device(DEVICE))
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    extra = {"eta": eta} if sampler == "ddim" else {}
    if "generator" in inspect.signature(scheduler.step).parameters:
        extra["generator"] = generators
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        t_in = t.expand(len(SEEDS)) if torch.is_tensor(t) else torch.full((len(SEEDS),), t)
        out = model.net(model_in, t_in, model.cond)
        latents = scheduler.step(out, t, latents, **extra).prev_sample
    return latents


def our_rows(model, sampler: str, steps: int, schedule: str, eta: float):
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    sched = make_schedule(model.config, sampler, steps, schedule)
    return [start(torch.randn(model.shape, generator=g).to(DEVICE), sched, sampler, g, eta) for g in generators]


CASES = [
    ("ddim", 12, "default", 0.0), ("ddim", 10, "trailing", 0.0), ("ddim", 8, "linspace", 1.0),
    ("euler", 10, "default", 0.0), ("euler", 9, "karras", 0.0), ("euler", 8, "trailing", 0.0),
    ("euler", 7, "exponential", 0.0),
    ("euler_ancestral", 10, "default", 0.0), ("euler_ancestral", 8, "linspace", 0.0),
    ("heun", 6, "default", 0.0), ("heun", 5, "karras", 0.0),
    ("dpmpp_2m", 10, "default", 0.0), ("dpmpp_2m", 20, "karras", 0.0), ("dpmpp_2m", 8, "trailing", 0.0),
    ("dpmpp_2m_sde", 10, "default", 0.0), ("dpmpp_2m_sde", 12, "karras", 0.0),
    ("unipc", 10, "default", 0.0), ("unipc", 12, "karras", 0.0), ("unipc", 3, "trailing", 0.0),
    ("flow_euler", 10, "default", 0.0), ("flow_euler", 8, "karras", 0.0),
    ("flow_heun", 6, "default", 0.0),
    ("flow_euler", 4, "turbo", 0.0), ("flow_lcm", 4, "turbo", 0.0), ("flow_lcm", 6, "default", 0.0),
]


@pytest.mark.parametrize("sampler,tol", [("euler", 1e-4), ("dpmpp_2m", 1e-4), ("unipc", 1e-4), ("ddim", 1e-3)])
def test_zero_terminal_snr_v_prediction_schedules_match_diffusers(sampler, tol):
    """SD 2.x's zero-terminal-SNR recipe (Lin et al. 2024): rescaled betas, trailing spacing,
    v-prediction. The infinite top sigma is clamped as diffusers' Euler does (DDIM in diffusers
    keeps alpha_T = 0: the clamp costs it ~1e-4)."""
    model = VP(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    with torch.no_grad():
        expected = diffusers_loop(model, sampler, 8, "default", 0.0)
        rows = sample(plain(model.denoiser()), our_rows(model, sampler, 8, "default", 0.0))
    err = rel_err(model.to_latents(rows), expected)
    report("zero_snr_oracle", sampler=sampler, rel_err=err)
    assert err < latent_tolerance(tol)


@pytest.fixture(scope="module")
def models():
    return {"vp": VP(), "flow": Flow()}


@pytest.mark.parametrize("sampler,steps,schedule,eta", CASES, ids=[f"{c[0]}-{c[2]}-{c[1]}" for c in CASES])
def test_each_sampler_matches_its_diffusers_scheduler(models, sampler, steps, schedule, eta):
    model = models[CATALOG[sampler].family]
    with torch.no_grad():
        expected = diffusers_loop(model, sampler, steps, schedule, eta)
        rows = sample(plain(model.denoiser()), our_rows(model, sampler, steps, schedule, eta))
    ours = model.to_latents(rows)
    err = rel_err(ours, expected)
    report("oracle", sampler=sampler, steps=steps, schedule=schedule, rel_err=err)
    assert err < latent_tolerance(1e-4), err
    assert all(r.calls == CATALOG[sampler].calls(steps) for r in rows)
    # Sensitive: the other image's latents differ completely.
    assert rel_err(ours[0], expected[1]) > 0.1


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "unipc", "euler_ancestral", "flow_heun"])
def test_rows_at_different_steps_share_a_call_as_if_each_ran_alone(models, sampler):
    """Row 0 runs 3 calls alone first; then both rows run together to the end."""
    model = models[CATALOG[sampler].family]
    denoise = model.denoiser(shared=True)
    with torch.no_grad():
        alone = [sample(plain(denoise), [row])[0] for row in our_rows(model, sampler, 8, "default", 0.0)]
        rows = our_rows(model, sampler, 8, "default", 0.0)
        for _ in range(3):
            rows[:1] = sample_calls(denoise, rows[:1], 1)
        assert rows[0].calls == 3 and rows[1].calls == 0
        together = sample(plain(denoise), rows)
    errs = [rel_err(b.x, a.x) for a, b in zip(alone, together)]
    report("per_row", sampler=sampler, rel_err=max(errs))
    assert max(errs) < latent_tolerance(1e-5)


def sample_calls(denoise, rows, n):
    for _ in range(n):
        x = torch.stack([r.x for r in rows])
        rows = step_rows(rows, denoise(x, *call_inputs(rows, x.device)))
    return rows


def test_the_schedule_table_is_what_diffusers_schedulers_take():
    for info in CATALOG.values():
        accepted = inspect.signature(getattr(diffusers, info.scheduler).__init__).parameters
        for name, options in SCHEDULE_OPTIONS.items():
            if name == "turbo":  # custom sigmas: flow schedulers whose set_timesteps takes them
                takes = "sigmas" in inspect.signature(getattr(diffusers, info.scheduler).set_timesteps).parameters
                assert (name in info.schedules) == (takes and info.family == "flow"), info.name
                continue
            assert (name in info.schedules) == all(k in accepted for k in options), (info.name, name)
    with pytest.raises(ScheduleError, match="karras"):
        make_schedule(VP().config, "ddim", 10, "karras")


def test_aliases_resolve_per_family():
    assert canonical("Euler a", "ldm") == "euler_ancestral"
    assert canonical("DPM++ 2M SDE", "ldm") == "dpmpp_2m_sde"
    assert canonical("euler", "mmdit") == "flow_euler" and canonical("euler", "ldm") == "euler"
    assert canonical("dpmpp_2m", "mmdit") is None
