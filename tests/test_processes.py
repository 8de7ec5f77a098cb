"""What a scheduler does to a training job: kill -9 leaves no process or shared memory
behind; SIGTERM / SIGUSR1 make `train` checkpoint, say so and exit 75, and --resume
continues to the weights of a run that was never stopped."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from groupdiff_cli.plumbing.distributed import PREEMPTED_EXIT_CODE
from tests.helpers import checkpoint_weights, launch_two_train, write_dataset

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("procs") / "data", n=64)


def train_cmd(data, results, *extra):
    return [sys.executable, "-m", "groupdiff_cli", "train", "--data", str(data), "--model", "SiT-Mi/2",
            "--results-dir", str(results), "--run-name", "r", "--global-batch-size", "8", "--group-buffer", "32",
            "--log-every", "1", "--cpu", *extra]


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_tree(job) -> None:
    """A test's cleanup: the job and every process below it (torchrun starts its
    processes in sessions of their own, out of reach of a process-group kill)."""
    todo, found = [job.pid], []
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children(pid)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for_step(job, run: Path, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while True:
        rows = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
        if rows and json.loads(rows[-1])["step"] >= step:
            return
        assert job.poll() is None, "the run ended early"
        assert time.time() < deadline, "no progress"
        time.sleep(0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the worker is tied to its parent with prctl")
def run_unix_socket_collector():
    """A window handed over between processes travels as a file descriptor inside a Unix
    socket; when both ends die with it in flight, the kernel frees it only when its
    collector runs, which closing any socket with a descriptor in flight starts."""
    a, b = socket.socketpair(socket.AF_UNIX)
    socket.send_fds(a, [b"x"], [a.fileno()])
    a.close()
    b.close()


def test_kill_9_leaves_no_worker_and_no_shared_memory(data, tmp_path):
    shm_before = shutil.disk_usage("/dev/shm").used
    # a window large enough that the worker's message for the next one fills the pipe to
    # its parent: torch's own worker then hangs for good once the parent is gone
    cmd = train_cmd(data, tmp_path, "--max-steps", "100000", "--ckpt-every", "100000") + ["--group-buffer", "4096"]
    job = subprocess.Popen(cmd,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT)
    try:
        wait_for_step(job, tmp_path / "r", 2)
        time.sleep(2)  # the worker has built the next window and is handing it over
        workers = children(job.pid)
        assert workers, "the loader's worker process was not found"
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
        deadline = time.time() + 20
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(alive(w) for w in workers)
    finally:
        kill_tree(job)
    # the worker's windows were the only shared memory of the job (a little slack for others);
    # the kernel frees the pages of a killed process's descriptors a moment after it is gone
    deadline = time.time() + 30
    while shutil.disk_usage("/dev/shm").used > shm_before + (1 << 20) and time.time() < deadline:
        run_unix_socket_collector()
        time.sleep(0.2)
    assert shutil.disk_usage("/dev/shm").used <= shm_before + (1 << 20)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_checkpoints_exits_75_and_resume_is_bitwise(data, tmp_path, sig):
    run = tmp_path / "b" / "r"
    job = subprocess.Popen(train_cmd(data, tmp_path / "b", "--max-steps", "100000", "--ckpt-every", "100000"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        wait_for_step(job, run, 3)
        workers = children(job.pid)
        job.send_signal(sig)
        _, err = job.communicate(timeout=120)
    finally:
        kill_tree(job)
    assert job.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
    lines = [ln for ln in err.splitlines() if "--resume" in ln]
    assert len(lines) == 1 and sig.name in lines[0] and "Traceback" not in err
    step = json.loads((run / "checkpoints").glob("step_*/state.json").__next__().read_text())["step"]
    assert step >= 3 and f"step {step} " in lines[0]
    assert not any(alive(w) for w in workers)
    # the same command with --resume, then two more steps, equals a run never stopped
    again = subprocess.run(train_cmd(data, tmp_path / "b", "--max-steps", str(step + 2), "--ckpt-every", "100000",
                                     "--resume"), capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    straight = subprocess.run(train_cmd(data, tmp_path / "a", "--max-steps", str(step + 2), "--ckpt-every",
                                        "100000"), capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert straight.returncode == 0, straight.stderr[-2000:]
    for x, y in zip(checkpoint_weights(tmp_path / "a" / "r", step + 2)[:2], checkpoint_weights(run, step + 2)[:2]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_the_launcher_passes_usr1_on_and_every_process_stops_at_the_same_step(data, tmp_path):
    """What the SLURM example does: `accelerate launch` told to hand SIGUSR1 to its
    processes (PET_SIGNALS_TO_HANDLE, torchrun's --signals-to-handle); both checkpoint the same step and stop;
    --resume then ends with the weights of a run never stopped."""

    env = dict(ENV, PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    run = tmp_path / "b" / "SiT-Ti-2-l4"
    job = subprocess.Popen(launch_two_train(data, tmp_path / "b", "--max-steps", "100000", "--ckpt-every", "100000"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        wait_for_step(job, run, 2, timeout=300)
        job.send_signal(signal.SIGUSR1)
        _, err = job.communicate(timeout=120)
    finally:
        kill_tree(job)
    assert job.returncode == 128 + signal.SIGUSR1, err[-2000:]  # the launcher's own code for a signal
    assert "SIGUSR1: stopped at step" in err
    (ckpt,) = (run / "checkpoints").glob("step_*")
    step = json.loads((ckpt / "state.json").read_text())["step"]
    launch = launch_two_train
    again = subprocess.run(launch(data, tmp_path / "b", "--max-steps", str(step + 2), "--ckpt-every", "100000",
                                  "--resume"),
                           capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    straight = subprocess.run(launch(data, tmp_path / "a", "--max-steps", str(step + 2), "--ckpt-every", "100000"),
                              capture_output=True,
                              text=True, env=ENV, cwd=ROOT)
    assert straight.returncode == 0, straight.stderr[-2000:]
    for x, y in zip(checkpoint_weights(tmp_path / "a" / "SiT-Ti-2-l4", step + 2)[:2], checkpoint_weights(run, step + 2)[:2]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_the_ranks_stop_with_a_checkpoint_when_their_launcher_is_killed(data, tmp_path):
    """kill -9 of `accelerate launch` (or a signal it does not pass on): the kernel tells
    each rank that its parent died (SIGTERM); every rank finishes its step, the job writes
    one checkpoint and no process is left running; --resume continues."""

    run = tmp_path / "b" / "SiT-Ti-2-l4"
    job = subprocess.Popen(launch_two_train(data, tmp_path / "b", "--max-steps", "100000", "--ckpt-every", "100000"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT)
    try:
        wait_for_step(job, run, 2, timeout=300)
        ranks = children(job.pid)
        assert len(ranks) >= 2
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
        deadline = time.time() + 120
        while any(alive(r) for r in ranks) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(alive(r) for r in ranks), "a rank outlived its launcher"
    finally:
        kill_tree(job)
    (ckpt,) = (run / "checkpoints").glob("step_*")
    step = json.loads((ckpt / "state.json").read_text())["step"]
    assert step >= 2
    again = subprocess.run(launch_two_train(data, tmp_path / "b", "--max-steps", str(step + 1), "--ckpt-every", "100000",
                                       "--resume"), capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]


def test_a_worker_killed_mid_step_is_one_line_and_resume_goes_on(data, tmp_path):
    """The out-of-memory killer's work: the worker dies while the step trains."""
    cmd = train_cmd(data, tmp_path, "--max-steps", "100000", "--ckpt-every", "2")
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        wait_for_step(job, tmp_path / "r", 3)
        for worker in children(job.pid):
            os.kill(worker, signal.SIGKILL)
        _, err = job.communicate(timeout=120)
    finally:
        kill_tree(job)
    assert job.returncode == 1, err[-2000:]
    errors = [ln for ln in err.splitlines() if "Error: " in ln]
    assert len(errors) == 1 and "worker process died (killed by signal" in errors[0] and "Traceback" not in err
    assert errors[0].startswith("Error: ")  # on a line of its own, not after a progress bar
    again = subprocess.run(train_cmd(data, tmp_path, "--max-steps", "4", "--ckpt-every", "2", "--resume"),
                           capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]


def in_namespace_with_shm(options: str, cmd: list[str]) -> subprocess.CompletedProcess:
    """``cmd`` in a private mount namespace whose /dev/shm is a fresh tmpfs with ``options``."""
    script = f"mount -t tmpfs -o {options} tmpfs /dev/shm && exec \"$@\""
    return subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", *cmd], capture_output=True, text=True,
                          env=ENV, cwd=ROOT)


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare as root")
def test_a_read_only_dev_shm_is_one_line_naming_the_way_out(data, tmp_path):
    probe = in_namespace_with_shm("ro,size=1m", ["true"])
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.strip()}")
    res = in_namespace_with_shm("ro,size=1m", train_cmd(data, tmp_path, "--max-steps", "2"))
    errors = [ln for ln in res.stderr.splitlines() if "Error: " in ln]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "Read-only file system" in errors[0] and "--num-workers 0" in errors[0]
    ok = in_namespace_with_shm("ro,size=1m", train_cmd(data, tmp_path, "--max-steps", "2", "--num-workers", "0"))
    assert ok.returncode == 0, ok.stderr[-2000:]
    images = tmp_path / "imgs.npz"
    np.savez(images, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    res = in_namespace_with_shm("ro,size=1m", [sys.executable, "-m", "groupdiff_cli", "fid", str(images),
                                               str(images), "--metrics", "fid", "--num-workers", "2",
                                               "--inception-weights", str(tmp_path / "missing.pth")])
    assert res.returncode == 2  # the weights are checked first: a bad flag before any worker starts


def test_a_signal_only_one_rank_sees_stops_both_at_one_step(data, tmp_path):
    """The decision to stop and to write the last checkpoint is agreed by every rank (not
    read off each rank's own signal or filesystem), so the job neither hangs nor splits."""

    run = tmp_path / "b" / "SiT-Ti-2-l4"
    job = subprocess.Popen(launch_two_train(data, tmp_path / "b", "--max-steps", "100000", "--ckpt-every", "100000"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        wait_for_step(job, run, 2, timeout=300)
        ranks = sorted(children(job.pid))
        os.kill(ranks[-1], signal.SIGTERM)  # one rank only, as a node-local OOM handler might
        _, err = job.communicate(timeout=180)
        assert not any(alive(r) for r in ranks)
    finally:
        kill_tree(job)
    (ckpt,) = (run / "checkpoints").glob("step_*")
    state = json.loads((ckpt / "state.json").read_text())
    assert state["processes"] == 2 and len(state["param_sums"]) == 2
    again = subprocess.run(launch_two_train(data, tmp_path / "b", "--max-steps", str(state["step"] + 1), "--ckpt-every",
                                       "100000", "--resume"), capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]


def test_sigterm_outside_training_is_one_line_and_the_rerun_finishes(tmp_path):
    """`sample` stopped mid-run (or while it imports): one line, exit 75, no traceback; the
    chunks written so far are kept and the same command finishes the job."""
    from groupdiff_cli.jobs.demo import PRETRAINED

    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "groupdiff_cli", "sample", "--ckpt", str(PRETRAINED), "--out", str(out),
           "--num-samples", "256", "--chunk-groups", "4", "--steps", "4", "--sampler", "heun", "--cpu"]
    for wait_for in (None, out / "sample_config.json"):
        job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
        try:
            deadline = time.time() + 120
            while wait_for is not None and not wait_for.exists():
                assert job.poll() is None and time.time() < deadline
                time.sleep(0.05)
            time.sleep(1)
            job.send_signal(signal.SIGTERM)
            _, err = job.communicate(timeout=120)
        finally:
            kill_tree(job)
        assert job.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
        assert "SIGTERM: stopped; what was written is kept" in err and "Traceback" not in err
    again = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (256, 8, 8, 3)


def test_a_process_that_never_arrives_fails_the_others_in_bounded_time_naming_the_stage(tmp_path, monkeypatch):
    from groupdiff_cli.plumbing.distributed import collective_timeout

    script = tmp_path / "stage.py"
    script.write_text("import sys, time\n"
                      "from groupdiff_cli.plumbing.distributed import process_state, wait_for_main\n"
                      "state = process_state(cpu=True)\n"
                      "if state.is_main_process:\n"
                      "    time.sleep(float(sys.argv[1]))\n"
                      "wait_for_main(state, 'sample: joining the chunks into samples.npz')\n"
                      "print('arrived', state.process_index, flush=True)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", GROUPDIFF_COLLECTIVE_TIMEOUT="0.1")  # 6 s
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    t0 = time.time()
    stuck = subprocess.run([*launch, script, "60"], capture_output=True, text=True, env=env, timeout=120)
    assert stuck.returncode != 0 and time.time() - t0 < 50
    assert ("TimeoutError: sample: joining the chunks into samples.npz: process 1 waited 0:00:06 for the others "
            "(set GROUPDIFF_COLLECTIVE_TIMEOUT in minutes)") in stuck.stderr
    monkeypatch.setenv("GROUPDIFF_COLLECTIVE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="GROUPDIFF_COLLECTIVE_TIMEOUT=soon: expected a positive number of minutes"):
        collective_timeout()
    monkeypatch.delenv("GROUPDIFF_COLLECTIVE_TIMEOUT")
    assert collective_timeout().total_seconds() == 7200
