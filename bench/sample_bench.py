"""Sampling throughput against group size, with CFG on (GroupDiff-l layout: conditional
branch at size 1, unconditional branch at size N, one forward pass per step).

The same 16 images (one batch) are sampled as groups of 1, 4 and 16 with the DDPM
sampler; runs alternate so that machine noise hits all sizes alike. Few steps keep it
short: images/s at 250 steps is the printed figure times steps / 250 (the network
dominates; decoding is not included).

    python bench/sample_bench.py [--model DiT-S/2] [--steps 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from timing import median_seconds

from groupdiff_cli.jobs.sampling import Guidance, sample_groups
from groupdiff_cli.science.models import create_model
from groupdiff_cli.science.objectives import DDPM

IMAGES = 16
GROUP_SIZES = (1, 4, 16)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-S/2")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = create_model(args.model).eval()
    objective = DDPM.respaced(args.steps)
    labels = torch.arange(IMAGES) // 16 * 7  # one class per batch

    def run(n):
        g = Guidance(args.cfg_scale, None, (0.0, 1.0), 1, n)
        sample_groups(model, objective, labels, 0, n, g, seed=0, sampler="ddpm", steps=args.steps)

    run(1)  # warm-up
    seconds = median_seconds({n: partial(run, n) for n in GROUP_SIZES}, args.repeats, warmup=False)
    rate = {n: IMAGES / v for n, v in seconds.items()}
    print(f"{args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, {IMAGES} images, "
          f"{args.steps} DDPM steps, cfg {args.cfg_scale}, median of {args.repeats}")
    print(f"{'N':>3} {'img/s':>8} {'ratio to N=1':>13}")
    for n in GROUP_SIZES:
        print(f"{n:>3} {rate[n]:>8.3f} {rate[n] / rate[1]:>13.2f}")


if __name__ == "__main__":
    main()
