"""Named random streams: every random draw of training and sampling, and its seed.

A draw is seeded from the run's seed and the coordinates that fix it (rank, step,
micro-step, window, image index), never from a global generator, so a run resumes
exactly and samples do not depend on the number of processes or the batch size.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """The last coordinate of ``derived_seed`` for the torch streams of training."""

    BATCH = 0  # per batch: flips, noise of the latent moments, label drops (data.GroupBatches)
    DIFFUSION = 1  # per micro-step: diffusion times, their jitter, the noise
    SAMPLE_IDS = 2  # per micro-step: the sample-embedding rows of each group
    SAMPLE_EMBED_INIT = 3  # once: the sample-embedding rows at initialisation (--sample-embed-std)


# sampling: group j's sample-embedding permutation is seeded with seed + GROUP_OFFSET +
# its first image index; image i's own stream with seed + i (sampling.sample_groups)
GROUP_OFFSET = 2**32


def derived_seed(*ints: int) -> int:
    """A 63-bit seed derived from integers (the same in every process and run)."""
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# numpy streams of the data path
def shard_order_rng(seed: int, epoch: int) -> np.random.Generator:
    """The order of the shards in an epoch (the same for every process)."""
    return np.random.default_rng([seed, epoch])


def window_rng(seed: int, rank: int, window: int) -> np.random.Generator:
    """Grouping and batch layout of one window of one process."""
    return np.random.default_rng([seed, rank, window])


def similarity_rng(seed: int, window: int) -> np.random.Generator:
    """The pairs sampled for a window's similarity statistics."""
    return np.random.default_rng([seed, window])
