"""`groupdiff encode`: real shards, real AutoencoderKL and timm ViT (random weights)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from groupdiff_cli.cli import main
from groupdiff_cli.data import encode as enc

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A class-folder tree with awkward files, a tiny VAE and a tiny timm ViT on disk."""
    d = tmp_path_factory.mktemp("encode")
    rng = np.random.default_rng(0)
    src = d / "train"
    for c in ("n0002", "n0001", "n0003"):  # created unsorted: the label is the sorted order
        (src / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)).save(src / c / f"img{i}.JPEG")
    Image.fromarray(rng.integers(0, 255, (60, 60, 4), dtype=np.uint8), "RGBA").save(src / "n0001" / "alpha.png")
    Image.fromarray(rng.integers(0, 255, (70, 50, 3), dtype=np.uint8)).convert("CMYK").save(src / "n0002" / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)).save(src / "n0003" / "tiny.png")
    whole = (src / "n0001" / "img0.JPEG").read_bytes()
    (src / "n0003" / "broken.JPEG").write_bytes(whole[: len(whole) // 2])
    (src / "n0003" / "notes.txt").write_text("not an image")

    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=SIZE)
    vae.save_pretrained(d / "vae")
    import timm
    from safetensors.torch import save_file

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)  # with its head, as a downloaded file is
    save_file(vit.state_dict(), str(d / "vit.safetensors"))
    return dict(dir=d, src=src, vae=d / "vae", vit=d / "vit.safetensors")


def encode_args(a, out, *extra):
    return ["encode", str(a["src"]), str(out), "--image-size", str(SIZE), "--vae", str(a["vae"]), "--embedder",
            "vit_tiny_patch16_224", "--embedder-weights", str(a["vit"]), "--shard-size", "4", "--num-workers", "0",
            *extra]


def read_shards(out):
    """Every sample, decoded by plain webdataset (no groupdiff code)."""
    shards = sorted(str(p) for p in Path(out).glob("shard-*.tar"))
    return list(wds.WebDataset(shards, shardshuffle=False).decode())


@pytest.fixture(scope="module")
def encoded(assets):
    out = assets["dir"] / "out"
    res = CliRunner().invoke(main, encode_args(assets, out))
    assert res.exit_code == 0, res.output
    return out, res.output


def test_shards_decode_with_plain_webdataset_and_counts_match(assets, encoded):
    out, output = encoded
    samples = read_shards(out)
    info = json.loads((out / "dataset.json").read_text())
    assert len(samples) == info["num_samples"] == 15  # 16 images, one broken
    assert info["class_names"] == ["n0001", "n0002", "n0003"] and info["num_classes"] == 3
    for s in samples:
        cls_name = s["path.txt"].split("/")[0]
        assert s["cls"] == info["class_names"].index(cls_name)
        assert s["mean.npy"].dtype == np.float16 and s["mean.npy"].shape == (4, 8, 8)
        assert s["flip_std.npy"].shape == (4, 8, 8) and s["emb.npy"].shape == (192,)
        assert abs(np.linalg.norm(s["emb.npy"].astype(np.float32)) - 1) < 2e-3
    assert sorted(s["path.txt"] for s in samples) == sorted(
        f"{c.name}/{f.name}" for c in assets["src"].iterdir() for f in c.iterdir()
        if f.suffix != ".txt" and f.name != "broken.JPEG")
    # a fixed random order, not the listing order
    assert [s["__key__"] for s in samples] != sorted(s["__key__"] for s in samples)
    assert info["vae"] == str(assets["vae"].resolve()) and info["vae_scale"] == 0.18215
    assert info["latent_shape"] == [4, 8, 8] and len(info["latent_channel_std"]) == 4
    assert info["embedder"] == "vit_tiny_patch16_224" and info["embedder_dim"] == 192 and info["flip"]


def test_bad_file_is_skipped_counted_and_reported(encoded):
    out, output = encoded
    info = json.loads((out / "dataset.json").read_text())
    assert info["skipped_count"] == 1 and info["skipped"][0]["path"] == "n0003/broken.JPEG"
    assert "truncated" in info["skipped"][0]["error"]
    assert "skipped n0003/broken.JPEG" in output and "1 skipped" in output


def test_stored_moments_equal_a_direct_encode_of_the_crop(assets, encoded):
    from diffusers import AutoencoderKL

    out, _ = encoded
    vae = AutoencoderKL.from_pretrained(str(assets["vae"])).eval()
    samples = {s["path.txt"]: s for s in read_shards(out)}
    for rel in ("n0002/cmyk.jpg", "n0001/alpha.png", "n0003/tiny.png", "n0001/img3.JPEG"):
        crop = enc.center_crop(enc.load_rgb(assets["src"] / rel), SIZE)
        assert crop.shape == (SIZE, SIZE, 3)
        x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
            flip = vae.encode(x.flip(-1)).latent_dist
        s = samples[rel]
        np.testing.assert_allclose(s["mean.npy"].astype(np.float32), dist.mean[0].numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(s["std.npy"].astype(np.float32), dist.std[0].numpy(), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(s["flip_mean.npy"].astype(np.float32), flip.mean[0].numpy(), atol=2e-3, rtol=2e-3)


def test_adm_center_crop_halves_with_box_then_bicubic():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 700, 3), dtype=np.uint8))
    out = enc.center_crop(img, 64)
    # by hand: 300x700 -> box-halved twice to 75x175 (short side 75 < 128), bicubic to 64x149, middle 64
    ref = img.resize((350, 150), Image.BOX).resize((175, 75), Image.BOX).resize((149, 64), Image.BICUBIC)
    np.testing.assert_array_equal(out, np.asarray(ref)[:, 42:106])


def test_interrupted_job_resumes_to_the_same_shards(assets, encoded, tmp_path):
    out_clean, _ = encoded
    out = tmp_path / "out"
    first = CliRunner().invoke(main, encode_args(assets, out, "--max-shards", "2"))
    assert first.exit_code == 0 and "rerun the same command" in first.output
    assert len(list(out.glob("shard-*.tar"))) == 2 and not (out / "dataset.json").exists()
    # a crash in the middle of shard 2 leaves only a temporary file behind
    (out / ".shard-000002.tmp.tar").write_bytes(b"partial")
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    again = CliRunner().invoke(main, encode_args(assets, out))
    assert again.exit_code == 0, again.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-00000[01].tar")} == mtimes  # never rewritten
    for name in sorted(p.name for p in out_clean.glob("shard-*")):
        if name.endswith(".tar"):
            a, b = read_shards_one(out_clean / name), read_shards_one(out / name)
            assert [s["__key__"] for s in a] == [s["__key__"] for s in b]
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x["mean.npy"], y["mean.npy"])
    clean = json.loads((out_clean / "dataset.json").read_text())
    resumed = json.loads((out / "dataset.json").read_text())
    assert resumed == clean


def read_shards_one(path):
    return list(wds.WebDataset(str(path), shardshuffle=False).decode())


def test_different_configuration_is_refused(assets, encoded):
    out, _ = encoded
    res = CliRunner().invoke(main, encode_args(assets, out, "--seed", "1"))
    assert res.exit_code == 2 and "holds shards of a different configuration" in res.output


def test_pixel_mode_round_trips_pixels(assets, tmp_path):
    out = tmp_path / "px"
    res = CliRunner().invoke(main, ["encode", str(assets["src"]), str(out), "--image-size", "8", "--vae", "pixel",
                                    "--embedder", "none", "--num-workers", "0"])
    assert res.exit_code == 0, res.output
    samples = list(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False).decode("rgb8"))
    assert len(samples) == 15 and "mean.npy" not in samples[0] and "emb.npy" not in samples[0]
    for s in samples:
        expected = enc.center_crop(enc.load_rgb(assets["src"] / s["path.txt"]), 8)
        np.testing.assert_array_equal(s["image.png"], expected)
    info = json.loads((out / "dataset.json").read_text())
    assert info["vae"] == "pixel" and info["embedder"] == "none" and info["latent_shape"] == [3, 8, 8]


def test_list_file_source(assets, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text(f"{assets['src']}/n0001/img0.JPEG 7\n# a comment\n{assets['src']}/n0002/img1.JPEG 2\n")
    items, classes = enc.list_source(lst)
    assert [y for _, y in items] == [7, 2] and len(classes) == 8
    lst.write_text("only_a_path.jpg\n")
    with pytest.raises(ValueError, match="line 1 is not `path label`"):
        enc.list_source(lst)


@pytest.mark.parametrize("extra, message", [
    (["--vae", "/nonexistent/vae-dir-or-id"], "--vae /nonexistent/vae-dir-or-id: no such directory"),
    (["--embedder-weights", "/nonexistent.safetensors"], "--embedder-weights /nonexistent.safetensors: no such file"),
])
def test_bad_flags_are_one_line_and_leave_out_untouched(assets, tmp_path, extra, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "o"
    res = CliRunner().invoke(main, encode_args(assets, out) + extra)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.output
    assert not out.exists()


def test_two_processes_produce_the_same_sample_set(assets, encoded, tmp_path):
    out_clean, _ = encoded
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", "0", "-m", "groupdiff_cli", *encode_args(assets, tmp_path / "two"),
                          "--cpu"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    one = {s["__key__"]: s for s in read_shards(out_clean)}
    two = {s["__key__"]: s for s in read_shards(tmp_path / "two")}
    assert sorted(one) == sorted(two)
    for k in one:
        np.testing.assert_allclose(one[k]["mean.npy"].astype(np.float32), two[k]["mean.npy"].astype(np.float32),
                                   atol=2e-3)
        assert one[k]["cls"] == two[k]["cls"]
    assert res.stdout.count("15 images in 4 shards") == 1  # one job: the main process reports
