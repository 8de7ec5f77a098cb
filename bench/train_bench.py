"""Training step time per group mode, and what the data pipeline can deliver.

1. DiT-S/2 (256px latents, fp32, this CPU): time of one optimizer step for
   `--group-mode none`, `l` (N = 4, ratio 0.1) and `f` (N = 4), same batch size,
   one short run per mode after the other, median over steps after the first.
2. The data pipeline (shard reading, latent sampling from the moments, similarity
   grouping in windows) on one thread: images/s, as a multiple of what the training
   step consumes.

    python bench/train_bench.py [--batch 16] [--steps 3]

Target: pipeline >= 10x the images/s the training step consumes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from groupdiff_cli.data.loader import GroupBatches, GroupRecipe, read_dataset
from groupdiff_cli.jobs.train import TrainOptions, train


def write_shards(d: Path, n: int, shard: int, dim: int = 768, hw: int = 32, classes: int = 100):
    """Encode-format shards with SD-VAE-sized moments and DINOv2-sized embeddings."""
    rng = np.random.default_rng(0)
    d.mkdir(parents=True)
    names = []
    for k in range(0, n, shard):
        name = f"shard-{k // shard:06d}.tar"
        with wds.TarWriter(str(d / name)) as sink:
            for i in range(k, min(n, k + shard)):
                m = rng.normal(size=(4, hw, hw)).astype(np.float16)
                e = rng.normal(size=dim)
                sink.write({"__key__": f"{i:09d}", "cls": int(i % classes), "path.txt": f"{i}.JPEG",
                            "mean.npy": m, "std.npy": np.abs(m) * 0.1, "flip_mean.npy": m[..., ::-1].copy(),
                            "flip_std.npy": np.abs(m) * 0.1, "emb.npy": (e / np.linalg.norm(e)).astype(np.float16)})
        (d / name.replace(".tar", ".json")).write_text(json.dumps(dict(count=min(shard, n - k))))
        names.append(name)
    (d / "dataset.json").write_text(json.dumps(dict(
        num_samples=n, num_classes=classes, image_size=256, vae="stabilityai/sd-vae-ft-ema", vae_scale=0.18215,
        latent_shape=[4, hw, hw], embedder="synthetic", embedder_dim=dim, shards=names)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--model", default="DiT-S/2")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_shards(d / "data", 4096, 1024)

        # 1. step time per mode: a run of warm-up + steps, timed from metrics.jsonl
        step_s = {}
        for mode in ("none", "l", "f"):
            shutil.rmtree(d / "runs", ignore_errors=True)
            train(TrainOptions(data=str(d / "data"), model=args.model, results_dir=str(d / "runs"),
                               group_mode=mode, group_size=4, group_ratio=0.1, global_batch_size=args.batch,
                               group_buffer=1024, max_steps=1 + args.steps, log_every=1, ckpt_every=10**9,
                               cpu=True), log=lambda m: None)
            run = next((d / "runs").iterdir())
            recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            step_s[mode] = statistics.median(args.batch / r["images_per_s"] for r in recs[1:])
        consumed = args.batch / step_s["l"]

        # 2. the data pipeline alone, one thread, similarity grouping (GroupDiff-l)
        torch.set_num_threads(1)
        info = read_dataset(d / "data")
        gb = GroupBatches(info, GroupRecipe("l", 4, 0.1, "similarity", 0.7),
                          batch_size=256, window=2048, seed=0, num_classes=100)
        t0 = time.perf_counter()
        n = 0
        for i in range(16):  # two windows of 2048
            n += len(gb.batch(i).keys)
        pipeline = n / (time.perf_counter() - t0)
    print(f"{args.model}, torch {torch.__version__}, CPU, fp32, batch {args.batch}, 256px latents, "
          f"median of {args.steps} steps")
    for mode, s in step_s.items():
        print(f"  step, mode {mode:>4}: {s:7.2f} s   ({args.batch / s:6.2f} img/s)   x{s / step_s['none']:.2f} of none")
    print(f"  data pipeline (1 thread, similarity grouping, window 2048): {pipeline:8.0f} img/s = "
          f"{pipeline / consumed:.0f}x what the l step consumes")


if __name__ == "__main__":
    sys.exit(main())
