"""Training cost of the demo's model choices on this CPU, measured side by side.

One optimizer step (forward, backward, AdamW) on 32x32 pixel images with GroupDiff-l
groups of 4, for SiT-Ti/4 and SiT-Mi/4 (both 64 tokens) in fp32, and SiT-Mi/4 under
bf16 autocast; the steps take turns (bench/timing.py), medians are compared.

    python bench/demo_speed.py [--batch 64] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch

from groupdiff_cli.models import create_model
from timing import median_seconds


def step_fn(name: str, batch: int, bf16: bool):
    torch.manual_seed(0)
    model = create_model(name, input_size=32, in_channels=3, num_classes=8).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, t, y = torch.randn(batch, 3, 32, 32), torch.rand(batch), torch.randint(0, 8, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t, y, group_size=4)
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    runs = {"SiT-Ti/4 fp32": ("SiT-Ti/4", False), "SiT-Mi/4 fp32": ("SiT-Mi/4", False),
            "SiT-Mi/4 bf16": ("SiT-Mi/4", True)}
    seconds = median_seconds({k: step_fn(n, args.batch, bf) for k, (n, bf) in runs.items()}, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, 32x32 pixels, "
          f"median of {args.repeats}")
    for k, s in seconds.items():
        print(f"{k}: {s:.3f} s/step, {args.batch / s:6.1f} img/s")
    print(f"Mi / Ti (fp32): {seconds['SiT-Ti/4 fp32'] / seconds['SiT-Mi/4 fp32']:.2f}x faster; "
          f"Mi bf16 / fp32: {seconds['SiT-Mi/4 fp32'] / seconds['SiT-Mi/4 bf16']:.2f}x faster")


if __name__ == "__main__":
    main()
