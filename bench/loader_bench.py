"""Can the data path feed an H100? The training loader at ImageNet-256 shapes.

Shards in the `encode` format with SD-VAE-sized moments (4 x 32 x 32 fp16, with the
flipped crop) and 768-d embeddings (the writer of bench/train_bench.py), the default
--group-buffer 20000, a per-process batch of 32, GroupDiff-l (ratio 0.1, N = 4) and
GroupDiff-f (N = 4), one process, one thread for NumPy/torch:

1. A whole window produced (read, grouped, every batch assembled) with no read-ahead:
   img/s, this code next to the loader of an earlier commit (--baseline-rev), same run.
2. With the background reader, a loop that consumes batches at a GPU's pace
   (--consume img/s; SiT-XL/2 on an H100 at 40% MFU is ~556, SiT-B/2 ~2,900): how
   long the run waits before its first step, and the longest wait for a batch after
   the first window.

    python bench/loader_bench.py [--windows 3] [--consume 2900] [--baseline-rev REV]

Targets: >= 3,000 img/s per process for a whole window in both modes, and
no wait over 50 ms after the first window.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

from groupdiff_cli.data.loader import GroupBatches, SampleStream, read_dataset, record_bytes  # noqa: E402

MODES = {"l": dict(mode="l", ratio=0.1), "f": dict(mode="f", ratio=0.0)}


def baseline_module(rev: str):
    """groupdiff_cli/data/loader.py as it was at ``rev`` (git), imported under another name."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:groupdiff_cli/data/loader.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "data_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("data_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["data_baseline"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def loader(cls, info, mode: str, window: int, batch: int, **kw):
    m = MODES[mode]
    return cls(info, 0, 1, batch, 4, m["mode"], m["ratio"], "similarity", 0.7, window, 0, info["num_classes"], **kw)


def whole_window(gb, window_index: int = 0) -> float:
    """img/s to produce every batch of one window from nothing."""
    t0 = time.perf_counter()
    n = sum(len(gb.batch(window_index * gb.per_window + k).keys) for k in range(gb.per_window))
    return n / (time.perf_counter() - t0)


def paced(gb, windows: int, consume: float) -> dict:
    """Batches taken at ``consume`` img/s (the GPU's work simulated by sleeping)."""
    first = None
    waits = []
    for i in range(windows * gb.per_window):
        t0 = time.perf_counter()
        b = gb.batch(i)
        wait = time.perf_counter() - t0
        if first is None:
            first = wait
        elif i >= gb.per_window:
            waits.append(wait)
        time.sleep(len(b.keys) / consume)
    return dict(first_window_s=first, max_wait_after_first_ms=1000 * max(waits), mean_wait_ms=1000 * sum(waits)
                / len(waits))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "groupdiff-loader-bench"),
                    help="where the shards are written once (about 0.9 GB) and reused")
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--window", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--windows", type=int, default=3, help="windows in the paced run")
    ap.add_argument("--consume", type=float, default=2900.0, help="img/s the simulated GPU takes")
    ap.add_argument("--baseline-rev", default="d82a032", help="git revision of the loader to compare with; "
                    "'none' skips it (the baseline's f mode takes minutes per window)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    data = Path(args.data_dir)
    if not (data / "dataset.json").exists():
        sys.path.insert(0, str(Path(__file__).parent))
        from train_bench import write_shards

        write_shards(data, args.records, 5000)
    info = read_dataset(data)
    window_bytes = args.window * record_bytes(SampleStream(info, 0, 1, 0).first_record())  # no buffers allocated
    res = dict(records=args.records, window=args.window, batch=args.batch, consume=args.consume,
               window_bytes=window_bytes, cpu=os.cpu_count(), torch=torch.__version__, modes={})
    base = baseline_module(args.baseline_rev) if args.baseline_rev != "none" else None
    for mode in MODES:
        r = res["modes"][mode] = {}
        r["whole_window_img_s"] = whole_window(loader(GroupBatches, info, mode, args.window, args.batch,
                                                      prefetch=False))
        if base is not None:
            r["baseline_whole_window_img_s"] = whole_window(loader(base.GroupBatches, info, mode, args.window,
                                                                   args.batch))
            r["speedup"] = r["whole_window_img_s"] / r["baseline_whole_window_img_s"]
        gb = loader(GroupBatches, info, mode, args.window, args.batch)
        r.update(paced(gb, args.windows, args.consume))
        gb.close()
        print(mode, json.dumps(r), flush=True)

    print(f"\nloader, ImageNet-256 latents (4x32x32 fp16 + flip), 768-d embeddings, window {args.window}, "
          f"batch {args.batch}, one thread; window memory {res['window_bytes'] / 2**20:.0f} MiB "
          f"({window_bytes // args.window:,} B/record; two windows live with read-ahead)")
    print("| mode | whole window, img/s | baseline, img/s | x | first window wait, s | max wait after, ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for mode, r in res["modes"].items():
        print(f"| {mode} | {r['whole_window_img_s']:,.0f} | {r.get('baseline_whole_window_img_s', float('nan')):,.0f} "
              f"| {r.get('speedup', float('nan')):.1f} | {r['first_window_s']:.2f} | "
              f"{r['max_wait_after_first_ms']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.exit(main())
