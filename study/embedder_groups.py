"""How class-consistent are similarity groups with each retrieval embedder?

On the bundled shapes data (8 classes), encode with the offline pretrained FID
Inception (`--embedder inception`) and with a randomly initialised timm ResNet-18 (an
embedder with no training), then form training groups exactly as `train` does (one window, anchor +
N - 1 picks at or above the threshold, nearest if too few) and count the fraction of
group-mates that share the anchor's class (chance: 1/8). Also the fraction of random
pairs that pass the threshold (near 1: similarity groups are random groups).

    python study/embedder_groups.py [--per-class 100] [--threshold 0.7] [--group-size 4]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def embeddings(data_dir):
    from groupdiff_cli.data.loader import SampleStream, read_dataset

    info = read_dataset(data_dir)
    recs = []
    for rec in SampleStream(info, 0, 1, 0).iterate(0):
        recs.append(rec)
        if len(recs) == sum(info["shard_counts"]):
            break
    return np.stack([r.emb for r in recs]).astype(np.float32), np.array([r.label for r in recs])


def consistency(emb, labels, n, threshold, seed=0):
    from groupdiff_cli.data.loader import build_groups, pair_similarity

    groups = build_groups(emb, labels, len(labels) // n // 2, n, "similarity", threshold,
                          np.random.default_rng(seed))  # half the window grouped, as a busy window
    same = np.mean([labels[g[1:]] == labels[g[0]] for g in groups])
    return float(same), pair_similarity(emb, threshold)


def main():
    import timm
    import torch
    from safetensors.torch import save_file
    from shapes_dataset import write_dataset  # beside this script

    from groupdiff_cli.data.encode import EncodeConfig, encode

    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--group-size", type=int, default=4)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = write_dataset(tmp / "shapes", a.per_class)
        torch.manual_seed(0)
        save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(tmp / "r18.safetensors"))
        rows = []
        # the demo's settings: Inception at 96px, the random ResNet-18 at 64px
        for name, weights, size in (("inception", None, 96), ("resnet18", str(tmp / "r18.safetensors"), 64)):
            out = tmp / f"data_{name}"
            encode(src, out, EncodeConfig(src=str(src), image_size=32, vae="pixel", embedder=name, embedder_size=size,
                                          shard_size=10_000), embedder_weights=weights, batch_size=64, cpu=True,
                   log=lambda m: None)
            same, sim = consistency(*embeddings(out), a.group_size, a.threshold)
            rows.append((name, same, sim))
        print(f"{a.per_class * 8} shapes images, groups of {a.group_size}, threshold {a.threshold} (chance 0.125)")
        print(f"{'embedder':<28} {'same class':>10} {'pairs passing':>14} {'median cos':>11}")
        for name, same, sim in rows:
            label = "inception 96px (pretrained)" if name == "inception" else "resnet18 64px (random init)"
            print(f"{label:<28} {same:>10.3f} {sim['passing']:>14.3f} {sim['median']:>11.3f}")


if __name__ == "__main__":
    main()
