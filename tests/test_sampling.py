"""`groupdiff sample`: reproducibility, group interaction under CFG, outputs, resume, bad input."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from groupdiff_cli.cli import main
from groupdiff_cli.jobs.sampling import Guidance, grid_image, sample_groups
from groupdiff_cli.plumbing.seeds import seeds_of_images
from groupdiff_cli.science.models import SAMPLE_EMBED_KEY
from groupdiff_cli.science.objectives import DDPM, Flow
from tests.helpers import random_model, write_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("dit_run"))


@pytest.fixture(scope="module")
def sit_run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("sit_run"), name="SiT-Ti/2")


def run(*args):
    return CliRunner().invoke(main, ["sample", *map(str, args)])


def load(out):
    with np.load(Path(out) / "samples.npz") as f:
        return f["arr_0"], f["arr_1"]


# ----------------------------------------------------------------------------- group interaction
@pytest.mark.parametrize("name, objective, sampler", [("DiT-Ti/2", DDPM.respaced(5), "ddpm"),
                                                      ("SiT-Ti/2", Flow(), "sde")])
def test_cfg_one_is_per_image_and_cfg_above_one_couples_the_group(name, objective, sampler):
    model = random_model(name, input_size=8, in_channels=3, num_classes=10, max_group_size=8)
    labels = torch.tensor([3] * 4 + [5] * 4)

    def go(group_size, scale, seeds=None):
        g = Guidance(scale, None, (0.0, 1.0), 1, group_size)
        return sample_groups(model, objective, labels, 0, 4, g, seed=0, sampler=sampler, steps=5, image_seeds=seeds)

    alone = sample_groups(model, objective, labels, 0, 1, Guidance(1.0, None, (0, 1), 1, 1), 0, sampler, 5)
    torch.testing.assert_close(go(4, 1.0), alone, atol=1e-5, rtol=1e-5)  # GroupDiff-l, w = 1: no interaction

    base = go(4, 4.0)
    seeds = seeds_of_images(0, 0, 8)
    moved = go(4, 4.0, seeds=[12345] + seeds[1:])  # only image 0's noise changes
    for i in (1, 2, 3):
        assert not torch.allclose(base[i], moved[i], atol=1e-6), f"group-mate {i} did not see image 0"
    torch.testing.assert_close(base[4:], moved[4:], atol=1e-6, rtol=1e-6)  # the other group did not
    no_cfg = go(4, 1.0, seeds=[12345] + seeds[1:])
    torch.testing.assert_close(no_cfg[1:], go(4, 1.0)[1:], atol=1e-6, rtol=1e-6)


def test_guidance_interval_and_legacy_channels_change_only_what_they_should():
    model = random_model("SiT-Ti/2", input_size=8, in_channels=4, num_classes=10, max_group_size=8)
    labels = torch.tensor([2] * 4)

    def go(**kw):
        g = Guidance(**{"scale": 3.0, "channels": None, "interval": (0.0, 1.0), "cond_group_size": 1,
                        "uncond_group_size": 4, **kw})
        return sample_groups(model, Flow(), labels, 0, 4, g, seed=0, sampler="ode", steps=4)

    off = go(scale=1.0)
    # an interval no step falls in (ode steps sit at t = 1, .75, .5, .25) is no guidance at all
    torch.testing.assert_close(go(interval=(0.8, 0.9)), off)
    assert not torch.allclose(go(interval=(0.6, 1.0)), off)
    legacy = go(channels=3)
    full = go()
    assert not torch.allclose(legacy[:, :3], off[:, :3])
    assert not torch.allclose(legacy, full)


def test_grid_layout():
    imgs = np.arange(16)[:, None, None, None] * np.ones((16, 2, 3, 3), np.uint8)
    g = grid_image(imgs.astype(np.uint8))
    assert g.shape == (8, 12, 3) and g[2, 3, 0] == 5  # 4x4: row 1, column 1 -> image 5
    assert grid_image(imgs[:6].astype(np.uint8)).shape == (4, 9, 3)  # 6 -> 3 columns, 2 rows


# ----------------------------------------------------------------------------- the command
def test_outputs_npz_labels_and_grids(dit_run, tmp_path):
    out = tmp_path / "s"
    res = run("--ckpt", dit_run, "--out", out, "--group-size", "4", "--class-labels", "3,7", "--steps", "4",
              "--cfg-scale", "2.0")
    assert res.exit_code == 0, res.output
    arr, labels = load(out)
    assert arr.dtype == np.uint8 and arr.shape == (8, 8, 8, 3)
    assert labels.tolist() == [3] * 4 + [7] * 4 and np.load(out / "labels.npy").tolist() == labels.tolist()
    grids = sorted((out / "grids").iterdir())  # 16 images per file: both groups of 4 in one
    assert [g.name for g in grids] == ["groups_000000-000001.png"]
    grid = np.asarray(Image.open(grids[0]))
    assert grid.shape == (12 + 8 + 2 + 8, 4 * 8 + 3 * 2, 3)  # caption band, 2 rows of 4 with 2px gaps
    np.testing.assert_array_equal(grid[22:30, 30:38], arr[7])  # row 1 (group 1), column 3
    assert (grid[12:30, 8:10] == 255).all()  # a white gap between tiles
    assert (grid[:12] < 128).any()  # the caption is drawn


def test_dopri5_samples_through_the_cli_and_matches_heun_closely(sit_run, tmp_path):
    # a smooth random field: the adaptive solver and 50 Heun steps agree to a few grey levels
    for sampler, steps in (("dopri5", "1"), ("heun", "50")):
        res = run("--ckpt", sit_run, "--out", tmp_path / sampler, "--num-samples", "4", "--sampler", sampler,
                  "--steps", steps, "--cfg-scale", "1.5")
        assert res.exit_code == 0, res.output
    a, b = load(tmp_path / "dopri5")[0].astype(int), load(tmp_path / "heun")[0].astype(int)
    assert np.abs(a - b).max() <= 3 and json.loads((tmp_path / "dopri5" / "sample_config.json").read_text())[
        "sampler"] == "dopri5"


def test_same_samples_for_batch_sizes_and_two_processes(sit_run, tmp_path):
    common = ["--ckpt", sit_run, "--group-size", "2", "--num-samples", "12", "--steps", "3", "--cfg-scale", "1.5"]
    res = run(*common, "--out", tmp_path / "a", "--batch-size", "12")
    assert res.exit_code == 0, res.output
    res = run(*common, "--out", tmp_path / "b", "--batch-size", "2")
    assert res.exit_code == 0, res.output
    a, la = load(tmp_path / "a")
    b, lb = load(tmp_path / "b")
    assert la.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # class-balanced: group k -> class k
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1 and (a == b).mean() > 0.99

    # Bitwise only between runs with the same thread count and batch shapes: one process
    # and two processes, both single-threaded, one group per chunk (so both ranks sample).
    env = dict(os.environ, OMP_NUM_THREADS="1")
    tail = ["--batch-size", "2", "--chunk-groups", "1", "--cpu"]
    one = subprocess.run([sys.executable, "-m", "groupdiff_cli", "sample", *map(str, common),
                          "--out", str(tmp_path / "d"), *tail], capture_output=True, text=True, env=env, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", "0", "-m", "groupdiff_cli", "sample", *map(str, common),
                          "--out", str(tmp_path / "c"), *tail], capture_output=True, text=True, env=env, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    b, _ = load(tmp_path / "d")
    c, lc = load(tmp_path / "c")
    np.testing.assert_array_equal(c, b)
    assert lc.tolist() == la.tolist()
    assert two.stdout.count("12 images in 6 groups of 2 (2 processes)") == 1  # one job, reported once


def test_interrupted_run_resumes_and_a_different_one_is_refused(dit_run, tmp_path):
    out = tmp_path / "s"
    args = ["--ckpt", dit_run, "--out", out, "--group-size", "2", "--num-samples", "8", "--steps", "3"]
    # 256 // 2 = 128 groups per chunk by default: use the Python API for small chunks
    from groupdiff_cli.jobs.sampling import build_job, run_sampling

    job, model = build_job(dit_run, group_size=2, num_samples=8, steps=3, chunk_groups=1)
    run_sampling(job, model, out, batch_size=4, keep_chunks=True)
    full, _ = load(out)
    chunk_files = sorted((out / "chunks").iterdir())
    assert len(chunk_files) == 4
    # simulate a crash after two chunks: the last two chunks and the joined npz are missing
    mtimes = {p.name: p.stat().st_mtime_ns for p in chunk_files[:2]}
    for p in chunk_files[2:]:
        p.unlink()
    (out / "samples.npz").unlink()
    (out / "samples.json").unlink()
    calls = []
    import groupdiff_cli.jobs.sampling as sampling

    real = sampling.sample_groups
    try:
        sampling.sample_groups = lambda *a, **k: calls.append(a[3]) or real(*a, **k)
        run_sampling(job, model, out, batch_size=4, keep_chunks=True)
        assert calls == [4, 6]  # only the missing chunks (first image indices 4 and 6) were sampled
        assert {p.name: p.stat().st_mtime_ns for p in sorted((out / "chunks").iterdir())[:2]} == mtimes
        np.testing.assert_array_equal(load(out)[0], full)
        # a finished job: a rerun samples nothing and, without --keep-chunks, still keeps the chunks
        # it finds (they are removed only right after a join); a fresh job removes its own
        run_sampling(job, model, out, batch_size=4)
        assert calls == [4, 6] and len(list((out / "chunks").iterdir())) == 4
    finally:
        sampling.sample_groups = real
    record = json.loads((out / "samples.json").read_text())
    assert record["bytes"] == (out / "samples.npz").stat().st_size
    assert record["images_sha256"] == hashlib.sha256(np.ascontiguousarray(full).tobytes()).hexdigest()
    fresh = tmp_path / "fresh"
    run_sampling(job, model, fresh, batch_size=4)
    assert not (fresh / "chunks").exists()
    np.testing.assert_array_equal(load(fresh)[0], full)

    res = run(*args[:-2], "--steps", "4")  # same --out, different configuration
    assert res.exit_code == 2 and "holds samples of a different configuration" in res.output


def test_decoding_through_a_real_autoencoderkl(tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    run_dir = write_run(tmp_path / "run", in_channels=4, vae=str(tmp_path / "vae"))
    res = run("--ckpt", run_dir, "--out", tmp_path / "s", "--class-labels", "1", "--steps", "2")
    assert res.exit_code == 0, res.output
    arr, _ = load(tmp_path / "s")
    assert arr.shape == (4, 16, 16, 3)  # 8x8 latents, VAE upsamples by 2


def test_official_checkpoint_and_group_size_warning(tmp_path):
    model = random_model("DiT-Ti/2", input_size=8, in_channels=3, num_classes=10)
    torch.save({k: v for k, v in model.state_dict().items() if k != SAMPLE_EMBED_KEY}, tmp_path / "DiT-Ti-2.pt")
    res = run("--ckpt", tmp_path / "DiT-Ti-2.pt", "--out", tmp_path / "s", "--vae", "pixel", "--group-size", "2",
              "--class-labels", "1", "--steps", "2")
    assert res.exit_code == 0, res.output
    assert "warning: --group-size 2 is larger than the group size this checkpoint was trained with (1)" in res.output
    assert load(tmp_path / "s")[0].shape == (2, 8, 8, 3)


@pytest.mark.parametrize("extra, message", [
    (["--group-size", "9", "--class-labels", "1"], "--group-size 9 is outside [1, max_group_size=8]"),
    (["--class-labels", "1,10"], "--class-labels: label 10 is outside [0, 9]"),
    (["--num-samples", "6", "--group-size", "4"], "--num-samples 6 is not a multiple of --group-size 4"),
    (["--class-labels", "1", "--sampler", "sde"], "--sampler sde does not fit the ddpm objective"),
    (["--class-labels", "1", "--guidance-interval", "0.5"], "--guidance-interval 0.5: expected LO,HI"),
    ([], "give --num-samples N"),
])
def test_bad_input_is_one_line_with_exit_code_2(dit_run, tmp_path, extra, message):
    res = run("--ckpt", dit_run, "--out", tmp_path / "s", *extra)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.output
    assert not (tmp_path / "s").exists()  # nothing written


def test_missing_checkpoint(tmp_path):
    res = run("--ckpt", tmp_path / "nope.pt", "--out", tmp_path / "s", "--class-labels", "1")
    assert res.exit_code == 2 and "--ckpt" in res.output and "no such file" in res.output


def test_different_seeds_give_independent_images_not_shifted_ones():
    """Image i's stream is keyed by (seed, i): seed 1 does not redraw seed 0's images
    shifted by one, so a mean over seeds never counts one sample twice."""
    a, b = seeds_of_images(0, 0, 64), seeds_of_images(1, 0, 64)
    assert not set(a) & set(b)
    assert seeds_of_images(0, 10, 5) == a[10:15]  # still a function of the index alone (batch, GPUs)
    model = random_model("SiT-Ti/2", input_size=8, in_channels=3, num_classes=10, max_group_size=8)
    g = Guidance(1.0, None, (0.0, 1.0), 1, 1)
    labels = torch.tensor([3] * 4)
    x0 = sample_groups(model, Flow(), labels, 0, 1, g, 0, "ode", 2)
    x1 = sample_groups(model, Flow(), labels, 0, 1, g, 1, "ode", 2)
    for i in range(3):
        assert not torch.allclose(x1[i], x0[i + 1], atol=1e-3)
