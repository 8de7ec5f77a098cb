"""The processes of a job: accelerate's process state (one place starts it, so every
command agrees on it), the job lock, worker processes that never outlive their parent,
and the stop signals of schedulers (preemption)."""

from __future__ import annotations

import ctypes
import datetime
import functools
import os
import signal
import sys
import threading

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from groupdiff_cli.plumbing.files import JobLock

# `groupdiff train`'s exit code when a stop signal made it checkpoint and stop early:
# EX_TEMPFAIL, "try again later". A requeue script reruns the command with --resume.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # schedulers' "stop now" / SLURM's --signal=USR1@T
TIMEOUT_ENV = "GROUPDIFF_COLLECTIVE_TIMEOUT"  # minutes (collective_timeout)


def collective_timeout() -> datetime.timedelta:
    """How long a process waits at a collective (``GROUPDIFF_COLLECTIVE_TIMEOUT``, in
    minutes; 120 by default). torch's default, 10 minutes with NCCL, is shorter than what
    the main process may do alone while the others wait: list 1.28M files on a network
    filesystem, join 50,000 samples, write the last checkpoint."""
    value = os.environ.get(TIMEOUT_ENV, "120")
    try:
        minutes = float(value)
        if minutes <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={value}: expected a positive number of minutes") from None
    return datetime.timedelta(minutes=minutes)


def process_state(cpu: bool = False):
    """accelerate's ``PartialState``: under `accelerate launch` the processes join one job.

    On a machine without GPUs the state must be created with ``cpu=True``, or a
    2-process CPU launch silently runs two unconnected single-process jobs. The state
    is a singleton: the first call decides, so every command calls this first.
    """
    return PartialState(cpu=cpu or not torch.cuda.is_available(), timeout=collective_timeout())


@functools.cache
def _monitor_group():
    # a barrier that says who did not arrive is gloo's (monitored_barrier); NCCL jobs get a
    # gloo group beside their own, created by every process at its first wait_for_main
    if torch.distributed.get_backend() == "gloo":
        return None
    return torch.distributed.new_group(backend="gloo", timeout=collective_timeout())


def wait_for_main(state, stage: str) -> None:
    """Every process waits here while the main process does ``stage`` alone. A process
    that does not arrive within ``collective_timeout()`` (stuck, or dead) fails the
    others with one line naming the stage, instead of a backend's watchdog dump."""
    if state.num_processes == 1:
        return
    timeout = collective_timeout()
    try:
        torch.distributed.monitored_barrier(group=_monitor_group(), timeout=timeout, wait_all_ranks=True)
    except RuntimeError as e:  # torch's DistBackendError; its text names the ranks, at length
        raise TimeoutError(f"{stage}: process {state.process_index} waited {timeout} for the others (set "
                           f"{TIMEOUT_ENV} in minutes); one of them is stuck or died: see its log "
                           f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None


def take_job_lock(folder, flag: str, state):
    """The main process takes the folder's job lock (files.JobLock); every process
    learns whether it could, so that a refusal stops all of them alike."""
    lock = JobLock(folder, flag)
    why = [None]
    if state.is_main_process:
        try:
            lock.acquire()
        except ValueError as e:
            why = [str(e)]
    if state.num_processes > 1:
        broadcast_object_list(why)
    if why[0]:
        raise ValueError(why[0])
    return lock


def on_main(state, compute):
    """``compute()`` on the main process alone; every process gets its result (or its
    exception, raised on every process alike, so that none waits on a dead one)."""
    out = [None, None]
    if state.is_main_process:
        try:
            out[0] = compute()
        except Exception as e:  # noqa: BLE001 (passed on to every process, then raised)
            out[1] = e
    if state.num_processes > 1:
        broadcast_object_list(out)
    if out[1] is not None:
        raise out[1]
    return out[0]


def _bind_to_parent(parent_pid: int, _worker_id: int = 0) -> None:
    # The kernel kills this process (SIGKILL) when its parent dies, however the parent
    # dies (kill -9 included), so that no worker outlives its job with the shared
    # memory it maps. Stop signals are the parent's to handle: a worker that died of one
    # would make the parent fail while it writes its last checkpoint.
    for sig in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(0)


def worker_init():
    """A DataLoader ``worker_init_fn`` that ties the worker's life to this process."""
    return functools.partial(_bind_to_parent, os.getpid())


def under_launcher() -> bool:
    """Started by torchrun's agent (`accelerate launch --multi_gpu`, `torchrun`)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


class StopSignals:
    """While active, SIGTERM and SIGUSR1 are recorded instead of ending the process, so
    that the training loop can finish its step, write a checkpoint and stop
    (``requested``). Under a launcher, the death of the launcher (kill -9, or a signal it
    does not pass on) reaches each process as SIGTERM (the kernel's parent-death signal),
    so no process runs on as an orphan. Outside the main thread (where Python cannot take
    signals) it does nothing."""

    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {sig: signal.signal(sig, self._record) for sig in STOP_SIGNALS}
            if under_launcher() and sys.platform.startswith("linux"):
                launcher = os.getppid()
                pr_set_pdeathsig = 1
                ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
                if os.getppid() != launcher:  # it died before the line above took effect
                    self.received = "SIGTERM"
        return self

    def __exit__(self, *exc):
        if self._old and under_launcher() and sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(1, 0)  # no parent-death signal past training
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def _record(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def requested(self, accelerator) -> str | None:
        """The signal any process received (every process gets the same answer, so that
        all of them stop at the same step), or None."""
        if accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor([float(self.received is not None)], device=accelerator.device)
        if accelerator.reduce(flag, reduction="sum").item() == 0:
            return None
        return self.received or "a stop signal (on another process)"
