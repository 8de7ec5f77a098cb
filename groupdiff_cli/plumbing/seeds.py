"""Named random streams: every random draw of the project, and its seed.

A draw is seeded from the run's seed and the coordinates that fix it (rank, step,
micro-step, window, image index), never from a global generator, so a run resumes
exactly and samples do not depend on the number of processes or the batch size.
The one use of torch's global generator is a network's initialisation
(``seed_initialisation``), as in the reference DiT code.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    """The last coordinate of ``derived_seed`` for the torch streams of training, and the
    second of the streams of sampling."""

    BATCH = 0  # per batch: flips, noise of the latent moments, label drops (data.GroupBatches)
    DIFFUSION = 1  # per micro-step: diffusion times, their jitter, the noise
    SAMPLE_IDS = 2  # per micro-step: the sample-embedding rows of each group
    SAMPLE_EMBED_INIT = 3  # once: the sample-embedding rows at initialisation (--sample-embed-std)
    IMAGE = 4  # sampling: image i's own stream, keyed (seed, IMAGE, i)
    GROUP_ROWS = 5  # sampling: the sample-embedding rows of the group whose first image is i


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


def neighbour_plan_rng(seed: int, epoch: int) -> np.random.Generator:
    """The order of anchors and the free pool of one epoch under --grouping neighbours
    (the same for every process)."""
    return np.random.default_rng([seed, epoch, 0x6e67])


def similarity_rng(seed: int, window: int) -> np.random.Generator:
    """The pairs sampled for a window's similarity statistics."""
    return np.random.default_rng([seed, window])


# torch streams of sampling and evaluation
def seeds_of_images(seed: int, first_index: int, count: int) -> list[int]:
    """The seeds of images first_index .. first_index + count - 1 of a sampling job, keyed
    by (seed, image index): different --seed values give independent images (not the
    same images shifted by one), whatever the batch or the number of processes."""
    return [derived_seed(seed, Stream.IMAGE, first_index + i) for i in range(count)]


def image_generator(image_seed: int) -> torch.Generator:
    """One image's stream: its sample-embedding row alone, its starting noise, then
    the noise of each stochastic sampler step."""
    return torch.Generator().manual_seed(int(image_seed))


def group_rows_generator(seed: int, first_index: int) -> torch.Generator:
    """The sample-embedding rows of the group whose first image is ``first_index``."""
    return torch.Generator().manual_seed(derived_seed(seed, Stream.GROUP_ROWS, first_index))


def label_generator(seed: int) -> torch.Generator:
    """The classes of ``sample --random-labels``."""
    return torch.Generator().manual_seed(seed)


def evaluation_generator(seed: int, device="cpu") -> torch.Generator:
    """A fixed stream for a held-out measurement (branch losses: noise, then per batch
    the seed of its sample-embedding rows)."""
    return torch.Generator(device=device).manual_seed(seed)


def seed_initialisation(seed: int) -> None:
    """Seed torch's global generator, which a module's own initialisation draws from."""
    torch.manual_seed(seed)


# numpy streams outside training
def encode_order_rng(seed: int) -> np.random.Generator:
    """The order in which `encode` writes the images into shards."""
    return np.random.default_rng(seed)


class Draw(IntEnum):
    """The numpy draws of measurements, each a stream of its own (``evaluation_rng``)."""

    BOOTSTRAP = 0  # the blocks each bootstrap resample draws (metrics.resampled_fids)
    PRC_SUBSET = 1  # the reference images precision and recall use when there are more than 10k
    HELDOUT_GROUPS = 2  # the similarity groups of held-out images (branch losses)
    DIGITS_SPLIT = 3  # the digits held out from the demo classifier's training


def evaluation_rng(seed: int, draw: Draw) -> np.random.Generator:
    """The stream of one kind of draw of a measurement, keyed by (seed, draw) so that no
    two kinds share numbers. The bootstrap's is keyed by the seed alone: the stream the
    published intervals were drawn with, and distinct from every (seed, draw) one."""
    if draw == Draw.BOOTSTRAP:
        return np.random.default_rng(seed)
    return np.random.default_rng([seed, int(draw)])
