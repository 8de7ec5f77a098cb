"""Released files as they are: the GroupDiff authors' .pth, REPA's SiT; their convention,
their entries, their sampling settings (the SBDM SDE, per-call sample rows, the guidance
interval on three channels)."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from groupdiff_cli.cli import main
from groupdiff_cli.jobs.sampling import Guidance, make_denoiser, sample_groups
from groupdiff_cli.plumbing.defaults import SAMPLE_PRESETS
from groupdiff_cli.science import samplers
from groupdiff_cli.science.checkpoints import load_model
from groupdiff_cli.science.models import SAMPLE_EMBED_KEY
from groupdiff_cli.science.objectives import Flow
from groupdiff_cli.science.official import flip_flow_convention, load_pretrained, time_flip_matrix
from tests.helpers import random_model, write_dataset

KW = dict(input_size=8, in_channels=4, num_classes=10, max_group_size=4)


def their_layout(sd: dict) -> dict:
    """Our state dict under the release's names: every key under ``denoiser.``, the sample
    table as their LabelEmbedder's."""
    renamed = {("sample_embedder.embedding_table.weight" if k == SAMPLE_EMBED_KEY else k): v for k, v in sd.items()}
    return {f"denoiser.{k}": v for k, v in renamed.items()}


@pytest.fixture(scope="module")
def release_sit(tmp_path_factory):
    """A SiT in the release's layout and convention: ``ema`` and ``raw`` are two networks
    (the test's reference for what the file means: fed t with t = 1 noise, they predict
    eps - x0), saved as model_ema and model."""
    ema = random_model("SiT-Mi/2", learn_sigma=False, **KW)
    raw = random_model("SiT-Mi/2", learn_sigma=False, **KW)
    with torch.no_grad():
        for p in raw.parameters():
            p.add_(0.01)
    path = tmp_path_factory.mktemp("release") / "gdiff-l-4-sit-mi-2.pth"
    torch.save({"model": their_layout(raw.state_dict()), "model_ema": their_layout(ema.state_dict()),
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 79}, path)
    return path, ema, raw


def their_prediction(net, x, t, y, ids):
    """What the release's network predicts at their time t (= ours, t = 1 noise): eps - x0."""
    with torch.no_grad():
        return net(x, t, y, group_size=1, sample_ids=ids)


def our_velocity(model, x, t, y, ids):
    """What the loaded model predicts through our flow objective at our t: eps - x0."""
    with torch.no_grad():
        out = model(x, Flow.network_time(t), y, group_size=1, sample_ids=ids)
    return Flow.prediction(out, x.shape[1])


def inputs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.tensor([0.15, 0.3, 0.62, 0.9])[:n],
            torch.randint(0, 11, (n,), generator=g), torch.randint(0, 4, (n,), generator=g))


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_the_release_sit_loads_and_predicts_what_it_predicted_in_its_convention(release_sit, weights):
    path, ema, raw = release_sit
    model, info = load_model(path, weights)
    assert info["train"] == dict(group_size=4, group_mode="l", official=True, source="groupdiff")
    assert info["official"]["entry"] == ("model_ema" if weights == "ema" else "model")
    assert info["official"]["converted"] and info["model"]["family"] == "SiT"
    assert model.max_group_size == 4 and not model.learn_sigma
    assert info["dataset"]["vae"] == "stabilityai/sd-vae-ft-mse"
    x, t, y, ids = inputs()
    want = their_prediction(ema if weights == "ema" else raw, x, t, y, ids)
    # exact up to float32: both networks compute sinusoids of their own time in float32
    # (sin of 1 - s and the reflection of sin of s round differently, by ~1e-7)
    torch.testing.assert_close(our_velocity(model, x, t, y, ids), want, atol=1e-5, rtol=1e-4)
    # the test can fail: the other entry, or the file read without the time flip, differ
    other = their_prediction(raw if weights == "ema" else ema, x, t, y, ids)
    assert (other - want).abs().max() > 1e-3
    unflipped = their_prediction(ema, x, 1 - t, y, ids)
    assert (unflipped - their_prediction(ema, x, t, y, ids)).abs().max() > 1e-3


def test_the_conversion_is_an_exact_reflection():
    m = time_flip_matrix(256)
    torch.testing.assert_close(m @ m, torch.eye(256, dtype=torch.float64), atol=1e-12, rtol=0)
    sd = random_model("SiT-Mi/2", learn_sigma=True, **KW).state_dict()
    twice = flip_flow_convention(flip_flow_convention(sd))
    for k, v in sd.items():
        torch.testing.assert_close(twice[k], v, atol=1e-6, rtol=1e-6)
    once = flip_flow_convention(sd)
    # learned-variance channels (the second half of each patch's outputs) keep their sign
    w = sd["final_layer.linear.weight"].view(4, 8, -1)  # 2x2 patch, 8 channels
    torch.testing.assert_close(once["final_layer.linear.weight"].view(4, 8, -1)[:, :4], -w[:, :4])
    torch.testing.assert_close(once["final_layer.linear.weight"].view(4, 8, -1)[:, 4:], w[:, 4:])


def test_the_release_dit_is_read_off_its_tensors_and_kept_as_it_is(tmp_path):
    net = random_model("DiT-Mi/2", learn_sigma=True, **KW)
    path = tmp_path / "gdiff-l-4-sit-named-but-a-dit.pth"  # the file name says nothing
    torch.save({"model": their_layout(net.state_dict()), "model_ema": their_layout(net.state_dict()), "epoch": 1},
               path)
    model, info = load_model(path)
    assert info["model"]["family"] == "DiT" and info["official"]["converted"] is False
    for k, v in net.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(ValueError, match=r"--model SiT-Mi/2: .*holds a DiT \(with learned variance, groupdiff"):
        load_pretrained(path, name="SiT-Mi/2")


def test_a_file_without_ema_says_so_and_a_stray_tensor_is_named(tmp_path, release_sit):
    _, ema, _ = release_sit
    sd = their_layout(ema.state_dict())
    torch.save({"model": sd, "model_ema": None, "epoch": 1}, tmp_path / "a.pth")
    _, info = load_model(tmp_path / "a.pth")
    assert info["official"]["entry"] == "model"
    assert any("has no EMA weights" in n for n in info["official"]["notes"])
    torch.save({"model_ema": sd}, tmp_path / "b.pth")
    with pytest.raises(ValueError, match="--weights model: .*b.pth holds only EMA weights"):
        load_model(tmp_path / "b.pth", "model")
    torch.save({"model_ema": dict(sd, **{"denoiser.blocks.0.attn.q_norm.weight": torch.ones(32)})}, tmp_path / "c.pth")
    with pytest.raises(ValueError, match=r"c.pth: checkpoint does not fit SiT-Mi/2: .*unexpected keys "
                                         r"\['blocks.0.attn.q_norm.weight'\]"):
        load_model(tmp_path / "c.pth")


def repa_file(path: Path, net) -> Path:
    """A REPA training save: model, ema, opt, args, steps; the projector heads beside.
    REPA's SiT has no sample embedding: ``net``'s is zeroed, so that it computes what the file holds."""
    with torch.no_grad():
        net.s_embedder.weight.zero_()
    sd = {k: v for k, v in net.state_dict().items() if k != SAMPLE_EMBED_KEY}
    heads = {"projectors.0.0.weight": torch.randn(64, 128), "projectors.0.0.bias": torch.zeros(64),
             "projectors.0.2.weight": torch.randn(64, 64), "projectors.0.4.weight": torch.randn(16, 64)}
    torch.save({"model": {**sd, **heads}, "ema": {**sd, **heads}, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="SiT-XL/2", encoder_depth=8), "steps": 4_000_000}, path)
    return path


def test_repa_sit_loads_converted_without_its_heads(tmp_path):
    net = random_model("SiT-Mi/2", learn_sigma=False, input_size=8, in_channels=4, num_classes=10)
    path = repa_file(tmp_path / "last.pt", net)
    model, info = load_model(path)
    assert info["official"]["layout"] == "repa" and info["official"]["converted"]
    assert info["official"]["new_tensors"] == [SAMPLE_EMBED_KEY] and info["train"]["group_size"] == 1
    assert any("projector" in n for n in info["official"]["notes"])
    x, t, y, _ = inputs()
    ids = torch.zeros(4, dtype=torch.long)  # a zero sample table: any rows give the file's network
    torch.testing.assert_close(our_velocity(model, x, t, y, ids), their_prediction(net, x, t, y, ids),
                               atol=1e-5, rtol=1e-4)


def test_train_fine_tunes_repa_sit_with_the_authors_initialisation(tmp_path):
    data = write_dataset(tmp_path / "data")
    net = random_model("SiT-Ti/2", learn_sigma=False, input_size=8, in_channels=4, num_classes=4)
    path = repa_file(tmp_path / "repa.pt", net)
    assert CliRunner().invoke(main, ["neighbours", str(data), "--k", "8", "--cpu"]).exit_code == 0
    res = CliRunner().invoke(main, [
        "train", "--data", str(data), "--preset", "release-sit-finetune", "--model", "SiT-Ti/2", "--init-from",
        str(path), "--neighbours-k", "8", "--global-batch-size", "8", "--group-buffer", "16", "--max-steps", "1",
        "--ckpt-every", "1", "--results-dir", str(tmp_path / "runs"), "--run-name", "ft", "--cpu", "--lr", "1e-9"])
    assert res.exit_code == 0, res.output
    assert "dropped REPA's 4 projector tensors" in res.output and "repa layout" in res.output
    cfg = json.loads((tmp_path / "runs" / "ft" / "config.json").read_text())
    assert cfg["train"]["no_decay_rule"] == "release" and cfg["train"]["max_group_size"] == 4
    assert cfg["train"]["timestep_variance"] == 0.0 and cfg["train"]["init_sample_embed_std"] == 0.02
    assert cfg["train"]["grouping"] == "neighbours" and cfg["train"]["batch_composition"] == "separate"
    tuned, _ = load_model(tmp_path / "runs" / "ft", "model")
    table = tuned.s_embedder.weight.detach()
    assert table.shape == (4, 192) and 0.01 < float(table.std()) < 0.03  # N(0, 0.02), not zeros
    # one step at lr 1e-9 leaves the converted network where the file put it
    x, t, y, _ = inputs()
    y = y % 4
    ids = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        tuned.s_embedder.weight.zero_()
    torch.testing.assert_close(our_velocity(tuned, x, t, y, ids), their_prediction(net, x, t, y, ids),
                               atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("t, guided", [(0.5, True), (0.9, False), (0.2, False)])
def test_release_guidance_is_uncond_plus_w_times_the_difference_on_three_channels_inside_the_interval(t, guided):
    model = random_model("SiT-Mi/2", learn_sigma=False, **KW)
    preset = SAMPLE_PRESETS["release-sit"]
    g = Guidance(preset["cfg_scale"], preset["cfg_channels"], preset["guidance_interval"], 1, 4)
    labels = torch.tensor([3] * 4)
    single, grouped = torch.tensor([2, 0, 3, 1]), torch.tensor([1, 3, 0, 2])
    denoiser = make_denoiser(model, Flow(), labels, 4, g, lambda: (single, grouped))
    x = torch.randn(4, 4, 8, 8)
    tt = torch.full((4,), t)
    with torch.no_grad():
        cond = -model(x, 1 - tt, labels, group_size=1, sample_ids=single)
        uncond = -model(x, 1 - tt, torch.full((4,), 10), group_size=4, sample_ids=grouped)
        out = denoiser(x, tt)
    if guided:
        torch.testing.assert_close(out[:, :3], uncond[:, :3] + 2.585 * (cond[:, :3] - uncond[:, :3]))
        torch.testing.assert_close(out[:, 3:], cond[:, 3:])
        assert (out[:, 3:] - (uncond[:, 3:] + 2.585 * (cond[:, 3:] - uncond[:, 3:]))).abs().max() > 1e-4
    else:
        torch.testing.assert_close(out, cond)


@pytest.mark.parametrize("sampler", ["sde", "sde-sbdm"])
def test_flow_sdes_sample_a_gaussian_at_its_scale(sampler):
    """With the exact velocity of data ~ N(0, s^2), the SDE's samples have std s: the
    SBDM diffusion (w = t/(1-t), 999 at t = 1) included."""
    s = 0.5
    gen = torch.Generator().manual_seed(0)

    def exact(x, t):
        t = float(t[0])
        return x * (t - (1 - t) * s * s) / ((1 - t) ** 2 * s * s + t * t)

    x = torch.randn(20000, 1, generator=gen)
    out = samplers.run(sampler, Flow(), exact, x, lambda k: torch.randn(20000, 1, generator=gen), 250)
    assert abs(float(out.std()) - s) < 0.02, float(out.std())
    assert abs(float(out.mean())) < 0.02


def _rows_per_image(ids: torch.Tensor, images: int) -> torch.Tensor:
    """A network call's sample-embedding rows as (branches, images): one branch outside the
    guidance interval, the conditional and unconditional branches inside it."""
    return ids.view(-1, images)


def test_per_call_sample_rows_change_every_call_and_not_with_the_batch():
    """Two groups sampled in one call, then the second group alone: the rows each network
    call draws must be the same for that group, and so must its samples.

    The samples are compared in float64. In float32, two batchings can take different
    matrix-multiply kernels (AVX-512 against AVX2, one thread against two) whose round-off
    differs by ~1e-7, and sde-sbdm's diffusion coefficient t / (1 - t) amplifies it to a
    few 1e-6, so a float32 comparison passes or fails by the CPU. In float64 the same
    kernels differ by ~1e-16; the second batching's network outputs are even given an extra
    relative error of 1e-12 here, as a far worse kernel would, and the samples (returned in
    float32) must still agree to float32's last bit."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = random_model("SiT-Mi/2", learn_sigma=False, **KW)
        g = Guidance(2.0, 3, (0.25, 0.75), 1, 4)
        labels = torch.tensor([1] * 4 + [7] * 4)
        seen, forward, error = [], model.forward, [0.0]
        noise = torch.Generator().manual_seed(1)

        def spy(*a, **k):
            seen.append(k["sample_ids"].clone())
            out = forward(*a, **k)
            return out * (1 + error[0] * torch.randn(out.shape, generator=noise))

        model.forward = spy
        both = sample_groups(model, Flow(), labels, 0, 4, g, 0, "sde-sbdm", 6, sample_ids="per-call")
        rows_both, seen[:] = list(seen), []
        assert len({tuple(ids.tolist()) for ids in rows_both}) == len(rows_both) == 6  # new rows every call
        error[0] = 1e-12
        second = sample_groups(model, Flow(), labels[4:], 4, 4, g, 0, "sde-sbdm", 6, sample_ids="per-call")
        assert len(seen) == len(rows_both)
        for call_both, call_second in zip(rows_both, seen):  # the second group's rows, call by call
            assert torch.equal(_rows_per_image(call_both, 8)[:, 4:], _rows_per_image(call_second, 4))
        assert both.dtype == second.dtype == torch.float32
        torch.testing.assert_close(both[4:], second, atol=1e-6, rtol=1e-6)
        error[0] = 0.0
        fixed = sample_groups(model, Flow(), labels, 0, 4, g, 0, "sde-sbdm", 6)
        assert (fixed - both).abs().max() > 1e-4  # the rows matter: a batch-dependent draw would fail above
    finally:
        torch.set_default_dtype(default)
    model = random_model("SiT-Mi/2", learn_sigma=False, **KW)
    fp32 = sample_groups(model, Flow(), labels, 0, 4, g, 0, "sde-sbdm", 6, sample_ids="per-call")
    bf16 = sample_groups(model, Flow(), labels, 0, 4, g, 0, "sde-sbdm", 6, sample_ids="per-call", precision="bf16")
    assert 0 < float((bf16 - fp32).abs().max()) < 0.1 * float(fp32.abs().max())


def test_sample_preset_release_sit_records_the_authors_settings(tmp_path, release_sit):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    path, _, _ = release_sit
    res = CliRunner().invoke(main, ["sample", "--ckpt", str(path), "--out", str(tmp_path / "s"), "--preset",
                                    "release-sit", "--class-labels", "3", "--steps", "3", "--vae",
                                    str(tmp_path / "vae"), "--cpu"])
    assert res.exit_code == 0, res.output
    job = json.loads((tmp_path / "s" / "sample_config.json").read_text())
    want = dict(SAMPLE_PRESETS["release-sit"], guidance_interval=[0.25, 0.75], steps=3, vae=str(tmp_path / "vae"))
    assert {k: job[k] for k in want} == want
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["arr_0"].shape == (4, 16, 16, 3)
