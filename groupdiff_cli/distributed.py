"""One place that starts accelerate's process state, so every command agrees on it."""

from __future__ import annotations

import torch


def process_state(cpu: bool = False):
    """accelerate's ``PartialState``: under `accelerate launch` the processes join one job.

    On a machine without GPUs the state must be created with ``cpu=True``, or a
    2-process CPU launch silently runs two unconnected single-process jobs. The state
    is a singleton: the first call decides, so every command calls this first.
    """
    from accelerate import PartialState

    return PartialState(cpu=cpu or not torch.cuda.is_available())


def take_job_lock(folder, flag: str, state):
    """The main process takes the folder's job lock (files.JobLock); every process
    learns whether it could, so that a refusal stops all of them alike."""
    from accelerate.utils import broadcast_object_list

    from groupdiff_cli.files import JobLock

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
