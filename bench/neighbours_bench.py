"""Window groups against the authors' neighbour groups, and what the neighbour path costs.

1. Group quality: synthetic clustered 768-d unit embeddings (1,000 classes, each of 8
   sub-clusters; a stand-in for DINOv2 features on ImageNet: synthetic geometry, not
   real features) at several data-set sizes. GroupDiff-l's grouping (10% of the images
   in groups of 4) by the window rule (`--grouping similarity`, windows of 20,000,
   threshold 0.7) and by the authors' rule (`--grouping neighbours`, top 100 over the
   whole set): the mean cosine of each mate to its anchor, and the share of groups whose
   mates all pass 0.7.
2. The table's build time (exact, CPU, this machine's threads) at each size, fitted as
   a * N^2 to 1.28M images, and its size on disk.
3. The loader: micro-batches of 32 at ImageNet-256 SD-VAE shapes (4 x 32 x 32 fp16
   moments with the mirrored crop) from the memory-mapped cache, in img/s per process,
   and the epoch plan's time per image (fitted to 1.28M).

    python bench/neighbours_bench.py [--sizes 10000,20000,40000] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from groupdiff_cli.data.latent_cache import CachedRecords
from groupdiff_cli.data.loader import GroupRecipe, build_groups, mates_similarity
from groupdiff_cli.data.neighbours import NeighbourBatches, epoch_groups, top_k

FULL = 1_281_167


def embeddings(n: int, dim: int = 768, classes: int = 1000, sub: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim))
    subs = centers[:, None] + 0.9 * rng.normal(size=(classes, sub, dim))
    labels = rng.integers(0, classes, n)
    x = subs[labels, rng.integers(0, sub, n)] + 1.1 * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def table(emb: np.ndarray, k: int = 100, block: int = 2048) -> np.ndarray:
    t = torch.from_numpy(emb)
    return np.concatenate([top_k(t[i:i + block], t, i, k)[0] for i in range(0, len(emb), block)]).astype(np.int32)


def window_groups(emb, labels, ratio=0.1, n=4, window=20_000, seed=0):
    out = []
    for w0 in range(0, len(emb) - window + 1, window):
        rng = np.random.default_rng([seed, w0])
        g = np.array(build_groups(emb[w0:w0 + window], labels[w0:w0 + window], int(window * ratio / n), n,
                                  "similarity", 0.7, rng)) + w0
        out.append(g)
    return np.concatenate(out)


def quality(sizes, threads):
    torch.set_num_threads(threads)
    print(f"{'images':>8} | {'window rule: mean cos':>22} | {'all mates >= 0.7':>16} | "
          f"{'authors: mean cos':>18} | {'all mates >= 0.7':>16} | table s")
    fits = []
    for n in sizes:
        emb, labels = embeddings(n)
        win = mates_similarity(emb, window_groups(emb, labels, window=min(20_000, n)), labels, 0.7)
        t0 = time.perf_counter()
        tab = table(emb)
        secs = time.perf_counter() - t0
        groups, _ = epoch_groups(tab, 4, 0.1, np.random.default_rng(0))
        auth = mates_similarity(emb, groups, labels, 0.7)
        fits.append((n, secs))
        print(f"{n:>8} | {win['mean']:>22.3f} | {win['all_pass']:>16.1%} | {auth['mean']:>18.3f} | "
              f"{auth['all_pass']:>16.1%} | {secs:.1f}")
    a = np.mean([s / n**2 for n, s in fits])
    print(f"table build fitted as a N^2: {a * FULL**2 / 3600:.1f} h at {FULL:,} images on {threads} CPU thread(s); "
          f"{FULL * 100 * 6 / 2**30:.2f} GiB on disk (int32 indices + float16 cosines, K = 100)")


def loader_speed(n: int = 20_000, batch: int = 32):
    with tempfile.TemporaryDirectory() as tmp:
        shape = (n, 4, 32, 32)
        arrays = {}
        for f in ("mean", "std", "flip_mean", "flip_std"):
            a = np.lib.format.open_memmap(Path(tmp) / f"{f}.npy", "w+", np.float16, shape)
            a[:] = np.random.default_rng(0).normal(size=(1, *shape[1:])).astype(np.float16)
            arrays[f] = a
        labels = np.random.default_rng(0).integers(0, 1000, n)
        data = CachedRecords(labels=labels, emb=None, keys=np.arange(n).astype(str), **arrays)
        emb, _ = embeddings(n, dim=64)
        index = table(emb, k=100)
        info = dict(flip=True, vae_scale=0.18215, vae="stabilityai/sd-vae-ft-ema")
        nb = NeighbourBatches(info, GroupRecipe("l", 4, 0.1, "neighbours", 0.7), data, batch_size=batch, seed=0,
                              num_classes=1000, table=(index, np.ones(index.shape, np.float16)))
        t0 = time.perf_counter()
        nb._plan(0)
        plan = time.perf_counter() - t0
        t0 = time.perf_counter()
        steps = min(nb.per_epoch, 300)
        for s in range(steps):
            nb.batch(s)
        rate = steps * batch / (time.perf_counter() - t0)
    print(f"loader: {rate:,.0f} img/s per process (batches of {batch}, ImageNet-256 SD-VAE shapes, page cache warm); "
          f"epoch plan {plan:.2f} s at {n:,} images -> ~{plan * FULL / n:.0f} s at {FULL:,} (once an epoch)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,20000,40000")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    quality([int(s) for s in a.sizes.split(",")], a.threads)
    loader_speed()
