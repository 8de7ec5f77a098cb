"""DDPM and flow objectives against closed forms; samplers against hand computations."""

import math

import numpy as np
import pytest
import torch

from groupdiff_cli.science import samplers
from groupdiff_cli.science.objectives import DDPM, Flow

BETAS = np.linspace(1e-4, 0.02, 1000)  # DiT's linear schedule, written out independently
ACP = np.cumprod(1 - BETAS)


def test_forward_noising_matches_closed_form():
    d = DDPM()
    x0, eps = torch.randn(3, 4, 2, 2, dtype=torch.float64).float(), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    xt = d.q_sample(x0, t, eps)
    for i, step in enumerate(t.tolist()):
        expected = math.sqrt(ACP[step]) * x0[i] + math.sqrt(1 - ACP[step]) * eps[i]
        torch.testing.assert_close(xt[i], expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("step", [1, 10, 500, 999])
def test_posterior_is_the_bayes_product_of_the_two_gaussians(step):
    d = DDPM()
    x0, xt = torch.tensor([[0.7]]), torch.tensor([[-0.3]])
    mean, var, log_var = d.q_posterior(x0, xt, torch.tensor([step]))
    a, b, acp_prev = 1 - BETAS[step], BETAS[step], ACP[step - 1]
    # q(x_t | x_{t-1}) = N(sqrt(a) x_{t-1}, b), q(x_{t-1} | x0) = N(sqrt(acp_prev) x0, 1 - acp_prev)
    post_var = 1 / (a / b + 1 / (1 - acp_prev))
    post_mean = post_var * (math.sqrt(a) * -0.3 / b + math.sqrt(acp_prev) * 0.7 / (1 - acp_prev))
    assert float(var) == pytest.approx(post_var, rel=1e-6)
    assert float(mean) == pytest.approx(post_mean, rel=1e-5)
    assert float(log_var) == pytest.approx(math.log(post_var), rel=1e-6)


def test_respacing_keeps_alphas_cumprod_at_the_kept_steps():
    d = DDPM.respaced(250)
    assert len(d.timestep_map) == 250 and d.timestep_map[0] == 0 and d.timestep_map[-1] == 999
    np.testing.assert_allclose(d.alphas_cumprod, ACP[d.timestep_map], rtol=1e-12)
    assert d.model_time(torch.tensor([249])).item() == 999


def test_ddpm_sampler_reproduces_a_hand_computed_two_step_example():
    d = DDPM.respaced(2)  # steps 0 and 999
    assert list(d.timestep_map) == [0, 999]
    e, v = 0.3, 0.5  # constant network output: eps and the variance interpolation value
    seen = []

    def denoiser(x, t):
        seen.append(t.tolist())
        return torch.cat([torch.full_like(x, e), torch.full_like(x, v)], dim=1)

    z = torch.tensor([[[[0.8]]]])
    x_T = torch.tensor([[[[1.5]]]])
    out = samplers.run("ddpm", d, denoiser, x_T, lambda k: z, 2)
    assert seen == [[999.0], [0.0]]  # the network sees the original step indices

    # by hand: respaced betas b0 = 1 - acp[0], b1 = 1 - acp[999] / acp[0]
    a0, a1 = ACP[0], ACP[999]
    b1 = 1 - a1 / a0
    x = 1.5
    x0 = math.sqrt(1 / a1) * x - math.sqrt(1 / a1 - 1) * e
    post_var1 = b1 * (1 - a0) / (1 - a1)
    mean = b1 * math.sqrt(a0) / (1 - a1) * x0 + (1 - a0) * math.sqrt(1 - b1) / (1 - a1) * x
    frac = (v + 1) / 2
    log_var = frac * math.log(b1) + (1 - frac) * math.log(post_var1)
    x = mean + math.exp(0.5 * log_var) * 0.8
    # last step (t = 0): the mean only; acp_prev = 1, so the mean is the predicted x0
    x = math.sqrt(1 / a0) * x - math.sqrt(1 / a0 - 1) * e
    assert float(out) == pytest.approx(x, rel=1e-5)

    ddim = samplers.run("ddim", d, denoiser, x_T, lambda k: z, 2)
    x0 = math.sqrt(1 / a1) * 1.5 - math.sqrt(1 / a1 - 1) * e
    x1 = math.sqrt(a0) * x0 + math.sqrt(1 - a0) * e
    assert float(ddim) == pytest.approx(math.sqrt(1 / a0) * x1 - math.sqrt(1 / a0 - 1) * e, rel=1e-5)


def test_flow_interpolant_target_and_sit_convention():
    x0, eps, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([0.25, 1.0])
    xt = Flow.interpolate(x0, t, eps)
    torch.testing.assert_close(xt[0], 0.75 * x0[0] + 0.25 * eps[0])
    torch.testing.assert_close(xt[1], eps[1])  # t = 1 is noise
    torch.testing.assert_close(Flow.target(x0, eps), eps - x0)
    # a SiT network is fed its own time (1 - t) and predicts x0 - eps in its first channels
    assert Flow.network_time(torch.tensor([0.25])).item() == 0.75
    sit_out = torch.cat([x0 - eps, torch.zeros_like(x0)], dim=1)
    torch.testing.assert_close(Flow.velocity(sit_out, 4), eps - x0)


@pytest.mark.parametrize("sampler", ["ode", "heun"])
def test_flow_samplers_integrate_a_constant_field_exactly(sampler):
    c = torch.tensor([[[[0.5]], [[-2.0]]]])
    x1 = torch.tensor([[[[1.0]], [[3.0]]]])
    out = samplers.run(sampler, Flow(), lambda x, t: c.expand_as(x), x1, None, 7)
    torch.testing.assert_close(out, x1 - c)


def test_flow_samplers_converge_at_their_order_on_a_linear_field():
    a = 1.3  # v = a x  ->  x(0) = x(1) exp(-a)
    x1 = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    exact = math.exp(-a)

    def err(sampler, steps):
        return abs(float(samplers.run(sampler, Flow(), lambda x, t: a * x, x1, None, steps)) - exact)

    assert 1.8 < err("ode", 20) / err("ode", 40) < 2.2  # first order
    assert 3.6 < err("heun", 20) / err("heun", 40) < 4.4  # second order


def test_sde_sampler_with_the_exact_velocity_of_a_point_mass_ends_near_it():
    mu = 0.7
    torch.manual_seed(0)
    x1 = torch.randn(4000, 1, 1, 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)

    def v(x, t):  # data = mu: eps = (x - (1 - t) mu) / t, v = eps - mu = (x - mu) / t
        return (x - mu) / t[0]

    out = samplers.run("sde", Flow(), v, x1, lambda k: torch.randn(x1.shape, generator=gen, dtype=torch.float64), 250)
    # SiT's last step is a noise-free Euler step from t = 0.04: x(0) = mu - 0.04 eps
    assert abs(float(out.mean()) - mu) < 0.01
    assert 0.02 < float(out.std()) < 0.08


def test_unknown_sampler_names_the_objective():
    with pytest.raises(ValueError, match="--sampler sde does not fit the ddpm objective"):
        samplers.run("sde", DDPM.respaced(2), None, torch.zeros(1, 1, 1, 1), None, 2)
    with pytest.raises(ValueError, match="--sampler ddim does not fit the flow objective"):
        samplers.run("ddim", Flow(), None, torch.zeros(1, 1, 1, 1), None, 2)


def test_ddpm_loss_bound_trains_only_the_variance():
    from groupdiff_cli.science.objectives import normal_kl

    d = DDPM()
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 10, 900])
    xt = d.q_sample(x0, t, noise)
    out = torch.randn(3, 4, 4, 4, requires_grad=True)
    d.loss(out, x0, xt, t.float(), noise).sum().backward()
    mse_grad = 2 * (out[:, :2] - noise).detach() / (2 * 4 * 4)
    torch.testing.assert_close(out.grad[:, :2], mse_grad)  # the bound adds nothing to the eps channels
    assert out.grad[:, 2:].abs().sum() > 0  # ... but trains the variance channels
    m, lv = torch.randn(5), torch.randn(5)
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(5))
    # the closed form for two 1-d Gaussians
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(math.log(4.0)))
    assert float(kl) == pytest.approx(math.log(2.0) + (1 + 1) / 8 - 0.5, rel=1e-6)


def test_flow_loss_is_the_velocity_mse():
    x0, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    out = torch.cat([x0 - noise, torch.randn(2, 4, 2, 2)], dim=1)  # a perfect SiT-convention prediction
    assert torch.allclose(Flow().loss(out, x0, None, None, noise), torch.zeros(2), atol=1e-7)
    assert torch.allclose(Flow().loss(torch.zeros(2, 8, 2, 2), x0, None, None, noise),
                          (noise - x0).square().flatten(1).mean(1))


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_a_one_step_ddpm_sampler_runs(learn_sigma):
    d = DDPM.respaced(1, learn_sigma=learn_sigma)
    out = samplers.run("ddpm", d, lambda x, t: torch.zeros(x.shape[0], 2 if learn_sigma else 1, 1, 1),
                       torch.ones(1, 1, 1, 1), lambda k: torch.zeros(1, 1, 1, 1), 1)
    assert torch.isfinite(out).all()


def test_ddpm_noisy_maps_t_to_steps_and_t_at_one_to_the_last_step():
    # times jittered by --timestep-variance can reach t = 1 (and beyond before clamping)
    d = DDPM()
    x0, noise = torch.zeros(4, 1, 1, 1), torch.ones(4, 1, 1, 1)
    xt, t_net = d.noisy(x0, torch.tensor([0.0, 0.5, 1.0, 1.3]), noise)
    assert t_net.tolist() == [0.0, 500.0, 999.0, 999.0]
    torch.testing.assert_close(xt.flatten(), torch.tensor(np.sqrt(1 - ACP[[0, 500, 999, 999]]), dtype=torch.float32))


@pytest.mark.parametrize("name", [n for n, s in samplers.SAMPLERS.items() if s.evaluations_per_step])
def test_each_fixed_step_sampler_makes_the_evaluations_it_registers(name):
    ddpm = samplers.SAMPLERS[name].objective == "ddpm"
    objective = DDPM.respaced(5) if ddpm else Flow()
    calls = []

    def denoiser(x, t):  # DDPM: eps and variance channels; flow: the velocity
        calls.append(1)
        return torch.zeros(x.shape[0], (2 if ddpm else 1) * x.shape[1], *x.shape[2:])

    samplers.run(name, objective, denoiser, torch.ones(1, 1, 1, 1), lambda k: torch.zeros(1, 1, 1, 1), 5)
    assert len(calls) == samplers.evaluations(name, 5)


def test_dopri5_solves_a_linear_field_to_its_tolerance_and_is_adaptive():
    a = 1.3  # v = a x  ->  x(0) = x(1) exp(-a)
    x1 = torch.full((2, 1, 1, 1), 2.0)
    calls = []

    def v(x, t):
        calls.append(float(t[0]))
        return a * x

    out = samplers.run("dopri5", Flow(), v, x1, None, 250)
    torch.testing.assert_close(out, x1 * math.exp(-a), rtol=2e-3, atol=1e-5)
    assert samplers.evaluations("dopri5", 250) is None and len(calls) < 100  # --steps does not apply
    assert max(calls) == 1.0 and min(calls) >= 0.0  # from t = 1 (noise) towards t = 0


def test_the_registry_lists_samplers_per_objective_with_their_defaults():
    from groupdiff_cli.science.objectives import OBJECTIVES

    assert {s.objective for s in samplers.SAMPLERS.values()} == set(OBJECTIVES)
    for objective in OBJECTIVES:
        assert samplers.DEFAULT_SAMPLER[objective] in samplers.names_for(objective)
    assert samplers.names_for("flow") == ["sde", "sde-sbdm", "ode", "heun", "dopri5"]
