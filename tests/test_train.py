"""`groupdiff train`: exact resume, multi-process, grouping rules, overfitting, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from groupdiff_cli.cli import main
from groupdiff_cli.data.loader import GroupBatches, GroupRecipe, build_groups, read_dataset
from groupdiff_cli.jobs.train import TrainOptions, train
from groupdiff_cli.science.objectives import Flow
from tests.helpers import checkpoint_weights, launch_two_train, write_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("train") / "data")


def opts(data, results, **kw):
    base = dict(data=str(data), model="SiT-Ti/2", results_dir=str(results), global_batch_size=8, group_size=4,
                group_buffer=16, max_steps=4, ckpt_every=2, log_every=1, keep_last=5, cpu=True, ema_decay=0.9,
                timestep_variance=100.0)
    return TrainOptions(**{**base, **kw})


@pytest.mark.parametrize("model, mode", [("SiT-Ti/2", "l"), ("DiT-Ti/2", "f")])
def test_resumed_run_equals_an_uninterrupted_one_bitwise(data, tmp_path, model, mode):
    straight = train(opts(data, tmp_path / "a", model=model, group_mode=mode, max_steps=4, group_ratio=0.5))
    train(opts(data, tmp_path / "b", model=model, group_mode=mode, max_steps=2, group_ratio=0.5))
    resumed = train(opts(data, tmp_path / "b", model=model, group_mode=mode, max_steps=4, group_ratio=0.5),
                    resume=True)
    a, b = checkpoint_weights(Path(straight["run_dir"]), 4), checkpoint_weights(Path(resumed["run_dir"]), 4)
    for x, y in zip(a[:2], b[:2]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    for sa, sb in zip(a[2]["state"].values(), b[2]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # and training did something: the weights moved away from the step-2 checkpoint
    mid = checkpoint_weights(Path(straight["run_dir"]), 2)[0]
    assert any(not torch.equal(mid[k], a[0][k]) for k in mid)
    log = [json.loads(line) for line in (Path(straight["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log)


def test_grouping_by_similarity_finds_the_known_neighbours():
    emb = np.repeat(np.eye(8), 4, axis=0)  # 8 clusters of 4 identical unit vectors
    labels = np.zeros(32, int)
    rng = np.random.default_rng(0)
    groups = build_groups(emb, labels, 8, 4, "similarity", 0.7, rng)
    assert sorted(sorted(g) for g in groups) == [list(range(4 * c, 4 * c + 4)) for c in range(8)]
    # too few pass the threshold: the nearest ones fill the group
    emb2 = np.array([[1, 0], [0.9, 0.436], [0.6, 0.8], [0, 1]], float)
    g = build_groups(emb2, np.zeros(4, int), 1, 3, "similarity", 0.95, np.random.default_rng(1))[0]
    anchor = g[0]
    sims = emb2 @ emb2[anchor]
    others = [i for i in range(4) if i != anchor]
    assert sorted(g[1:]) == sorted(sorted(others, key=lambda i: -sims[i])[:2])
    by_class = build_groups(None, np.arange(32) % 4, 8, 4, "class", 0, np.random.default_rng(2))
    assert all(len({i % 4 for i in grp}) == 1 for grp in by_class)


def test_batches_use_each_sample_once_split_ranks_and_respect_the_ratio(data):
    info = read_dataset(data)
    ranks = [GroupBatches(info, GroupRecipe("l", 4, 0.25, "similarity", 0.7), batch_size=4, window=16, seed=0,
                          num_classes=4, rank=r, world=2) for r in (0, 1)]
    keys = [sum((ranks[r].batch(i).keys for i in range(4)), []) for r in (0, 1)]
    assert len(set(keys[0])) == 16 and len(set(keys[1])) == 16  # a whole window, no repeats
    assert not set(keys[0]) & set(keys[1])  # the processes read different shards
    f = GroupBatches(info, GroupRecipe("f", 4, 0, "similarity", 0.7),
                     batch_size=8, window=32, seed=0, num_classes=4)
    for i in range(4):
        b = f.batch(i)
        assert b.group_sizes == [4, 4]
        for g in (b.keys[:4], b.keys[4:]):  # members share their embedding cluster (key % 8)
            assert len({int(k) % 8 for k in g}) == 1
    lmode = GroupBatches(info, GroupRecipe("l", 4, 0.1, "similarity", 0.7),
                         batch_size=8, window=32, seed=0, num_classes=4)
    fractions = [lmode.batch(i).grouped_fraction for i in range(40)]
    assert abs(np.mean(fractions) - 0.1) < 0.02
    b = lmode.batch(0)
    grouped = [n > 1 for n in b.group_sizes for _ in range(n)]
    assert all(y == 4 for y, g in zip(b.labels.tolist(), grouped) if g)  # null label for grouped images
    fresh = GroupBatches(info, GroupRecipe("l", 4, 0.1, "similarity", 0.7),
                         batch_size=8, window=32, seed=0, num_classes=4)
    again = fresh.batch(0)  # a batch is a pure function of its index: what a resume relies on
    assert again.keys == b.keys and torch.equal(again.latents, b.latents) and torch.equal(again.labels, b.labels)


@pytest.mark.parametrize("model", ["SiT-Ti/2", "DiT-Ti/2"])
def test_loss_falls_by_half_on_a_handful_of_latents(tmp_path, model):
    d = write_dataset(tmp_path / "tiny", n=4, classes=2, shard_size=4, hw=4)
    res = train(opts(d, tmp_path / "r", model=model, group_mode="none", global_batch_size=4, group_buffer=4,
                     max_steps=150, ckpt_every=150, log_every=25, lr=2e-3, timestep_variance=0.0))
    log = [json.loads(line) for line in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"], [r["loss"] for r in log]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    real = Flow.loss
    calls = {"n": 0}

    def poisoned(self, out, x0, xt, t_net, noise):
        calls["n"] += 1
        loss = real(self, out, x0, xt, t_net, noise)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(Flow, "loss", poisoned)
    with pytest.raises(FloatingPointError, match="step 3: the loss is nan"):
        train(opts(data, tmp_path / "r", max_steps=6))
    run = tmp_path / "r" / "SiT-Ti-2-l4"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]
    assert load_file(str(run / "checkpoints" / "step_0000002" / "model.safetensors"))


def cli(*args):
    return CliRunner().invoke(main, ["train", *map(str, args)])


def test_bad_input_is_one_line_with_exit_code_2(data, tmp_path):
    (tmp_path / "empty").mkdir()
    common = ["--results-dir", tmp_path / "runs", "--cpu", "--max-steps", "1"]
    cases = [
        (["--data", tmp_path / "missing", *common], "--data"),
        (["--data", tmp_path / "empty", *common], "no dataset.json"),
        (["--data", data, "--model", "SiT-Ti/2", "--group-size", "17", *common], "--group-size 17 is outside"),
        (["--data", data, "--model", "SiT-Ti/2", "--global-batch-size", "10", *common],
         "--global-batch-size 10 is not a multiple of processes (1) x --grad-accum (1) x --group-size (4) = 4"),
        (["--data", data, "--model", "SiT-Q/2", *common], "--model SiT-Q/2: unknown model"),
        (["--data", data, "--model", "SiT-Ti/2", "--run-name", "nothing", "--resume", *common],
         "--resume: no complete checkpoint"),
    ]
    for args, message in cases:
        res = cli(*args)
        assert res.exit_code == 2, (args, res.output)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], res.output


def test_existing_run_needs_resume_and_the_same_options(data, tmp_path):
    args = ["--data", data, "--model", "SiT-Ti/2", "--results-dir", tmp_path, "--global-batch-size", "8",
            "--group-buffer", "16", "--ckpt-every", "2", "--cpu"]
    assert cli(*args, "--max-steps", "2").exit_code == 0
    again = cli(*args, "--max-steps", "2")
    assert again.exit_code == 2 and "a run is already there; pass --resume" in again.output
    other = cli(*args, "--max-steps", "2", "--lr", "0.001", "--resume")
    assert other.exit_code == 2 and "--resume: options differ from the run" in other.output and "lr" in other.output
    longer = cli(*args, "--max-steps", "3", "--resume")  # only --max-steps may change
    assert longer.exit_code == 0, longer.output
    assert "trained to step 3" in longer.output


def test_two_process_launch_keeps_weights_equal_and_logs_the_mean_loss(data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", "0", "-m", "groupdiff_cli", "train", "--data", str(data),
                          "--model", "SiT-Ti/2", "--results-dir", str(tmp_path), "--global-batch-size", "16",
                          "--group-buffer", "8", "--max-steps", "3", "--ckpt-every", "3", "--log-every", "1",
                          "--cpu"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "SiT-Ti-2-l4"
    state = json.loads((run / "checkpoints" / "step_0000003" / "state.json").read_text())
    assert state["processes"] == 2 and len(state["param_sums"]) == 2
    assert state["param_sums"][0] == state["param_sums"][1]
    for rec in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        assert len(rec["loss_per_rank"]) == 2 and rec["loss_per_rank"][0] != rec["loss_per_rank"][1]
        assert rec["loss"] == pytest.approx(np.mean(rec["loss_per_rank"]), rel=1e-6)
    assert res.stdout.count("trained to step 3") == 1


def test_a_two_process_run_killed_mid_run_resumes_to_the_same_weights(data, tmp_path):
    """Preemption: a process of a running 2-process job is killed (SIGKILL, no cleanup),
    the launcher takes the other down; the job started again with --resume ends with the
    weights of a run that was never interrupted."""
    import signal
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1")
    straight = subprocess.run(launch_two_train(data, tmp_path / "a", "--max-steps", "12"), capture_output=True, text=True,
                              env=env, cwd=ROOT)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = tmp_path / "b" / "SiT-Ti-2-l4"
    job = subprocess.Popen(launch_two_train(data, tmp_path / "b", "--max-steps", "12"), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    try:
        deadline = time.time() + 300
        while not (run / "checkpoints" / "step_0000002" / "state.json").exists():
            assert job.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.2)
        main_pid = json.loads((run / ".groupdiff.lock").read_text())["pid"]
        os.kill(main_pid, signal.SIGKILL)
        job.wait(timeout=120)
    finally:
        job.kill()
    if job.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    assert (run / ".groupdiff.lock").exists()  # died without cleaning up
    again = subprocess.run(launch_two_train(data, tmp_path / "b", "--max-steps", "12", "--resume"), capture_output=True,
                           text=True, env=env, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    for x, y in zip(checkpoint_weights(tmp_path / "a" / "SiT-Ti-2-l4", 12)[:2], checkpoint_weights(run, 12)[:2]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_the_objective_is_chosen_once_recorded_and_sampled_with(data, tmp_path):
    from groupdiff_cli.jobs.sampling import build_job, job_objective

    res = train(opts(data, tmp_path / "r", model="SiT-Ti/2", objective="ddpm", max_steps=1, ckpt_every=1))
    assert json.loads((Path(res["run_dir"]) / "config.json").read_text())["train"]["objective"] == "ddpm"
    job, model = build_job(res["run_dir"], num_samples=4, steps=3, warn=lambda m: None)
    assert (job.objective, job.sampler) == ("ddpm", "ddpm")  # not the SiT family's flow
    assert job_objective(job, model).num_timesteps == 3
    with pytest.raises(ValueError, match="objective 'edm': choose from ddpm, flow"):
        train(opts(data, tmp_path / "s", objective="edm"))


def test_a_preset_sets_the_options_not_given_on_the_command_line(data, tmp_path):
    res = CliRunner().invoke(main, ["train", "--data", str(data), "--preset", "shapes-l4", "--model", "SiT-Ti/2",
                                    "--global-batch-size", "8", "--group-buffer", "16", "--max-steps", "1",
                                    "--results-dir", str(tmp_path), "--run-name", "p", "--lr", "1e-3", "--cpu"])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "p" / "config.json").read_text())["train"]
    assert (saved["model"], saved["global_batch_size"], saved["lr"]) == ("SiT-Ti/2", 8, 1e-3)  # given: kept
    assert (saved["group_ratio"], saved["ema_decay"]) == (0.25, 0.995)  # not given: the preset's


def test_checkpoints_are_written_while_training_goes_on_and_flushed_before_the_rename(data, tmp_path, monkeypatch):
    import threading

    import groupdiff_cli.jobs.train as train_mod
    import groupdiff_cli.science.checkpoints as checkpoints

    events, written = [], threading.Event()
    real_save, real_fsync, real_step = checkpoints.save_checkpoint, checkpoints._fsync, train_mod.Run.train_step

    def slow_save(run_dir, step, *a):
        events.append(("write", step))
        if step == 2:  # the write of step 2 lasts until the loop has trained step 3
            assert written.wait(60), "the loop waited for the write"
        out = real_save(run_dir, step, *a)
        events.append(("written", step))
        return out

    def step(self, *a):
        real_step(self, *a)
        events.append(("step", self.step))
        if self.step == 3:
            written.set()

    monkeypatch.setattr(checkpoints, "save_checkpoint", slow_save)
    monkeypatch.setattr(checkpoints, "_fsync", lambda p: events.append(("fsync", Path(p).name)) or real_fsync(p))
    monkeypatch.setattr(train_mod.Run, "train_step", step)
    out = train(opts(data, tmp_path))
    order = [e for e in events if e[0] != "fsync"]
    assert order.index(("step", 3)) < order.index(("written", 2))  # training went on during the write
    assert order[-1] == ("written", 4)  # and the run returned only once the last one was on disk
    final = Path(out["run_dir"]) / "checkpoints" / "step_0000004"
    synced = {name for kind, name in events if kind == "fsync"}
    assert {p.name for p in final.iterdir()} <= synced and {".tmp_0000004", "checkpoints"} <= synced
