"""Samplers: functions that integrate a denoiser from noise (t = 1) to data (t = 0).

A sampler is ``run(objective, denoiser, x, noise, steps) -> x_0``. ``denoiser(x,
t_model)`` returns the objective's ``prediction`` for the batch x at the objective's
own time t_model (``sampling.make_denoiser`` wraps the network with guidance and group
sizes into one); ``noise(k)`` gives the fresh noise of stochastic step k, drawn per
image. Each sampler is registered with the objective it integrates and the network
evaluations it makes per step.

To add a sampler: write the function here and register it with ``@sampler(...)``;
`sample`, `study` and `attention` take it by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from groupdiff_cli.science.objectives import _gather

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]  # step index -> noise like x (per-sample seeded)

SDE_LAST_STEP = 0.04  # SiT/REPA's SDE: Euler-Maruyama down to t = 0.04, then one mean step
DOPRI5_TOLERANCES = dict(atol=1e-6, rtol=1e-3)  # SiT's ODE defaults


@dataclass(frozen=True)
class Sampler:
    name: str
    objective: str  # the objective whose prediction it integrates
    evaluations_per_step: int | None  # None: adaptive, not known in advance
    run: Callable
    help: str


SAMPLERS: dict[str, Sampler] = {}
DEFAULT_SAMPLER = {"ddpm": "ddpm", "flow": "sde"}  # DiT's and SiT's


def sampler(name: str, objective: str, evaluations_per_step: int | None, help: str):
    """Register the decorated function as sampler ``name``."""
    def register(fn):
        SAMPLERS[name] = Sampler(name, objective, evaluations_per_step, fn, help)
        return fn
    return register


def names_for(objective: str) -> list[str]:
    return [s.name for s in SAMPLERS.values() if s.objective == objective]


def check(name: str, objective: str, model: str | None = None) -> Sampler:
    """The sampler ``name`` if it fits ``objective``; else a ValueError naming --sampler."""
    s = SAMPLERS.get(name)
    if s is None or s.objective != objective:
        of = f" of {model}" if model else ""
        raise ValueError(f"--sampler {name} does not fit the {objective} objective{of}; choose from "
                         f"{', '.join(names_for(objective))}")
    return s


def evaluations(name: str, steps: int) -> int | None:
    """Network evaluations of a run of ``steps`` steps (None for adaptive samplers)."""
    per = SAMPLERS[name].evaluations_per_step
    return None if per is None else per * steps


def run(name: str, objective, denoiser: Denoiser, x: torch.Tensor, noise: NoiseFn | None, steps: int):
    """Integrate from x = pure noise to data with sampler ``name``."""
    if steps < 1:
        raise ValueError(f"--steps {steps} must be >= 1")
    return check(name, objective.name).run(objective, denoiser, x, noise, steps)


# --------------------------------------------------------------------------- #
#  DDPM: the respaced objective's steps (``objectives.create(..., steps)``)    #
# --------------------------------------------------------------------------- #
def _ddpm_reverse(objective, denoiser, x, noise, stochastic: bool):
    for k, i in enumerate(reversed(range(objective.num_timesteps))):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        out = denoiser(x, objective.model_time(t))
        mean, log_var, x0, eps = objective.p_mean_variance(out, x, t)
        if stochastic:
            x = mean + (torch.exp(0.5 * log_var) * noise(k) if i > 0 else 0)
        else:  # DDIM, eta = 0
            acp_prev = _gather(objective.alphas_cumprod_prev, t, x)
            x = torch.sqrt(acp_prev) * x0 + torch.sqrt(1 - acp_prev) * eps
    return x


@sampler("ddpm", "ddpm", 1, "ancestral, learned variance")
def ddpm_ancestral(objective, denoiser, x, noise, steps):
    return _ddpm_reverse(objective, denoiser, x, noise, stochastic=True)


@sampler("ddim", "ddpm", 1, "DDIM, eta = 0")
def ddim(objective, denoiser, x, noise, steps):
    return _ddpm_reverse(objective, denoiser, x, noise, stochastic=False)


# --------------------------------------------------------------------------- #
#  Flow: the denoiser returns our velocity v(x, t), dx/dt = v                  #
# --------------------------------------------------------------------------- #
def _velocity_at(denoiser, x, t):
    return denoiser(x, torch.full((x.shape[0],), float(t), device=x.device))


SBDM_CLAMP = (1e-4, 0.999)  # the GroupDiff release clamps t here before w(t) = t / (1 - t)


def _flow_euler_maruyama(objective, denoiser, x, noise, steps, w):
    """dx = [v - w(t) score] dt + sqrt(2 w(t)) dW backwards in t, Euler-Maruyama from
    t = 1 to t = 0.04 on ``steps`` grid points, then one mean step (no noise) to t = 0.
    The drift is the objective's (``sde_drift``): the path's algebra lives there."""
    grid = np.linspace(1.0, SDE_LAST_STEP, steps) if steps > 1 else np.array([1.0])

    def drift(x, t):
        return objective.sde_drift(x, _velocity_at(denoiser, x, t), t, w(t))

    for k, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        h = t - t_next
        x = x - h * drift(x, t) + math.sqrt(2 * w(t) * h) * noise(k)
    t = grid[-1]
    return x - t * drift(x, t)  # last step: the mean, no noise


@sampler("sde", "flow", 1, "Euler-Maruyama with w(t) = t (SiT's and REPA's) to t=0.04, then a mean step")
def flow_sde(objective, denoiser, x, noise, steps):
    return _flow_euler_maruyama(objective, denoiser, x, noise, steps, lambda t: t)


@sampler("sde-sbdm", "flow", 1, "Euler-Maruyama with the SBDM w(t) = t/(1-t), t clamped to [1e-4, 0.999] (the "
                                "GroupDiff release's), to t=0.04, then a mean step")
def flow_sde_sbdm(objective, denoiser, x, noise, steps):
    def w(t):
        t = min(max(t, SBDM_CLAMP[0]), SBDM_CLAMP[1])
        return t / (1 - t)

    return _flow_euler_maruyama(objective, denoiser, x, noise, steps, w)


@sampler("ode", "flow", 1, "Euler")
def flow_euler(objective, denoiser, x, noise, steps):
    grid = np.linspace(1.0, 0.0, steps + 1)
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x - (t - t_next) * _velocity_at(denoiser, x, t)
    return x


@sampler("heun", "flow", 2, "Heun: Euler predictor, trapezoid corrector")
def flow_heun(objective, denoiser, x, noise, steps):
    grid = np.linspace(1.0, 0.0, steps + 1)
    for t, t_next in zip(grid[:-1], grid[1:]):
        h = t - t_next
        vel = _velocity_at(denoiser, x, t)
        x_pred = x - h * vel
        x = x - h * 0.5 * (vel + _velocity_at(denoiser, x_pred, t_next))
    return x


@sampler("dopri5", "flow", None, "adaptive Dormand-Prince through torchdiffeq at SiT's tolerances, as SiT's ODE "
                                 "sampler but with time clamped to [0, 1] (SiT's evaluates past it; ~1e-4 apart); "
                                 "--steps does not apply")
def flow_dopri5(objective, denoiser, x, noise, steps):
    """From t = 1 to t = 0 with the adaptive step sizes of torchdiffeq's dopri5 at
    SiT's tolerances (atol 1e-6, rtol 1e-3); --steps does not apply. torchdiffeq's
    last step may reach past t = 0 and interpolate back: there the field is continued
    as v(x, 0), so the network never sees a time outside [0, 1]."""
    # lazy: torchdiffeq adds ~1 s to start-up and only dopri5 needs it
    from torchdiffeq import odeint

    times = torch.tensor([1.0, 0.0], dtype=torch.float64, device=x.device)
    path = odeint(lambda t, y: _velocity_at(denoiser, y, min(max(float(t), 0.0), 1.0)), x, times,
                  method="dopri5", **DOPRI5_TOLERANCES)
    return path[-1]
