"""How local is a model's self-attention on the bundled shapes? (why the demo draws blobs)

For each checkpoint: 64 freshly drawn shapes (8 per class, with their labels), noised to
t = 0.3 and 0.7 with fixed noise, one image at a time (N = 1). Per block, averaged over
heads and query tokens: the attention entropy (nats), the mean distance from a query
patch to the patches it attends to (in patches), and the mass on the query's own patch
and its 8 neighbours. Uniform attention is printed for comparison: a model that has
learnt where neighbouring patches are has entropy and distance well below it.

    python study/attention_locality.py RUN_OR_CHECKPOINT_DIR [...]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from shapes_dataset import CLASSES, draw_shape  # beside this script

from groupdiff_cli.science import models
from groupdiff_cli.science.checkpoints import load_model

TIMES = (0.3, 0.7)


def patch_distances(tokens: int) -> torch.Tensor:
    side = int(round(tokens**0.5))
    row, col = np.divmod(np.arange(tokens), side)
    return torch.tensor(np.hypot(row[:, None] - row[None], col[:, None] - col[None]))


def measure(model, x: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor, t: float) -> np.ndarray:
    """(blocks, 3): entropy, mean distance, neighbour mass of each block's attention."""
    rows = []

    def forward(self, tokens, runs):  # the block's attention, recomputed in the open (N = 1)
        q, k, v = self.qkv_heads(tokens, 1)
        p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1).double()
        dist = patch_distances(p.shape[-1])
        rows.append([-(p * p.clamp_min(1e-12).log()).sum(-1).mean().item(), (p * dist).sum(-1).mean().item(),
                     (p * (dist <= 1.5)).sum(-1).mean().item()])
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(tokens.shape))

    original = models.GroupAttention.forward
    models.GroupAttention.forward = forward
    try:
        with torch.no_grad():
            model((1 - t) * x + t * noise, torch.full((len(x),), t), labels)
    finally:
        models.GroupAttention.forward = original
    return np.array(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpts", nargs="+")
    args = ap.parse_args()
    rng = np.random.default_rng(5)
    per_class = 8
    images = np.stack([np.asarray(draw_shape(c, rng)) for c in range(len(CLASSES)) for _ in range(per_class)])
    x = torch.tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    for ckpt in args.ckpts:
        model, info = load_model(ckpt)
        model.eval()
        tokens = model.pos_embed.shape[1]
        dist = patch_distances(tokens)
        print(f"{ckpt} ({info['model']['name']}, {tokens} tokens; uniform attention: entropy {np.log(tokens):.2f}, "
              f"distance {dist.mean():.2f}, neighbour mass {(dist <= 1.5).double().mean():.3f})")
        for t in TIMES:
            m = measure(model, x, labels, noise, t)
            print(f"  t={t}: entropy {m[:, 0].mean():.2f}, distance {m[:, 1].mean():.2f} "
                  f"(lowest block {m[:, 1].min():.2f}), neighbour mass {m[:, 2].mean():.3f}")


if __name__ == "__main__":
    main()
