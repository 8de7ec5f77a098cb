"""Feature extraction speed of `groupdiff fid` against torch-fidelity called directly.

Both run torch-fidelity's Inception on the same images (an ADM-style npz of 256px
images) with the same batch size; ours also extracts the sFID features and hashes
every image. Runs alternate so that machine noise hits both alike.

    python bench/fid_bench.py [--images 100] [--batch-size 50] [--repeats 2]

Target: ours >= 0.95x torch-fidelity's images/s.
Weights are random (nothing can be downloaded here); speed does not depend on them.

    python bench/fid_bench.py --frechet [--repeats 3]

The FID of a feature set against a fixed reference (what every bootstrap resample
costs): `FrechetDistance.of_features` (the n x n route when n <= d) against the d x d
covariance route, for n = 128, 1,024 and 2,048 random 2,048-d features; both answers
are printed, they agree to ~1e-7 relative.

    python bench/fid_bench.py --bootstrap [--sizes 4000,16000,50000] [--repeats 3] [--device cpu|cuda]

One bootstrap resample of n 2,048-d features (what `fid --bootstrap` pays per round):
`ResampledFrechet` (weighted statistics of the rows drawn) against the resampled copy
and its covariance (the plain way), on the same draws; both FIDs are printed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from timing import median_seconds, print_rates

from groupdiff_cli.evaluation.images import NpzImages
from groupdiff_cli.evaluation.inception import InceptionFeatures, extract_features
from groupdiff_cli.evaluation.metrics import FrechetDistance, ResampledFrechet, gaussian_stats
from groupdiff_cli.testing import write_random_inception_weights


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--frechet", action="store_true", help="time the Frechet distance instead")
    ap.add_argument("--bootstrap", action="store_true", help="time one bootstrap resample instead")
    ap.add_argument("--sizes", default="4000,16000,50000", help="--bootstrap: sample counts")
    ap.add_argument("--device", default=None, help="--bootstrap: where ResampledFrechet runs [default: GPU if any]")
    args = ap.parse_args()
    if args.frechet:
        return frechet(args.repeats)
    if args.bootstrap:
        return bootstrap([int(n) for n in args.sizes.split(",")], args.repeats, args.device)

    import torch_fidelity

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        weights = write_random_inception_weights(d / "inception.pth")
        rng = np.random.default_rng(0)
        np.savez(d / "samples.npz", arr_0=rng.integers(0, 256, (args.images, 256, 256, 3), dtype=np.uint8))
        images = NpzImages(d / "samples.npz")
        extractor = InceptionFeatures(weights)

        def ours():
            extract_features(images, extractor, batch_size=args.batch_size)

        def theirs():
            torch_fidelity.calculate_metrics(input1=images, isc=True, feature_extractor_weights_path=weights,
                                             batch_size=args.batch_size, cuda=torch.cuda.is_available(),
                                             cache=False, verbose=False, save_cpu_ram=True)

        seconds = median_seconds({"ours": ours, "torch-fidelity": theirs}, args.repeats)
    print(f"torch {torch.__version__}, torch-fidelity {torch_fidelity.__version__}, {torch.get_num_threads()} threads, "
          f"{args.images} images 256px, batch {args.batch_size}, median of {args.repeats}")
    print_rates(seconds, args.images, "ours", "torch-fidelity")


def frechet(repeats: int, d: int = 2048) -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4096, d)) @ rng.standard_normal((d, d)) / d**0.5
    fd = FrechetDistance(*gaussian_stats(ref))
    print(f"numpy {np.__version__}, d = {d}, median of {repeats}")
    for n in (128, 1024, 2048):
        x = ref[:n] + 0.1 * rng.standard_normal((n, d))
        got = {}
        fns = {"n x n": lambda: got.setdefault("n x n", fd.of_features(x)),
               "d x d": lambda: got.setdefault("d x d", fd(*gaussian_stats(x)))}
        sec = median_seconds(fns, repeats)
        print(f"n = {n:5d}: n x n {sec['n x n']:.3f} s, d x d {sec['d x d']:.3f} s, "
              f"{sec['d x d'] / sec['n x n']:.2f}x; FID {got['n x n']:.6f} vs {got['d x d']:.6f}")


def bootstrap(sizes, repeats: int, device=None, d: int = 2048) -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4096, d)) @ rng.standard_normal((d, d)) / d**0.5
    fd = FrechetDistance(*gaussian_stats(ref))
    print(f"numpy {np.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), d = {d}, "
          f"median of {repeats}")
    for n in sizes:
        x = np.tile(ref, (n // len(ref) + 1, 1))[:n] + 0.5 * rng.standard_normal((n, d))
        counts = np.bincount(rng.integers(0, n, n), minlength=n)
        resampled = ResampledFrechet(x, fd, 1, device)
        got = {}
        fns = {"weighted": lambda: got.setdefault("weighted", resampled(counts)),
               "copy": lambda: got.setdefault("copy", fd.of_features(np.repeat(x, counts, axis=0)))}
        sec = median_seconds(fns, repeats)
        print(f"n = {n:6d}: weighted ({resampled.device}) {sec['weighted']:.3f} s, copy {sec['copy']:.3f} s, "
              f"{sec['copy'] / sec['weighted']:.2f}x; 1,000 rounds {sec['weighted'] * 1000 / 60:.1f} min vs "
              f"{sec['copy'] * 1000 / 60:.1f} min; FID {got['weighted']:.6f} vs {got['copy']:.6f}")
        del resampled


if __name__ == "__main__":
    main()
