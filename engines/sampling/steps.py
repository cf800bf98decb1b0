"""Sampler step functions: pure, over a group of rows of one sampler at any steps.

Each takes the rows' stacked state (`Group`) and the denoiser's x0 for them, and returns the
rows one denoiser call later. Every per-row quantity is a [B] tensor broadcast with
`append_dims`, so rows at different sigmas share a call. Each follows the diffusers
scheduler of the same name update for update (the oracle tests hold them to it), in
k-diffusion's space (x = x0 + sigma * eps; flow models: their own sigma).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from engines.sampling.rows import Group, Row


def euler(g: Group, x0: torch.Tensor) -> list[Row]:
    """Euler on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn).

    Over DDIM's sigmas this is deterministic DDIM (Song et al. 2021); over rectified-flow
    sigmas it is SD3's flow-matching Euler, since (x - x0) / sigma is then the velocity."""
    d = (g.x - x0) / g.d(g.sigma)
    return g.advance(g.x + d * g.d(g.target - g.sigma), x0)


def ddim(g: Group, x0: torch.Tensor) -> list[Row]:
    """DDIM (Song et al. 2021, eq. 12) with each row's eta: eta 0 is Euler; eta > 0 adds
    fresh noise, drawn from the row's generator, as DDIMScheduler.step does."""
    eta = torch.tensor([r.eta for r in g.rows], dtype=g.x.dtype, device=g.x.device)
    if not bool((eta > 0).any()):
        return euler(g, x0)
    a_t, a_prev = 1 / (g.sigma**2 + 1), 1 / (g.target**2 + 1)
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    eps = (g.x - x0) / g.d(g.sigma)
    noise = torch.stack([torch.randn(g.x.shape[1:], generator=r.generator) if r.eta > 0 else torch.zeros(g.x.shape[1:])
                         for r in g.rows]).to(g.x)
    x = x0 + g.d(((1 - a_prev - std**2).clamp(min=0) / a_prev).sqrt()) * eps + g.d(std / a_prev.sqrt()) * noise
    return g.advance(x, x0)


def euler_ancestral(g: Group, x0: torch.Tensor) -> list[Row]:
    """Euler ancestral (k-diffusion's sample_euler_ancestral, eta 1): step down to sigma_down,
    then add noise up to the target, one draw per row per step as diffusers does."""
    s, s_to = g.sigma, g.target
    s_up = (s_to**2 * (s**2 - s_to**2) / s**2).sqrt()
    s_down = (s_to**2 - s_up**2).sqrt()
    d = (g.x - x0) / g.d(s)
    return g.advance(g.x + d * g.d(s_down - s) + g.noise() * g.d(s_up), x0)


@dataclass(frozen=True)
class HeunMemory:
    x_start: torch.Tensor  # where the step began
    d: torch.Tensor  # the slope there
    dt: torch.Tensor  # the step's length in sigma


def heun(g: Group, x0: torch.Tensor) -> list[Row]:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1): an Euler predictor, then a
    corrector at the target averaging both slopes; the step to sigma 0 is Euler alone.
    N steps are 2N - 1 denoiser calls. Rows in either stage share a call."""
    d = (g.x - x0) / g.d(g.sigma)
    out = []
    for i, r in enumerate(g.rows):
        if r.memory is None:
            dt = g.target[i] - g.sigma[i]
            x = g.x[i] + d[i] * dt
            if float(g.target[i]) == 0:
                out.append(replace(r, x=x, sigma=0.0, t=None, step=r.step + 1, calls=r.calls + 1, denoised=x0[i]))
            else:  # predictor: evaluate again at the target before the step counts
                out.append(replace(r, x=x, sigma=float(g.target[i]), t=r.t_at(r.step + 1), calls=r.calls + 1,
                                   memory=HeunMemory(g.x[i], d[i], dt), denoised=x0[i]))
        else:
            m = r.memory
            x = m.x_start + (m.d + d[i]) / 2 * m.dt
            out.append(replace(r, x=x, sigma=float(g.sigma_next[i]), t=r.t_at(r.step + 1), step=r.step + 1,
                               calls=r.calls + 1, memory=None, denoised=x0[i]))
    return out


@dataclass(frozen=True)
class DpmMemory:
    x0: torch.Tensor  # the previous step's denoised estimate
    sigma: float  # the sigma it was made at


def _dpmpp_2m(g: Group, x0: torch.Tensor, sde: bool) -> list[Row]:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; midpoint form as diffusers), or its SDE
    variant with a noise draw per row per step. First order at a row's first step (no history
    yet) and its last (final sigma 0), second order between, as DPMSolverMultistepScheduler."""
    def vp(s):  # k-diffusion sigma -> VP alpha_t, sigma_t and lambda = log(alpha_t / sigma_t)
        alpha = 1 / (s**2 + 1).sqrt()
        return alpha, s * alpha, -s.log()

    alpha_s, sig_s, lam_s = vp(g.sigma)
    alpha_t, sig_t, lam_t = vp(g.target)
    h = lam_t - lam_s
    has = torch.tensor([r.memory is not None for r in g.rows], device=g.x.device) & ~g.last
    m1 = torch.stack([r.memory.x0 if r.memory is not None else x0[i] for i, r in enumerate(g.rows)])
    s1 = torch.tensor([r.memory.sigma if r.memory is not None else r.sigma for r in g.rows],
                      dtype=g.sigma.dtype, device=g.x.device)
    r0 = (lam_s - (-s1.log())) / h
    d1 = torch.where(g.d(has), (x0 - m1) / g.d(torch.where(has, r0, torch.ones_like(r0))), torch.zeros_like(x0))
    x_vp = g.x * g.d(alpha_s)
    if sde:
        x_t = (g.d(sig_t / sig_s * (-h).exp()) * x_vp + g.d(alpha_t * (1 - (-2 * h).exp())) * (x0 + 0.5 * d1)
               + g.d(sig_t * (1 - (-2 * h).exp()).sqrt()) * g.noise())
    else:
        x_t = g.d(sig_t / sig_s) * x_vp - g.d(alpha_t * ((-h).exp() - 1)) * (x0 + 0.5 * d1)
    memory = [DpmMemory(x0[i], r.sigma) for i, r in enumerate(g.rows)]
    return g.advance(x_t / g.d(alpha_t), x0, memory)


def dpmpp_2m(g: Group, x0: torch.Tensor) -> list[Row]:
    return _dpmpp_2m(g, x0, sde=False)


def dpmpp_2m_sde(g: Group, x0: torch.Tensor) -> list[Row]:
    return _dpmpp_2m(g, x0, sde=True)


def flow_lcm(g: Group, x0: torch.Tensor) -> list[Row]:
    """Consistency multistep for flow models (FlowMatchLCMScheduler): jump to the denoised
    estimate, then re-noise it to the target with fresh noise from the row's generator."""
    return g.advance(g.d(1 - g.target) * x0 + g.d(g.target) * g.noise(), x0)


@dataclass(frozen=True)
class UniPCMemory:
    last_sample: torch.Tensor  # the VP sample the last predictor started from
    x0s: tuple[torch.Tensor, ...]  # the last x0 estimates, newest last
    sigmas: tuple[float, ...]  # the sigmas they were made at
    order: int  # the last predictor's order


def _vp(s: float) -> tuple[float, float, float]:
    """k-diffusion sigma -> VP alpha_t, sigma_t, lambda_t (lambda = inf at sigma 0)."""
    alpha = (s * s + 1) ** -0.5
    return alpha, s * alpha, math.inf if s == 0 else -math.log(s)


def _bh2(h: float, order: int) -> tuple[float, float, list[float]]:
    """UniPC's h*phi_1, B(h) and b vector for the bh2 variant, data prediction (hh = -h)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / h_phi_1)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, h_phi_1, b


def _unipc_update(x: torch.Tensor, m0: torch.Tensor, s0: float, older: list[tuple[torch.Tensor, float]],
                  target: float, rhos: list[float], m_t: torch.Tensor | None = None) -> torch.Tensor:
    """x_t = sigma_t / sigma_s0 x - alpha_t h phi_1 m0 - alpha_t B(h) (sum rho_k D_k [+ rho_t D_t])."""
    alpha_t, sig_t, lam_t = _vp(target)
    _, sig_s0, lam_s0 = _vp(s0)
    h = lam_t - lam_s0
    h_phi_1, b_h, _ = _bh2(h, 1)
    res = torch.zeros_like(x)
    for (mi, si), rho in zip(older, rhos):
        res = res + rho * (mi - m0) / ((_vp(si)[2] - lam_s0) / h)
    if m_t is not None:
        res = res + rhos[-1] * (m_t - m0)
    return sig_t / sig_s0 * x - alpha_t * h_phi_1 * m0 - alpha_t * b_h * res


def unipc(g: Group, x0: torch.Tensor) -> list[Row]:
    """UniPC (Zhao et al. 2023), bh2, data prediction, order 2: a corrector (UniC) on the
    current sample using this call's x0 (no extra call), then the predictor (UniP); first and
    last steps first order, as UniPCMultistepScheduler. Per row, in VP space."""
    out = []
    for i, r in enumerate(g.rows):
        s, target, m = r.sigma, float(g.target[i]), r.memory
        x = g.x[i] * _vp(s)[0]
        if m is not None:  # UniC with order m.order: rhos solve R rho = b (order 1: rho = 0.5)
            x_prev, s_prev = m.x0s[-1], m.sigmas[-1]
            older = list(zip(m.x0s[-2::-1], m.sigmas[-2::-1]))[: m.order - 1]
            if m.order == 1:
                rhos = [0.5]
            else:
                h = _vp(s)[2] - _vp(s_prev)[2]
                rks = [(_vp(si)[2] - _vp(s_prev)[2]) / h for _, si in older] + [1.0]
                _, _, b = _bh2(h, m.order)
                matrix = torch.tensor([[rk ** k for rk in rks] for k in range(m.order)], dtype=torch.float64)
                rhos = torch.linalg.solve(matrix, torch.tensor(b, dtype=torch.float64)).tolist()
            x = _unipc_update(m.last_sample, x_prev, s_prev, older, s, rhos, m_t=x0[i])
        x0s = ((m.x0s if m else ()) + (x0[i],))[-2:]
        sigmas = ((m.sigmas if m else ()) + (s,))[-2:]
        order = min(2, r.steps - r.step, r.step + 1)  # warm-up first, lower order at the end
        older = [(x0s[0], sigmas[0])] if order == 2 else []
        x_next = _unipc_update(x, x0s[-1], s, older, target, [0.5] if order == 2 else [])
        out.append(replace(r, x=x_next / _vp(target)[0], sigma=float(g.sigma_next[i]), t=r.t_at(r.step + 1),
                           step=r.step + 1, calls=r.calls + 1, memory=UniPCMemory(x, x0s, sigmas, order),
                           denoised=x0[i]))
    return out
