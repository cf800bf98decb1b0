"""Our schedules visit the same sigmas and timesteps as the diffusers schedulers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from engines.denoisers import DiscreteVPDenoiser
from engines.schedules import make_schedule, vp_alphas_cumprod, vp_sigmas

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("spacing,offset,alpha_one", [
    ("leading", 1, False), ("leading", 0, True), ("linspace", 0, False), ("trailing", 0, True)])
@pytest.mark.parametrize("steps", [4, 20, 50])
def test_ddim_schedule_follows_ddim_timesteps(spacing, offset, alpha_one, steps):
    config = dict(SD, timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=alpha_one)
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(steps)
    alphas = scheduler.alphas_cumprod[scheduler.timesteps]
    expected = ((1 - alphas) / alphas) ** 0.5
    final = scheduler.final_alpha_cumprod
    ours = make_schedule(config, "ddim", steps)
    torch.testing.assert_close(ours.sigmas[:-1], expected.float())
    torch.testing.assert_close(ours.sigmas[-1], ((1 - final) / final) ** 0.5)
    # Each step lands on t - 1000 // steps, which the next listed timestep need not be.
    prev = scheduler.timesteps - 1000 // steps
    a_prev = torch.where(prev >= 0, scheduler.alphas_cumprod[prev.clamp(min=0)], final)
    torch.testing.assert_close(ours.targets, (((1 - a_prev) / a_prev) ** 0.5).float())


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_euler_schedule_matches_euler_discrete(spacing, beta_schedule):
    config = dict(SD, timestep_spacing=spacing, steps_offset=1, beta_schedule=beta_schedule)
    scheduler = EulerDiscreteScheduler(**config)
    scheduler.set_timesteps(12)
    ours = make_schedule(config, "euler", 12)
    torch.testing.assert_close(ours.sigmas, scheduler.sigmas.float())
    assert ours.noise_scale == pytest.approx(float(scheduler.init_noise_sigma))


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [4, 28])
def test_flow_schedule_matches_flow_match_euler(shift, steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    ours = make_schedule(dict(scheduler.config), "flow_euler", steps)
    torch.testing.assert_close(ours.sigmas, scheduler.sigmas.float())
    assert ours.noise_scale == 1.0


def test_sigma_to_t_inverts_the_training_table():
    config = dict(SD)
    denoiser = DiscreteVPDenoiser(lambda x, t, c: x, vp_sigmas(vp_alphas_cumprod(config)))
    ts = torch.tensor([0, 1, 17, 500, 999])
    torch.testing.assert_close(denoiser.sigma_to_t(denoiser.sigmas[ts]), ts.float(), atol=1e-3, rtol=0)
    assert np.isclose(float(denoiser.sigma_to_t(denoiser.sigmas[10:12].mean())), 10.5, atol=0.05)
