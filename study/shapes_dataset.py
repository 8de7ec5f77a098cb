"""The bundled shapes set of the small-scale reproduction ("shapes-32"): 8 classes of
shapes drawn with Pillow at 32x32, each image with its own colour, size, rotation,
small offset and background, generated deterministically from a seed (nothing is
downloaded).

    python study/shapes_dataset.py OUT [--per-class 400] [--seed 0]   # OUT/<k>_<name>/<i>.png
"""

import argparse
import math
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


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-class", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(f"shapes in {write_dataset(a.out, a.per_class, a.seed)}")
