"""The training loader: the shard reader against webdataset's, the background worker
against building in process, the vectorised grouping rules, and the GPU bench's smoke run."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from groupdiff_cli.data.loader import GroupBatches, GroupRecipe, _records, build_groups, read_dataset
from groupdiff_cli.plumbing.files import InputError
from tests.helpers import write_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_shard_reader_returns_what_webdataset_decodes(tmp_path):
    """Latent shards (fp16 moments, flips, embeddings) and pixel shards (PNG), read by our
    tar reader, equal webdataset's own reading of the same files, key by key."""
    d = write_dataset(tmp_path / "lat", n=12, shard_size=12)
    pix = tmp_path / "pix.tar"
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(pix)) as sink:
        for i in range(5):
            img = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8))
            sink.write({"__key__": f"sub/{i:09d}", "cls": i, "image.png": img, "path.txt": "x"})
    for path, count in ((d / "shard-000000.tar", 12), (pix, 5)):
        ours = list(_records(path, count))
        ref = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False).decode("rgb8"))
        assert len(ours) == len(ref) == count
        for r, s in zip(ours, ref):
            assert r.key == s["__key__"] and r.label == int(s["cls"])
            for got, k in ((r.mean, "mean.npy" if "mean.npy" in s else "image.png"), (r.std, "std.npy"),
                           (r.flip_mean, "flip_mean.npy"), (r.flip_std, "flip_std.npy"), (r.emb, "emb.npy")):
                assert (got is None) == (k not in s)
                if got is not None:
                    assert got.dtype == s[k].dtype and np.array_equal(got, s[k])


def test_damaged_shards_fail_naming_the_shard(tmp_path):
    d = write_dataset(tmp_path / "lat", n=8, shard_size=8)
    raw = (d / "shard-000000.tar").read_bytes()
    cases = {"cut": raw[: len(raw) // 2], "member header": raw[:1030] + bytes([raw[1030] ^ 0xFF]) + raw[1031:],
             "pax size": raw[:130] + b"7" + raw[131:], "garbage": bytes(np.random.default_rng(0).integers(
                 0, 256, len(raw), dtype=np.uint8))}
    for name, data in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.tar"
        bad.write_bytes(data)
        with pytest.raises(InputError, match=str(bad)):
            list(_records(bad, 8))


@pytest.mark.parametrize("mode", ["l", "f", "none"])
def test_the_background_worker_gives_the_same_batches_as_building_in_process(tmp_path, mode):
    """Windows read ahead by the DataLoader worker equal windows built on demand, for any
    order of batch indices (a resume jumps): what exact resume relies on."""
    info = read_dataset(write_dataset(tmp_path / "d", n=64, shard_size=16))
    args = dict(batch_size=8, window=16, seed=0, num_classes=4)
    recipe = GroupRecipe(mode, 4, 0.25, "similarity", 0.7)
    ahead, here = GroupBatches(info, recipe, **args, prefetch=True), GroupBatches(info, recipe, **args, prefetch=False)
    try:
        for i in [0, 1, 2, 5, 6, 7, 3, 11, 4, 12]:
            a, b = ahead.batch(i), here.batch(i)
            assert a.keys == b.keys and a.group_sizes == b.group_sizes
            assert torch.equal(a.latents, b.latents) and torch.equal(a.labels, b.labels)
    finally:
        ahead.close()


def test_a_damaged_shard_in_the_worker_raises_its_own_error(tmp_path):
    d = write_dataset(tmp_path / "d", n=32, shard_size=16)
    info = read_dataset(d)
    for shard in d.glob("*.tar"):
        raw = shard.read_bytes()
        shard.write_bytes(raw[: len(raw) // 2])
    gb = GroupBatches(info, GroupRecipe("l", 4, 0.25, "similarity", 0.7), batch_size=8, window=16, seed=0,
                      num_classes=4, prefetch=True)
    try:
        with pytest.raises(InputError, match=r"shard .*shard-00000[01]\.tar is corrupt"):
            gb.batch(0)
    finally:
        gb.close()


def test_vectorised_grouping_keeps_the_rules():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 2000)
    centers = rng.normal(size=(10, 32))
    emb = centers[labels] + 0.3 * rng.normal(size=(2000, 32))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    for rule, n in (("similarity", 4), ("class", 4), ("random", 4), ("similarity", 16)):
        groups = np.array(build_groups(emb, labels, 2000 // n // 2, n, rule, 0.7, np.random.default_rng(1), chunk=7))
        assert len(np.unique(groups)) == groups.size  # disjoint
        if rule == "similarity":  # every member passes the threshold to its anchor
            assert (np.einsum("gd,gnd->gn", emb[groups[:, 0]], emb[groups[:, 1:]]) >= 0.7).all()
        if rule == "class":
            assert (labels[groups] == labels[groups[:, :1]]).all()
        again = build_groups(emb, labels, 2000 // n // 2, n, rule, 0.7, np.random.default_rng(1), chunk=7)
        assert groups.tolist() == again  # deterministic
    # anchors are uniform: with no structure every sample is an anchor about equally often
    counts = np.zeros(40)
    for s in range(400):
        counts[np.array(build_groups(None, np.zeros(40, int), 5, 4, "class", 0, np.random.default_rng(s)))[:, 0]] += 1
    assert counts.min() > 0.5 * counts.mean()


def test_gpu_bench_smoke_writes_every_figure(tmp_path):
    out = tmp_path / "bench"
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--smoke", "--out", str(out)], check=True,
                   capture_output=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    res = json.loads((out / "gpu_bench.json").read_text())
    assert {(r["model"], r["mode"]) for r in res["train"]} == {(m, g) for m in ("SiT-Mi/4", "DiT-Mi/4")
                                                               for g in ("none", "l", "f")}
    assert all(r["img_s"] > 0 for r in res["train"])
    assert [r["group_size"] for r in res["sample"]] == [1, 4, 16]
    assert res["vae"]["img_s"] > 0 and res["fid"]["img_s"] > 0
    table = (out / "gpu_bench.md").read_text()
    assert "| SiT-Mi/4 | f | False | 8 |" in table and "FID Inception features" in table
    assert res["bootstrap"]["samples"] == 500 and "FID bootstrap at 500 samples" in table
