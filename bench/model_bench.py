"""Cost of group attention: forward+backward time and peak memory per image vs group size.

For each model, the same 16 images per batch are run as 16 groups of 1, 4 groups of 4
and 1 group of 16. Printed side by side, all measured in this one run:
  ours      our GroupDiT (adaLN, sample embedding, group views, SDPA)
  bare      a bare stack of pre-LN SDPA transformer blocks of the same width and
            depth fed (B, N*L, D) directly: the floor any group-attention model pays
  flops     the ratio the forward FLOP count predicts
and the peak-memory ratio of our model at each N against N = 1 (each in a fresh
subprocess, peak RSS growth during one forward+backward).

    python bench/model_bench.py [--models DiT-S/2,DiT-B/2] [--repeats 3]

Targets: ours/bare ratio within 1.05x; peak memory at N=16 <= 1.3x N=1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timing import median_seconds

from groupdiff_cli.science.models import count_flops, create_model

IMAGES = 16
GROUP_SIZES = (1, 4, 16)


class BareBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.norm2(x))


def make_runs(name):
    """Closures that run one forward+backward of ours and of the bare stack at each N."""
    torch.manual_seed(0)
    model = create_model(name).train()
    cfg = model.config
    bare = nn.Sequential(*[BareBlock(cfg["hidden_size"], cfg["num_heads"]) for _ in range(cfg["depth"])]).train()
    size, length = model.input_size, model.x_embedder.num_patches
    x = torch.randn(IMAGES, model.in_channels, size, size)
    t = torch.randint(0, 1000, (IMAGES,)).float()
    y = torch.randint(0, 1000, (IMAGES,))
    tokens = torch.randn(IMAGES, length, cfg["hidden_size"])

    def ours(n):
        model.zero_grad(set_to_none=True)
        model(x, t, y, group_size=n).square().mean().backward()

    def bare_stack(n):
        bare.zero_grad(set_to_none=True)
        bare(tokens.view(IMAGES // n, n * length, -1)).square().mean().backward()

    return ours, bare_stack


def rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(name, n):
    """In a fresh process: peak RSS growth (MiB) of the first forward+backward at group
    size n (activations, attention workspace and the weight gradients)."""
    ours, _ = make_runs(name)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    base = rss_kib("VmRSS")
    ours(n)
    print((rss_kib("VmHWM") - base) / 1024)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="DiT-S/2,DiT-B/2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-memory-child", nargs=2, metavar=("MODEL", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_memory_child:
        peak_memory_child(args.peak_memory_child[0], int(args.peak_memory_child[1]))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {IMAGES} images per batch, 256px latents")
    for name in args.models.split(","):
        ours, bare = make_runs(name)
        med = median_seconds({(kind, n): partial(fn, n) for n in GROUP_SIZES
                              for kind, fn in (("ours", ours), ("bare", bare))}, args.repeats)
        flops1 = count_flops(name, 1)
        mem = {}
        for n in GROUP_SIZES:
            out = subprocess.run([sys.executable, __file__, "--peak-memory-child", name, str(n)],
                                 capture_output=True, text=True, check=True).stdout
            mem[n] = float(out.strip().splitlines()[-1])
        print(f"\n{name}: forward+backward, ms per image (median of {args.repeats})")
        print(f"{'N':>3} {'ours':>8} {'ratio':>6} {'bare':>8} {'ratio':>6} {'flops':>6} {'ours/bare':>9}"
              f" {'peak MiB':>9} {'mem ratio':>9}")
        for n in GROUP_SIZES:
            r_ours = med["ours", n] / med["ours", 1]
            r_bare = med["bare", n] / med["bare", 1]
            print(f"{n:>3} {1e3 * med['ours', n] / IMAGES:>8.1f} {r_ours:>6.2f} {1e3 * med['bare', n] / IMAGES:>8.1f}"
                  f" {r_bare:>6.2f} {count_flops(name, n) / flops1:>6.2f} {r_ours / r_bare:>9.3f}"
                  f" {mem[n]:>9.0f} {mem[n] / mem[1]:>9.2f}")


if __name__ == "__main__":
    main()
