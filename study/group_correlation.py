"""Does joint sampling change the images, or only how alike group-mates are?

A study's FID at N > 1 can rise for two reasons that a paired interval cannot tell
apart: the marginal distribution of single images got worse (the model's fault), or
group-mates came out alike, so 2,048 samples hold fewer independent ones and FID's
finite-sample bias grows (a property of the estimate, which vanishes with more groups).
This separates them from the pool features a `groupdiff study` keeps in each N{n}/:

- mate similarity: the mean cosine similarity of the centred Inception features of two
  images of one group, against two images of the same class from different groups (at
  N = 1, "mates" are the images of one block: independent draws, the control);
- KID over all pairs (what `fid --metrics kid` estimates, up to its subsets) against
  KID whose sample-sample term leaves out the pairs inside one block (of --block
  images, whole groups): the second is unbiased for the marginal even when mates are
  correlated, so the gap between the two is the part that mate correlation adds;
- FID against the sample count: FID of nested subsets of whole blocks (the same blocks
  at every N), fitted as a + b/n; a is FID at infinitely many groups (FID-infinity,
  Chong & Forsyth 2020) and b grows when fewer of the samples are independent;
- the bootstrap's own bias estimate (blocks resampled whole), and FID minus it;
- FID split into its mean term |mu - mu_ref|^2 and the rest (the covariance terms);
- pixel statistics of the samples (N{n}/samples.npz) and, with --ref-images, of the
  data: per-image contrast (pixel standard deviation) and saturation (max - min over
  the colour channels), to see which way the images move.

    python study/group_correlation.py STUDY_DIR REF_STATS.npz [--block 16] [--ref-images IMAGES] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from torch_fidelity.metric_kid import kernel_poly

from groupdiff_cli.evaluation import fid, images, metrics
from groupdiff_cli.plumbing import layout


def mate_similarity(pool: np.ndarray, labels: np.ndarray, group: int) -> dict:
    """Mean cosine similarity of centred features: group-mates (the same group of
    ``group`` consecutive images) against same-class images of different groups."""
    x = pool - pool.mean(0)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = x @ x.T
    idx = np.arange(len(x))
    same_group = (idx[:, None] // group) == (idx[None] // group)
    same_class = labels[:, None] == labels[None]
    off = ~np.eye(len(x), dtype=bool)
    return dict(mates=float(cos[same_group & off].mean()),
                same_class_other_groups=float(cos[same_class & ~same_group].mean()),
                other_class=float(cos[~same_class].mean()))


def kid_pairs(pool: np.ndarray, ref_pool: np.ndarray, block: int) -> dict:
    """Unbiased MMD^2 (x 1000, as KID is usually quoted) over all sample pairs, and over
    the sample pairs from different blocks only; KID's kernel, torch-fidelity's
    (x.y / d + 1)^3."""
    kxx, kyy, kxy = kernel_poly(pool, pool), kernel_poly(ref_pool, ref_pool), kernel_poly(pool, ref_pool)
    n, m = len(pool), len(ref_pool)
    idx = np.arange(n)
    other_block = (idx[:, None] // block) != (idx[None] // block)
    yy_minus_xy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    xx_all = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    xx_cross = kxx[other_block].mean()
    return dict(kid_all_pairs=1000 * float(xx_all + yy_minus_xy), kid_other_blocks=1000 * float(xx_cross + yy_minus_xy))


def fid_against_count(pools: dict, fd, block: int, sizes, repeats: int, seed: int = 0) -> dict:
    """FID of random subsets of whole blocks (the same blocks for every N), averaged over
    ``repeats`` draws per size, and the least-squares fit FID = a + b / n."""
    n = len(next(iter(pools.values())))
    blocks = n // block
    rng = np.random.default_rng(seed)
    draws = {s: [rng.choice(blocks, s // block, replace=False) for _ in range(repeats)] for s in sizes}
    out = {}
    for key, pool in pools.items():
        b = pool.reshape(blocks, block, -1)
        means = {s: float(np.mean([fd.of_features(b[d].reshape(s, -1)) for d in draws[s]])) for s in sizes}
        means[n] = fd.of_features(pool)
        xs = np.array([1 / s for s in means])
        ys = np.array(list(means.values()))
        slope, intercept = np.polyfit(xs, ys, 1)
        out[key] = dict(fid_at=means, fid_infinity=float(intercept), slope=float(slope))
    return out


def pixel_stats(images: np.ndarray) -> dict:
    """(n, H, W, 3) uint8 -> mean per-image contrast and saturation, in [0, 1] units."""
    x = images.astype(np.float64) / 255
    return dict(contrast=float(x.reshape(len(x), -1, 3).std(1).mean()),
                saturation=float((x.max(-1) - x.min(-1)).mean()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", type=Path, help="a `groupdiff study` folder (N{n}/pool_features.npz, labels.npy)")
    p.add_argument("ref", type=Path, help="the reference statistics the study used (with pool features)")
    p.add_argument("--block", type=int, default=16, help="images per block: a multiple of every group size")
    p.add_argument("--sizes", default="256,512,1024", help="subset sizes for FID against the sample count")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--bootstrap", type=int, default=50)
    p.add_argument("--ref-images", type=Path, help="the reference images, for their pixel statistics: an ADM .npz "
                   "or a folder of image files (what `groupdiff fid` reads)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    ref = fid.load_reference_stats(args.ref)
    fd = metrics.FrechetDistance(ref.mu, ref.sigma)
    runs = sorted((int(d.name[1:]), d) for d in args.study.glob("N*") if (d / layout.POOL_FEATURES).exists())
    pools = {n: np.load(d / layout.POOL_FEATURES)["pool"].astype(np.float64) for n, d in runs}
    counts = fid_against_count(pools, fd, args.block, [int(s) for s in args.sizes.split(",")], args.repeats)
    report = {}
    ref_pool = ref.pool.astype(np.float64)
    for n, folder in runs:
        pool = pools[n]
        est = counts[n]["fid_at"][len(pool)]  # the full set's FID, computed once
        boot = metrics.bootstrap_fid(pool, fd, args.bootstrap, args.block, estimate=est)
        with np.load(folder / "samples.npz") as f:
            pixels = pixel_stats(f["arr_0"])
        report[n] = dict(fid=est, bootstrap_bias=boot["bias"], fid_minus_bias=est - boot["bias"],
                         mean_term=float(((pool.mean(0) - ref.mu) ** 2).sum()), **pixels,
                         trace_cov=float(pool.var(0, ddof=1).sum()),
                         similarity=mate_similarity(pool, np.load(folder / "labels.npy"), n if n > 1 else args.block),
                         **kid_pairs(pool, ref_pool, args.block), **counts[n])
    print(f"{'N':>3} {'FID':>8} {'boot bias':>9} {'FID-bias':>8} {'FID-inf':>8} {'slope/1e3':>9} "
          f"{'KID all':>8} {'KID xblk':>8} {'cos mates':>9} {'cos class':>9} {'tr cov':>8} {'mean term':>9} "
          f"{'contrast':>8} {'satur.':>7}")
    for n, r in report.items():
        print(f"{n:>3} {r['fid']:8.2f} {r['bootstrap_bias']:9.2f} {r['fid_minus_bias']:8.2f} "
              f"{r['fid_infinity']:8.2f} {r['slope'] / 1e3:9.2f} {r['kid_all_pairs']:8.3f} "
              f"{r['kid_other_blocks']:8.3f} {r['similarity']['mates']:9.4f} "
              f"{r['similarity']['same_class_other_groups']:9.4f} {r['trace_cov']:8.2f} {r['mean_term']:9.2f} "
              f"{r['contrast']:8.4f} {r['saturation']:7.4f}")
    if args.ref_images:
        data = pixel_stats(np.stack([im.permute(1, 2, 0).numpy() for im in images.open_images(args.ref_images)]))
        print(f"data: contrast {data['contrast']:.4f}, saturation {data['saturation']:.4f}")
        report["data"] = data
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in report.items()}, indent=1, default=str))


if __name__ == "__main__":
    main()
