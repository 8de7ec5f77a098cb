"""Diffusion objectives: DDPM (DiT) and flow matching (SiT), behind one interface.

Time convention of this project, in every user-facing option: t in [0, 1] with
t = 1 pure noise and t = 0 data. DDPM's integer steps map to it through t / 1000.

Every objective answers, for training (t: our time, one per image):

* ``noisy(x0, t, noise) -> (x_t, t_net)``: the noisy input and the network's time input;
* ``loss(out, x0, x_t, t_net, noise)``: the per-image training loss of the network output;
* ``prediction_error(out, x0, noise)``: the per-image MSE of the prediction against its
  target (the held-out denoising loss);

and, for sampling, where a sampler (``samplers.py``) calls a denoiser (x, t_model)
with t_model in the objective's own time units (DDPM: the step index; flow: our t):
``network_time(t_model)``, ``unit_time(t_model)`` (our t, for the guidance interval)
and ``prediction(out, channels)`` (what the objective's samplers integrate).

* ``DDPM``: 1000-step linear beta schedule, epsilon prediction with learned variance
  (ADM/DiT's "learned range": the model's extra channels interpolate between the
  posterior and the beta variance in log space); respaced for sampling.
* ``Flow``: linear interpolant x_t = (1 - t) x0 + t eps, velocity target eps - x0.
  The network itself is called as SiT is (its time input is 1 - t and it predicts
  the data-ward velocity x0 - eps), so official SiT checkpoints load and fine-tune
  unchanged; the conversion happens here and nowhere else.

Which objective a run uses is chosen once (``for_model``), recorded in the run's
config.json and read back by ``of_run``; ``create`` builds it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from groupdiff_cli.science.models import FAMILIES, MODELS

OBJECTIVES = ("ddpm", "flow")


def _gather(arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """arr[t] as float32 broadcastable to ``like``."""
    out = torch.as_tensor(arr, dtype=torch.float64)[t.long().cpu()].to(device=like.device, dtype=torch.float32)
    return out.view(-1, *([1] * (like.dim() - 1)))


# --------------------------------------------------------------------------- #
#  DDPM                                                                        #
# --------------------------------------------------------------------------- #
class DDPM:
    """Gaussian diffusion with a linear beta schedule (ADM/DiT), float64 tables.

    ``use_timesteps`` respaces the process (ADM's SpacedDiffusion): the kept steps
    get new betas so that their alphas_cumprod are unchanged, and the network is
    still called with the original step index.
    """

    name = "ddpm"

    def __init__(self, num_timesteps: int = 1000, learn_sigma: bool = True, use_timesteps: Sequence[int] | None = None):
        scale = 1000 / num_timesteps
        betas = np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
        self.base_num_timesteps = num_timesteps
        self.learn_sigma = learn_sigma
        self.timestep_map = np.arange(num_timesteps)
        if use_timesteps is not None:
            acp = np.cumprod(1.0 - betas)
            kept = sorted(set(int(t) for t in use_timesteps))
            last, new_betas = 1.0, []
            for t in kept:
                new_betas.append(1 - acp[t] / last)
                last = acp[t]
            betas = np.array(new_betas)
            self.timestep_map = np.array(kept)
        self.betas = betas
        self.num_timesteps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the posterior variance is 0 at t = 0: clip its log with the next value (a
        # one-step process has none: use the beta variance there)
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:]) if len(pv) > 1 else betas)
        # ADM's fixed "large" variance, for models without learned sigma
        self.large_log_variance = np.log(np.append(pv[1], betas[1:]) if len(pv) > 1 else betas)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    @classmethod
    def respaced(cls, steps: int, num_timesteps: int = 1000, learn_sigma: bool = True) -> "DDPM":
        """``steps`` evenly strided steps of the ``num_timesteps`` process (ADM's
        ``space_timesteps(T, [steps])``: rounded multiples of (T - 1) / (steps - 1))."""
        if not 1 <= steps <= num_timesteps:
            raise ValueError(f"--steps {steps} is outside [1, {num_timesteps}] for the ddpm objective")
        if steps == 1:
            return cls(num_timesteps, learn_sigma, [0])
        stride, cur, kept = (num_timesteps - 1) / (steps - 1), 0.0, []
        for _ in range(steps):  # accumulated as ADM does, so the rounding is the same
            kept.append(round(cur))
            cur += stride
        return cls(num_timesteps, learn_sigma, kept)

    def model_time(self, i: torch.Tensor) -> torch.Tensor:
        """Respaced index -> the original step index the network was trained on."""
        return torch.as_tensor(self.timestep_map, device=i.device)[i.long()].float()

    # forward process --------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) eps."""
        return _gather(np.sqrt(self.alphas_cumprod), t, x0) * x0 + _gather(np.sqrt(1 - self.alphas_cumprod), t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0)."""
        mean = _gather(self.posterior_mean_coef1, t, xt) * x0 + _gather(self.posterior_mean_coef2, t, xt) * xt
        return mean, _gather(self.posterior_variance, t, xt), _gather(self.posterior_log_variance_clipped, t, xt)

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return _gather(self.sqrt_recip_alphas_cumprod, t, xt) * xt - _gather(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps

    def p_mean_variance(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Network output (eps [, variance values]) -> mean, log variance, x0 of p(x_{t-1} | x_t)."""
        c = xt.shape[1]
        eps = out[:, :c]
        if self.learn_sigma:
            frac = (out[:, c : 2 * c] + 1) / 2
            min_log = _gather(self.posterior_log_variance_clipped, t, xt)
            max_log = _gather(np.log(self.betas), t, xt)
            log_var = frac * max_log + (1 - frac) * min_log
        else:  # fixed "large" variance, as ADM without learned sigma
            log_var = _gather(self.large_log_variance, t, xt).expand_as(xt)
        x0 = self.predict_x0(xt, t, eps)
        mean, _, _ = self.q_posterior(x0, xt, t)
        return mean, log_var, x0, eps

    # the interface -----------------------------------------------------------
    def noisy(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        """t in [0, 1] per image (CPU) -> (x_t, the step index as the network's float time)."""
        steps = self.num_timesteps
        t_int = (t.clamp(0, 1) * steps).long().clamp(max=steps - 1).to(x0.device)  # t = 1: the last step
        return self.q_sample(x0, t_int, noise), t_int.float()

    def prediction_error(self, out: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-image epsilon MSE on the latent channels."""
        return (out[:, :x0.shape[1]] - noise).square().flatten(1).mean(1)

    def loss(self, out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t_net: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
        """Per-image loss: eps MSE, plus (learn_sigma) ADM's variational bound term in
        bits per dim with the predicted mean detached, so that the bound trains only
        the variance (the 'hybrid' loss of DiT)."""
        c = x0.shape[1]
        mse = self.prediction_error(out, x0, noise)
        if not self.learn_sigma:
            return mse
        t = t_net.long()
        frozen = torch.cat([out[:, :c].detach(), out[:, c:2 * c]], dim=1)
        mean, log_var, _, _ = self.p_mean_variance(frozen.float(), xt, t)
        true_mean, _, true_log_var = self.q_posterior(x0, xt, t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(1) / math.log(2.0)
        return mse + torch.where(t == 0, nll, kl)

    @staticmethod
    def network_time(t_model: torch.Tensor) -> torch.Tensor:
        return t_model  # the original step index (``model_time``)

    def unit_time(self, t_model: torch.Tensor) -> float:
        return float(t_model[0]) / self.base_num_timesteps

    @staticmethod
    def prediction(out: torch.Tensor, channels: int) -> torch.Tensor:
        return out  # eps and the variance values: ``p_mean_variance`` reads both


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] discretised to 256 bins (ADM's decoder term)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# --------------------------------------------------------------------------- #
#  Flow matching (SiT)                                                         #
# --------------------------------------------------------------------------- #
class Flow:
    """Linear interpolant x_t = (1 - t) x0 + t eps, v = eps - x0 (t = 1 is noise)."""

    name = "flow"

    def __init__(self, learn_sigma: bool = True):
        self.learn_sigma = learn_sigma  # official SiT checkpoints carry 8 channels; the first 4 are used

    @staticmethod
    def interpolate(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        t = t.view(-1, *([1] * (x0.dim() - 1)))
        return (1 - t) * x0 + t * noise

    @staticmethod
    def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0

    @staticmethod
    def velocity(out: torch.Tensor, channels: int) -> torch.Tensor:
        """Network output (SiT's data-ward velocity, maybe with sigma channels) -> our v."""
        return -out[:, :channels]

    # the interface -----------------------------------------------------------
    def noisy(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        """t in [0, 1] per image -> (x_t, SiT's time 1 - t)."""
        t = t.clamp(0, 1).to(x0.device)
        return self.interpolate(x0, t, noise), self.network_time(t)

    def prediction_error(self, out: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-image MSE between the predicted and the true velocity eps - x0."""
        return (self.velocity(out, x0.shape[1]) - self.target(x0, noise)).square().flatten(1).mean(1)

    def loss(self, out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t_net: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
        return self.prediction_error(out, x0, noise)

    @staticmethod
    def network_time(t: torch.Tensor) -> torch.Tensor:
        """Our t -> the time a SiT network was trained on (its t = 1 is data)."""
        return 1 - t

    @staticmethod
    def unit_time(t_model: torch.Tensor) -> float:
        return float(t_model[0])

    @staticmethod
    def sde_drift(x: torch.Tensor, vel: torch.Tensor, t: float, w: float) -> torch.Tensor:
        """The reverse SDE's drift v - w score at time t for diffusion coefficient w; on this
        path score = -(x + (1 - t) v) / t, so the drift is v + w/t (x + (1 - t) v)."""
        return vel + (w / t) * (x + (1 - t) * vel)

    prediction = velocity  # the samplers integrate our velocity


def create(name: str, learn_sigma: bool = True, sampling_steps: int | None = None):
    """The objective ``name``; DDPM respaced to ``sampling_steps`` when given (flow has
    no discrete steps: its samplers take them)."""
    if name == "ddpm":
        return DDPM.respaced(sampling_steps, learn_sigma=learn_sigma) if sampling_steps else DDPM(learn_sigma=learn_sigma)
    if name == "flow":
        return Flow(learn_sigma=learn_sigma)
    raise ValueError(f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}")


def for_model(model_name: str, requested: str | None = None) -> str:
    """The objective a run of registry model ``model_name`` trains with: ``requested``,
    or its family's (DiT: ddpm, SiT: flow)."""
    if requested is not None and requested not in OBJECTIVES:
        raise ValueError(f"objective {requested!r}: choose from {', '.join(OBJECTIVES)}")
    return requested or FAMILIES[MODELS[model_name]["family"]]


def of_run(info: dict) -> str:
    """The objective recorded in a run's config.json (``checkpoints.load_model``'s
    description); official checkpoints: the model family's."""
    return info.get("train", {}).get("objective") or FAMILIES[info["model"]["family"]]
