"""Record what the commands compute, to check a refactoring changes nothing.

    python tools/behaviour_snapshot.py OUT.npz [--compare BEFORE.npz] [--inception-weights W.pth]

Runs the public commands only (so it outlives moves inside the package) on a small
class-folder image set it draws itself: encode, train (SiT GroupDiff-l, DiT
GroupDiff-f and a SiT baseline, a few steps), sample with every sampler, fid (every metric, a bootstrap
and a paired difference), attention and study (with a baseline). Saves the trained
weights, the samples, the metrics and the study's rows to OUT.npz; with --compare, checks
them against an earlier snapshot and prints the largest difference of each.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image
from safetensors.numpy import load_file

from groupdiff_cli.cli import main

SAMPLERS = {"dit": ["ddpm", "ddim"], "sit": ["sde", "sde-sbdm", "ode", "heun", "dopri5"]}


def cli(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if result.exit_code:
        sys.exit(f"groupdiff {' '.join(map(str, args))}: exit {result.exit_code}\n{result.output}")
    return result.output


def images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / str(c)).mkdir(parents=True)
        base = rng.integers(0, 256, (8, 8, 3))
        for i in range(16):
            img = np.clip(base + rng.normal(0, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / str(c) / f"{i}.png")
    return root


def snapshot(work: Path, inception: str) -> dict:
    out = {}
    cli("encode", images(work / "src"), work / "data", "--image-size", 8, "--vae", "pixel", "--embedder", "none",
        "--cpu")
    runs = {"sit": ("SiT-Ti/2", "l"), "dit": ("DiT-Ti/2", "f"), "base": ("SiT-Ti/2", "none")}
    for key, (model, mode) in runs.items():
        cli("train", "--data", work / "data", "--model", model, "--group-mode", mode, "--group-size", 2,
            "--global-batch-size", 8, "--max-steps", 6, "--ckpt-every", 6, "--results-dir", work / "runs",
            "--run-name", key, "--group-buffer", 48, "--num-workers", 0, "--ema-decay", 0.5, "--cpu")
        ck = work / "runs" / key / "checkpoints" / "step_0000006"
        for part in ("model", "ema"):
            for name, arr in load_file(str(ck / f"{part}.safetensors")).items():
                out[f"weights/{key}/{part}/{name}"] = arr
        for sampler in SAMPLERS.get(key, ()):
            folder = work / "samples" / f"{key}-{sampler}"
            cli("sample", "--ckpt", work / "runs" / key, "--out", folder, "--num-samples", 12, "--group-size", 2,
                "--sampler", sampler, "--steps", 6, "--cfg-scale", 2.0, "--guidance-interval", "0.2,0.8",
                "--seed", 3, "--cpu")
            with np.load(folder / "samples.npz") as f:
                out[f"samples/{key}/{sampler}"] = f["arr_0"]
    cli("fid", work / "samples" / "sit-heun", work / "src", "--metrics", "fid,sfid,isc,prc,kid", "--inception-weights",
        inception, "--bootstrap", 20, "--paired-with", work / "samples" / "sit-ode", "--json", work / "fid.json",
        "--cpu")
    report = json.loads((work / "fid.json").read_text())
    for name, value in flat(report["metrics"]).items():
        out[f"fid/{name}"] = np.asarray(value, dtype=np.float64)
    cli("attention", "--ckpt", work / "runs" / "sit", "--group-size", 3, "--num-groups", 2, "--steps", 4, "--sampler",
        "heun", "--cfg-scale", 2.0, "--json", work / "attention.json", "--cpu")
    att = json.loads((work / "attention.json").read_text())
    out["attention/s_cross"] = np.float64(att["group_sizes"]["3"]["s_cross"])
    cli("study", "--ckpt", work / "runs" / "sit", "--ref", work / "src", "--out", work / "study", "--group-sizes",
        "1,3", "--num-samples", 12, "--steps", 4, "--sampler", "heun", "--bootstrap", 10, "--attention-groups", 2,
        "--baseline", work / "runs" / "base", "--inception-weights", inception, "--cpu")
    for folder in ("N1", "N3", "baseline"):
        with np.load(work / "study" / folder / "samples.npz") as f:
            out[f"study/{folder}"] = f["arr_0"]
    rows = (work / "study" / "study.csv").read_text().splitlines()
    out["study/csv"] = np.array([[float(v) if v else np.nan for v in r.split(",")] for r in rows[1:]])
    return out


def flat(d: dict, prefix: str = "") -> dict:
    items = {}
    for k, v in d.items():
        if isinstance(v, dict):
            items.update(flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, list)):
            items[f"{prefix}{k}"] = v
    return items


def compare(now: dict, before_path: Path) -> bool:
    with np.load(before_path) as f:
        before = dict(f)
    ok = set(now) == set(before)
    for name in sorted(set(now) - set(before)) + sorted(set(before) - set(now)):
        print(f"only in one snapshot: {name}")
    for name in sorted(set(now) & set(before)):
        a, b = now[name].astype(np.float64), before[name].astype(np.float64)
        diff = np.nanmax(np.abs(a - b)) if a.shape == b.shape and a.size else (0.0 if a.shape == b.shape else np.inf)
        same_nans = a.shape == b.shape and np.array_equal(np.isnan(a), np.isnan(b))
        if diff or not same_nans:
            ok = False
            print(f"differs: {name}: max |difference| {diff:.3g}")
    print(f"{len(now)} arrays: {'identical' if ok else 'NOT identical'} to {before_path}")
    return ok


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--compare")
    p.add_argument("--inception-weights", required=True)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        snap = snapshot(Path(tmp), a.inception_weights)
    np.savez(a.out, **snap)
    if a.compare and not compare(snap, Path(a.compare)):
        sys.exit(1)
