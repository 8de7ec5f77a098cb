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
