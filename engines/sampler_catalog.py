"""Which samplers and schedules exist, by the names diffusers, ComfyUI and A1111 users know.

Torch-free (the API validates requests with it). Each sampler follows one diffusers scheduler:
its schedule (engines.schedules asks that scheduler) and its update (engines.sampling.steps).
The schedules a sampler accepts are the options its diffusers scheduler takes; any other
combination is a request error (tests/test_samplers.py checks this table against diffusers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Request `schedule` values -> the scheduler options each sets ("default": the model's config).
SCHEDULE_OPTIONS: dict[str, dict] = {
    "default": {},
    "leading": {"timestep_spacing": "leading"},
    "trailing": {"timestep_spacing": "trailing"},
    "linspace": {"timestep_spacing": "linspace"},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    # Evenly spaced flow sigmas 1, 1 - 1/N, ..., 1/N given to the scheduler as custom sigmas:
    # the fixed timesteps a few-step distilled (turbo) model was trained on.
    "turbo": {},
}
_SPACINGS = ("default", "leading", "trailing", "linspace")
_ALL = (*_SPACINGS, "karras", "exponential")


@dataclass(frozen=True)
class SamplerInfo:
    name: str
    family: str  # "vp" (eps / v models) or "flow" (rectified flow)
    scheduler: str  # the diffusers scheduler class it follows
    schedules: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    fixed: tuple[tuple[str, object], ...] = ()  # scheduler options the sampler implies
    stochastic: bool = False  # draws noise each step, from each image's own generator
    calls_per_step: int = 1  # Heun: 2

    def calls(self, steps: int) -> int:
        """Denoiser calls for `steps` steps, as diffusers counts steps (Heun: 2N - 1)."""
        return steps * self.calls_per_step - (self.calls_per_step - 1)


CATALOG: dict[str, SamplerInfo] = {s.name: s for s in (
    SamplerInfo("ddim", "vp", "DDIMScheduler", _SPACINGS, ("DDIMScheduler",), stochastic=True),
    SamplerInfo("euler", "vp", "EulerDiscreteScheduler", _ALL, ("k_euler", "EulerDiscreteScheduler")),
    SamplerInfo("euler_ancestral", "vp", "EulerAncestralDiscreteScheduler", _SPACINGS,
                ("euler_a", "Euler a", "k_euler_a", "k_euler_ancestral", "EulerAncestralDiscreteScheduler"),
                stochastic=True),
    SamplerInfo("heun", "vp", "HeunDiscreteScheduler", _ALL, ("k_heun", "HeunDiscreteScheduler"), calls_per_step=2),
    SamplerInfo("dpmpp_2m", "vp", "DPMSolverMultistepScheduler", _ALL,
                ("DPM++ 2M", "k_dpmpp_2m", "dpmsolver++", "DPMSolverMultistepScheduler"),
                fixed=(("algorithm_type", "dpmsolver++"), ("solver_order", 2))),
    SamplerInfo("dpmpp_2m_sde", "vp", "DPMSolverMultistepScheduler", _ALL,
                ("DPM++ 2M SDE", "k_dpmpp_2m_sde", "sde-dpmsolver++"),
                fixed=(("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2)), stochastic=True),
    SamplerInfo("unipc", "vp", "UniPCMultistepScheduler", _ALL, ("UniPC", "unipc_bh2", "UniPCMultistepScheduler"),
                fixed=(("solver_type", "bh2"), ("predict_x0", True), ("solver_order", 2))),
    SamplerInfo("flow_euler", "flow", "FlowMatchEulerDiscreteScheduler", ("default", "karras", "exponential", "turbo"),
                ("euler", "FlowMatchEulerDiscreteScheduler")),
    SamplerInfo("flow_lcm", "flow", "FlowMatchLCMScheduler", ("default", "karras", "exponential", "turbo"),
                ("lcm", "consistency", "FlowMatchLCMScheduler"), stochastic=True),
    SamplerInfo("flow_heun", "flow", "FlowMatchHeunDiscreteScheduler", ("default",),
                ("heun", "FlowMatchHeunDiscreteScheduler"), calls_per_step=2),
)}

FAMILY_KIND = {"ldm": "vp", "mmdit": "flow"}  # registry family -> sampler family


def family_samplers(family: str) -> tuple[str, ...]:
    """Every sampler a model family serves (every model of the family serves all of them)."""
    return tuple(s.name for s in CATALOG.values() if s.family == FAMILY_KIND[family])


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9+]", "", name.lower())


def canonical(name: str, family: str) -> str | None:
    """The canonical sampler for `name` or an alias in a model family, None if it has none.
    "euler" is flow_euler for a flow model, as ComfyUI's list means it."""
    kind = FAMILY_KIND[family]
    for info in CATALOG.values():
        if info.family == kind and _key(name) in {_key(info.name), *map(_key, info.aliases)}:
            return info.name
    return None
