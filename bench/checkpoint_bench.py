"""How long a checkpoint holds the training loop: the synchronous write (what every save
cost before: the main process writes and hashes model, EMA and AdamW state while every
other process waits at a barrier) against `CheckpointWriter.submit` (a copy of the state
to host memory; the write, its checksums, fsync and pruning run in a thread), on the
same model, one after the other, median of --repeats.

    python bench/checkpoint_bench.py [--model SiT-B/2] [--repeats 3] [--dir /tmp]

Also prints the background write's own time and the projection for SiT-XL/2 (675M
parameters, a 10.8 GB checkpoint) at the measured rates.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import groupdiff_cli.science.checkpoints as checkpoints
from groupdiff_cli.plumbing.layout import EMA_FILE, MODEL_FILE
from groupdiff_cli.science.models import create_model

XL_BYTES = 16 * 675_129_632  # SiT-XL/2: model, EMA and two AdamW moments in fp32


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SiT-B/2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the checkpoints are written [default: a temporary folder]")
    args = ap.parse_args()
    model = create_model(args.model, input_size=32, in_channels=4, num_classes=1000)
    ema = create_model(args.model, input_size=32, in_channels=4, num_classes=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, 4, 32, 32), torch.rand(2), torch.zeros(2, dtype=torch.long)).sum().backward()
    optimizer.step()  # the two moments exist
    nbytes = 16 * sum(p.numel() for p in model.parameters())
    run = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    real_fsync = checkpoints._fsync
    sync, stall, background = [], [], []
    try:
        writer = checkpoints.CheckpointWriter(run, keep_last=1, keep_every=None)
        for step in range(1, args.repeats + 1):
            checkpoints._fsync = lambda p: None  # the synchronous write flushed nothing
            t0 = time.perf_counter()
            checkpoints.save_checkpoint(run, 2 * step, {MODEL_FILE: model.state_dict(), EMA_FILE: ema.state_dict()},
                                        optimizer.state_dict(), {})
            checkpoints.prune_checkpoints(run, 1, None)
            sync.append(time.perf_counter() - t0)
            checkpoints._fsync = real_fsync
            t0 = time.perf_counter()
            writer.submit(2 * step + 1, model, ema, optimizer, {})
            stall.append(time.perf_counter() - t0)
            writer.wait()
            background.append(time.perf_counter() - t0)
    finally:
        checkpoints._fsync = real_fsync
        shutil.rmtree(run, ignore_errors=True)
    s, a, b = (statistics.median(v) for v in (sync, stall, background))
    print(f"torch {torch.__version__}, {args.model}: {nbytes / 1e9:.2f} GB a checkpoint, median of {args.repeats}")
    print(f"synchronous write (loop and every rank wait): {s:7.3f} s  ({nbytes / s / 1e9:.2f} GB/s)")
    print(f"background write, loop waits for the copy:    {a:7.3f} s  ({nbytes / a / 1e9:.2f} GB/s)")
    print(f"  the write itself (with fsync), in a thread: {b:7.3f} s")
    print(f"stall per checkpoint: {s / a:.1f}x shorter; SiT-XL/2 at these rates: {XL_BYTES / nbytes * s:.0f} s -> "
          f"{XL_BYTES / nbytes * a:.1f} s (a GPU's copy to host runs at PCIe speed instead)")


if __name__ == "__main__":
    main()
