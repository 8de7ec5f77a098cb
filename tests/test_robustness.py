"""Bad input and crash safety through the CLI: one line naming the flag or file, exit 2
for a bad argument and 1 for a failure found while running, nothing already written
damaged, one job per output, exact logs on resume."""

import errno
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from groupdiff_cli.cli import main
from groupdiff_cli.evaluation import fid, images, metrics
from groupdiff_cli.plumbing.files import LOCK_NAME, InputError
from groupdiff_cli.plumbing.integrity import file_sha256
from tests.helpers import cli, images_npz, one_line, sample_args, snapshot, train_args, write_dataset, write_run


@pytest.fixture
def data(tmp_path):
    return write_dataset(tmp_path / "data")


# ---------------------------------------------------------------------------- train: corrupt data
@pytest.mark.parametrize("case", ["no_shards_key", "not_json", "no_sidecar"])
def test_corrupt_dataset_metadata_names_the_file(data, tmp_path, case):
    meta = data / "dataset.json"
    if case == "no_shards_key":
        info = json.loads(meta.read_text())
        del info["shards"]
        meta.write_text(json.dumps(info))
        bad, needle = meta, "lacks shards"
    elif case == "not_json":
        meta.write_text("{not json")
        bad, needle = meta, "not readable JSON"
    else:
        (data / "shard-000001.json").unlink()
        bad, needle = data / "shard-000001.json", "is missing"
    res = cli(*train_args(data, tmp_path / "runs", "--max-steps", "1"))
    one_line(res, 2, str(bad), needle)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_corrupt_shard_stops_the_run_naming_it_and_keeps_the_checkpoint(data, tmp_path, how):
    args = train_args(data, tmp_path / "runs")
    assert cli(*args, "--max-steps", "2").exit_code == 0
    run = tmp_path / "runs" / "SiT-Ti-2-l4"
    before = snapshot(run / "checkpoints")
    for shard in sorted(data.glob("*.tar")):
        raw = shard.read_bytes()
        shard.write_bytes(raw[: len(raw) // 3] if how == "truncated" else os.urandom(len(raw)))
    res = cli(*args, "--max-steps", "4", "--resume")
    one_line(res, 1, "shard", ".tar", "re-encode it")
    assert snapshot(run / "checkpoints") == before


def test_numeric_options_are_range_checked(data, tmp_path):
    for flag, value in (("--weight-decay", "-1"), ("--grad-clip", "-1"), ("--ema-decay", "2"), ("--lr", "nan"),
                        ("--group-ratio", "1.5"), ("--similarity-threshold", "inf")):
        res = cli(*train_args(data, tmp_path / "runs", "--max-steps", "1", flag, value))
        one_line(res, 2, flag)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- train: run directory
def test_bad_init_from_and_run_name_are_one_line(data, tmp_path):
    (tmp_path / "r.pt").write_bytes(os.urandom(300))
    (tmp_path / "r.safetensors").write_bytes(os.urandom(300))
    for f in ("r.pt", "r.safetensors"):
        one_line(cli(*train_args(data, tmp_path / "runs", "--max-steps", "1", "--init-from", tmp_path / f)), 2,
                 str(tmp_path / f))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "afile").write_text("x")
    one_line(cli(*train_args(data, tmp_path / "runs", "--max-steps", "1", "--run-name", "afile")), 2,
             "is not a directory")


def test_a_failed_start_does_not_poison_the_run_name(data, tmp_path):
    args = train_args(data, tmp_path / "runs", "--max-steps", "2")
    one_line(cli(*args, "--group-buffer", "4"), 2, "--group-buffer 4")
    run = tmp_path / "runs" / "SiT-Ti-2-l4"
    assert not (run / "config.json").exists()
    # a start killed before its first checkpoint: config.json and a metrics row, no checkpoint
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text(json.dumps(dict(step=1, loss=9.0)) + "\n")
    res = cli(*args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] != 9.0


def test_a_malicious_optimizer_state_is_refused_in_one_line(data, tmp_path):
    args = train_args(data, tmp_path / "runs")
    assert cli(*args, "--max-steps", "2").exit_code == 0
    opt = tmp_path / "runs" / "SiT-Ti-2-l4" / "checkpoints" / "step_0000002" / "optimizer.pt"
    torch.save({"state": {}, "param_groups": [], "evil": subprocess.Popen}, opt)
    state = json.loads((opt.parent / "state.json").read_text())  # forged: its checksum fits
    state["sha256"]["optimizer.pt"] = file_sha256(opt)
    (opt.parent / "state.json").write_text(json.dumps(state))
    one_line(cli(*args, "--max-steps", "4", "--resume"), 2, str(opt), "refused: its pickle imports", "Popen")


def test_resume_logs_each_step_once_and_a_moved_run_resumes(data, tmp_path):
    args = train_args(data, tmp_path / "runs")
    assert cli(*args, "--max-steps", "4").exit_code == 0
    run = tmp_path / "runs" / "SiT-Ti-2-l4"
    full = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(run / "checkpoints" / "step_0000004")  # killed after logging steps 3 and 4
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "runs", moved)
    res = cli(*train_args(data, moved, "--max-steps", "4", "--resume"))
    assert res.exit_code == 0, res.output
    again = [json.loads(x) for x in (moved / "SiT-Ti-2-l4" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert [r["loss"] for r in again] == [r["loss"] for r in full]  # exact, as the weights


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_one_job_per_run_a_stale_lock_is_taken_over(data, tmp_path):
    args = train_args(data, tmp_path / "runs", "--max-steps", "2")
    run = tmp_path / "runs" / "SiT-Ti-2-l4"
    run.mkdir(parents=True)
    lock = run / LOCK_NAME
    import socket

    lock.write_text(json.dumps(dict(pid=os.getppid(), host=socket.gethostname())))  # a live owner
    one_line(cli(*args), 2, "another job", str(lock))
    assert not (run / "config.json").exists()
    lock.write_text(json.dumps(dict(pid=dead_pid(), host=socket.gethostname())))  # its owner is gone
    res = cli(*args)
    assert res.exit_code == 0, res.output
    assert not lock.exists()  # released at the end


def test_a_requeued_slurm_job_takes_over_its_own_lock_from_another_node(data, tmp_path, monkeypatch):
    args = train_args(data, tmp_path / "runs", "--max-steps", "2")
    run = tmp_path / "runs" / "SiT-Ti-2-l4"
    run.mkdir(parents=True)
    lock = run / LOCK_NAME
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock.write_text(json.dumps(dict(pid=1, host="node-a", job="4241")))  # another job, elsewhere
    one_line(cli(*args), 2, "another job", "node-a", str(lock))
    lock.write_text(json.dumps(dict(pid=1, host="node-a", job="4242")))  # this job before its preemption
    res = cli(*args)
    assert res.exit_code == 0, res.output
    assert not lock.exists()


# ---------------------------------------------------------------------------- sample
def test_bad_checkpoint_files_are_one_line(tmp_path):
    (tmp_path / "r.pt").write_bytes(os.urandom(2000))
    (tmp_path / "r.safetensors").write_bytes(os.urandom(2000))
    for f in ("r.pt", "r.safetensors"):
        one_line(cli(*sample_args(tmp_path / f, tmp_path / "o")), 2, str(tmp_path / f))
    assert not (tmp_path / "o").exists()


def test_bad_cfg_and_a_vae_that_does_not_fit_fail_before_any_work(pixel_run, tmp_path):
    for v in ("-1", "nan"):
        one_line(cli(*sample_args(pixel_run, tmp_path / "o", "--cfg-scale", v)), 2, "--cfg-scale")
    latent = write_run(tmp_path / "latent", name="SiT-Ti/2", in_channels=4, vae="stabilityai/sd-vae-ft-ema")
    one_line(cli(*sample_args(latent, tmp_path / "o", "--vae", "pixel")), 2, "--vae pixel", "does not fit")
    one_line(cli(*sample_args(latent, tmp_path / "o", "--vae", str(tmp_path / "no_vae"))), 2,
             "no such directory")
    assert not (tmp_path / "o").exists()


def test_a_truncated_chunk_is_sampled_again(pixel_run, tmp_path):
    out = tmp_path / "o"
    assert cli(*sample_args(pixel_run, out, "--keep-chunks")).exit_code == 0
    with np.load(out / "samples.npz") as f:
        full = f["arr_0"]
    chunk = out / "chunks" / "chunk_00001.npz"
    chunk.write_bytes(chunk.read_bytes()[:100])
    (out / "samples.npz").unlink()  # as if the job had stopped before the join
    res = cli(*sample_args(pixel_run, out))
    assert res.exit_code == 0, res.output
    with np.load(out / "samples.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], full)


def test_a_foreign_chunk_of_the_right_shape_is_never_joined(pixel_run, tmp_path):
    """Chunks carry their job's key: one from another run (another seed), or another
    chunk's file, is sampled again rather than joined."""
    out, other = tmp_path / "o", tmp_path / "other"
    assert cli(*sample_args(pixel_run, out, "--keep-chunks")).exit_code == 0
    assert cli(*sample_args(pixel_run, other, "--seed", "7", "--keep-chunks")).exit_code == 0
    with np.load(out / "samples.npz") as f:
        full = f["arr_0"]
    (out / "chunks" / "chunk_00001.npz").write_bytes((other / "chunks" / "chunk_00001.npz").read_bytes())
    (out / "samples.npz").unlink()
    res = cli(*sample_args(pixel_run, out, "--keep-chunks"))
    assert res.exit_code == 0, res.output
    with np.load(out / "samples.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], full)
    (out / "chunks" / "chunk_00001.npz").write_bytes((out / "chunks" / "chunk_00000.npz").read_bytes())
    (out / "samples.npz").unlink()
    assert cli(*sample_args(pixel_run, out, "--keep-chunks")).exit_code == 0
    with np.load(out / "samples.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], full)


def test_nan_samples_are_never_written(pixel_run, tmp_path, monkeypatch):
    from groupdiff_cli.science.models import GroupDiT

    real = GroupDiT.forward

    def poisoned(self, x, *a, **k):
        out = real(self, x, *a, **k)
        out[-1] = float("nan")  # the last image of the batch: group 1 of the chunk
        return out

    monkeypatch.setattr(GroupDiT, "forward", poisoned)
    res = cli(*sample_args(pixel_run, tmp_path / "o", "--batch-size", "4", "--chunk-groups", "2"))
    one_line(res, 1, "not finite for group(s) [1]", "t = 1.0000")
    assert not list((tmp_path / "o" / "chunks").glob("*.npz")) and not (tmp_path / "o" / "samples.npz").exists()


def test_a_full_disk_is_one_line_and_a_rerun_finishes(pixel_run, tmp_path, monkeypatch):
    out = tmp_path / "o"
    import groupdiff_cli.jobs.sampling as sampling

    real = sampling.write_npz_streaming

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(sampling, "write_npz_streaming", full)
    one_line(cli(*sample_args(pixel_run, out)), 1, "No space left on device", "samples.npz")
    chunks = snapshot(out / "chunks")
    assert len(chunks) == 2
    images = np.concatenate([np.load(p)["arr_0"] for p in sorted((out / "chunks").glob("*.npz"))])
    monkeypatch.setattr(sampling, "write_npz_streaming", real)
    res = cli(*sample_args(pixel_run, out))
    assert res.exit_code == 0 and not (out / "chunks").exists()  # joined from the chunks, then removed
    with np.load(out / "samples.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], images)


# ---------------------------------------------------------------------------- encode
def test_encode_bad_seed_leaves_no_config(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    res = cli("encode", tmp_path / "src", tmp_path / "out", "--vae", "pixel", "--embedder", "none", "--seed", "-1")
    one_line(res, 2, "--seed")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- fid
def test_fid_on_tiny_sets_skips_prc_and_says_the_covariance_is_singular(weights, tmp_path):
    a, b = images_npz(tmp_path / "a.npz", 3), images_npz(tmp_path / "b.npz", 3, seed=1)
    res = cli("fid", a, b, "--inception-weights", weights)
    assert res.exit_code == 0, res.output
    assert "prc skipped: precision/recall needs more than k = 3 images" in res.output
    assert "the covariance is singular" in res.output
    one_line(cli("fid", a, b, "--inception-weights", weights, "--metrics", "prc"), 2, "--metrics prc")


def test_16_bit_pngs_are_scaled_not_clipped(tmp_path):
    folder = tmp_path / "w"
    folder.mkdir()
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)
    Image.fromarray(ramp).save(folder / "a.png")  # uint16 -> mode I;16
    img = images.open_images(folder)[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
    expect = np.round(ramp.astype(np.float64) / 65535 * 255).astype(np.uint8)
    np.testing.assert_array_equal(img[0].numpy(), expect)
    assert img.float().mean() < 200  # not clipped to white


def test_degenerate_features_say_what_is_wrong():
    sigma = np.full((4, 4), np.nan)
    with pytest.raises(InputError, match="not finite or degenerate"):
        metrics.FrechetDistance(np.zeros(4), sigma)


def test_unreadable_fid_inputs_are_one_line(weights, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "a.png")
    (folder / "b.png").write_text("not an image")
    ref = images_npz(tmp_path / "ref.npz", 4)
    one_line(cli("fid", folder, ref, "--inception-weights", weights, "--metrics", "fid"), 1, str(folder / "b.png"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    one_line(cli("fid", ref, tmp_path / "bad.npz", "--inception-weights", weights), 2, "bad.npz", "not a readable")
    one_line(cli("fid", ref, ref, "--inception-weights", weights, "--json", tmp_path / "no" / "r.json"), 2,
             "--json", "does not exist")


def test_debug_shows_the_traceback(tmp_path):
    res = CliRunner().invoke(main, ["--debug", "sample", "--ckpt", str(tmp_path / "nope"), "--out",
                                    str(tmp_path / "o"), "--num-samples", "2"])
    assert res.exit_code != 0 and isinstance(res.exception, ValueError)


# ---------------------------------------------------------------------------- options checked before the work
def test_bootstrap_counts_and_blocks_are_checked_before_any_feature_is_extracted(pixel_run, weights, tmp_path,
                                                                                  monkeypatch):
    out = tmp_path / "s"
    assert cli(*sample_args(pixel_run, out, "--num-samples", "8")).exit_code == 0  # groups of 2
    other = tmp_path / "s4"
    assert cli(*sample_args(pixel_run, other, "--num-samples", "8", "--group-size", "4")).exit_code == 0
    ref = images_npz(tmp_path / "ref.npz", 8)
    monkeypatch.setattr(fid, "extract_features", lambda *a, **k: pytest.fail("features extracted"))
    base = ["fid", out, ref, "--inception-weights", weights, "--metrics", "fid"]
    one_line(cli(*base, "--bootstrap", "1000000000"), 2, "--bootstrap")
    one_line(cli(*base, "--bootstrap", "1"), 2, "--bootstrap 1")
    one_line(cli(*base, "--bootstrap", "10", "--bootstrap-block", "8"), 2, "--bootstrap-block 8", "1 block")
    one_line(cli(*base, "--bootstrap", "10", "--bootstrap-block", "3"), 2, "--bootstrap-block 3", "groups of 2")
    one_line(cli(*base, "--bootstrap", "10", "--bootstrap-block", "2", "--paired-with", other), 2,
             "--bootstrap-block 2", "groups of 4", str(other))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "s").iterdir())
    assert not (out / "pool_features.npz").exists()


def test_the_bootstrap_block_defaults_to_the_recorded_group_size(pixel_run, weights, tmp_path):
    out = tmp_path / "s"
    assert cli(*sample_args(pixel_run, out, "--num-samples", "8")).exit_code == 0
    ref = images_npz(tmp_path / "ref.npz", 8)
    res = cli("fid", out, ref, "--inception-weights", weights, "--metrics", "fid", "--bootstrap", "4")
    assert res.exit_code == 0 and "block 2" in res.output, res.output


def test_conflicting_label_options_are_refused(pixel_run, tmp_path):
    one_line(cli(*sample_args(pixel_run, tmp_path / "o", "--random-labels", "--align-labels", "4")), 2,
             "--align-labels and --random-labels conflict")
    one_line(cli("sample", "--ckpt", pixel_run, "--out", tmp_path / "o", "--group-size", "2", "--class-labels", "1,2",
                 "--num-samples", "4"), 2, "--class-labels and --num-samples conflict")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("sizes, message", [("", "--group-sizes ''"), ("1,2,2", "distinct"), ("1,64", "64")])
def test_study_group_sizes_are_checked_before_any_sampling(pixel_run, tmp_path, sizes, message):
    res = cli("study", "--ckpt", pixel_run, "--out", tmp_path / "st", "--group-sizes", sizes, "--num-samples", "64",
              "--steps", "2", "--cpu")
    one_line(res, 2, message)
    assert not (tmp_path / "st" / "N1").exists()


def test_eval_data_from_another_latent_space_is_refused_before_training(data, tmp_path):
    other = write_dataset(tmp_path / "other", hw=4)
    one_line(cli(*train_args(data, tmp_path / "r", "--max-steps", "2", "--eval-data", other)), 2, "--eval-data",
             "latent_shape")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x"])
def test_run_names_stay_inside_results_dir(data, tmp_path, name):
    one_line(cli(*train_args(data, tmp_path / "r", "--max-steps", "2", "--run-name", name)), 2, "--run-name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize("value, shown", [("0", False), ("false", False), ("", False), ("1", True), ("yes", True)])
def test_groupdiff_debug_is_on_only_for_a_truthy_value(tmp_path, monkeypatch, value, shown):
    monkeypatch.setenv("GROUPDIFF_DEBUG", value)
    res = CliRunner().invoke(main, ["sample", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                                    "--num-samples", "2"])
    assert isinstance(res.exception, ValueError) == shown
    if not shown:
        one_line(res, 2, "--ckpt")


def test_odd_lock_files_are_one_line_or_taken_over(data, tmp_path):
    run = tmp_path / "r" / "SiT-Ti-2-l4"
    run.mkdir(parents=True)
    (run / LOCK_NAME).write_text(json.dumps(dict(pid="abc", host="x")))  # not a job's: stale
    assert cli(*train_args(data, tmp_path / "r", "--max-steps", "2")).exit_code == 0
    (run / LOCK_NAME).mkdir()
    one_line(cli(*train_args(data, tmp_path / "r", "--max-steps", "4", "--resume")), 2, str(run / LOCK_NAME),
             "is a folder")


def test_small_sizes_in_messages_are_in_mib():
    from groupdiff_cli.plumbing.files import size_text

    assert size_text(5 * 2**20) == "5.0 MiB" and size_text(3 * 2**30) == "3.0 GiB"


@pytest.mark.parametrize("command", ["encode", "sample"])
def test_a_full_disk_without_a_file_name_names_the_output(pixel_run, tmp_path, monkeypatch, command):
    import groupdiff_cli.data.encode as encode
    import groupdiff_cli.jobs.sampling as sampling

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if command == "encode":
        src = tmp_path / "src" / "a"
        src.mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "x.png")
        monkeypatch.setattr(encode, "encode_shard", full)
        res = cli("encode", tmp_path / "src", tmp_path / "out", "--vae", "pixel", "--embedder", "none",
                  "--image-size", "8", "--num-workers", "0", "--cpu")
        one_line(res, 1, f"OUT {tmp_path / 'out'}", "No space left on device")
    else:
        monkeypatch.setattr(sampling, "write_npz_streaming", full)
        one_line(cli(*sample_args(pixel_run, tmp_path / "o")), 1, f"--out {tmp_path / 'o'}", "No space left")
