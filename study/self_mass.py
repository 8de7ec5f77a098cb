"""How much attention does an image pay to its own tokens inside a group?

For a SiT (flow) checkpoint's EMA weights, held-out images (in similarity/class groups, as
`train --eval-data` lays them out) noised to fixed t, null label (GroupDiff-l's grouped
branch): per block, the attention mass from an image's queries onto its own keys,
averaged over queries, heads and images. Uniform attention over the group gives 1/N;
an image that ignores its group-mates gives 1.

    python study/self_mass.py RUN_OR_CHECKPOINT HELDOUT_DATA [--images 64]
"""

from __future__ import annotations

import argparse

import torch


def main():
    from groupdiff_cli.data.loader import read_dataset
    from groupdiff_cli.evaluation.branch_loss import heldout_latents
    from groupdiff_cli.science.checkpoints import load_model
    from groupdiff_cli.science.objectives import Flow

    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("data")
    ap.add_argument("--images", type=int, default=64)
    a = ap.parse_args()
    model, _ = load_model(a.ckpt, "ema")
    x0, y = heldout_latents(read_dataset(a.data), a.images, 16)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    null = torch.full_like(y, model.num_classes)
    print("| t | N | uniform | self mass per block (first .. last) |\n| --- | --- | --- | --- |")
    for t in (0.2, 0.5, 0.8):
        for n in (4, 16):
            masses = []

            def probe(q, k, n_, masses=masses):
                b, h, nl, d = q.shape
                att = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, -1)  # (B, heads, N*L, N*L)
                per_image = att.view(b, h, n_, nl // n_, n_, nl // n_).sum(-1).mean(3)  # (B, heads, N, N)
                masses.append(float(torch.diagonal(per_image, dim1=-2, dim2=-1).mean()))

            for blk in model.blocks:
                blk.attn.probe = probe
            tt = torch.full((len(y),), t)
            with torch.no_grad():
                model(Flow.interpolate(x0, tt, noise), Flow.network_time(tt), null, group_size=n,
                      generator=torch.Generator().manual_seed(1))
            print(f"| {t} | {n} | {1 / n:.3f} | " + " ".join(f"{m:.2f}" for m in masses) + " |")


if __name__ == "__main__":
    main()
