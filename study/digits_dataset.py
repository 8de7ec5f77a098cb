"""scikit-learn's handwritten digits (UCI, 1,797 images of 8x8 pixels, 17 grey levels,
10 classes) as a class-folder image set for `groupdiff encode`: a small *real* labelled
image set that installs with a package (`pip install scikit-learn`), nothing downloaded.

Each image is scaled to 0-255 and enlarged 4x by pixel repetition to 32x32 RGB, so
that one 4x4 patch of a /4 model is exactly one original pixel. Digits must not be
mirrored: encode or train them with --no-flip.

    python study/digits_dataset.py digits_images   # -> digits_images/<digit>/<index>.png
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out: Path, scale: int = 4) -> int:
    from sklearn.datasets import load_digits

    d = load_digits()
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        grey = np.round(img / 16 * 255).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.stack([grey] * 3, -1)).save(folder / f"{i:04d}.png")
    return len(d.images)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--scale", type=int, default=4)
    a = ap.parse_args()
    print(f"{write_digits(a.out, a.scale)} images in {a.out}")
