"""The first group of every class from a `groupdiff study`, jointly (the largest N) next
to the same seeds one by one (one row per class), with each side's FID printed: a
figure of a study's samples (image i of a study has seed i and class (i // max N) mod classes, so
the first max N x classes images hold one group per class, in class order).

    python study/reproduction_samples.py STUDY_DIR --out figure.png [--class-names 0,1,...]
"""

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image
from shapes_dataset import CLASSES  # beside this script

from groupdiff_cli.jobs.sampling import grid_image


def side_by_side(joint: np.ndarray, single: np.ndarray, n: int, zoom: int) -> np.ndarray:
    """One row per class: its group of n sampled jointly, a white gap, the same seeds one by one."""
    halves = [grid_image(x.repeat(zoom, 1).repeat(zoom, 2), cols=n, gap=2) for x in (joint, single)]
    gap = np.full((halves[0].shape[0], 12, 3), 255, np.uint8)
    return np.concatenate([halves[0], gap, halves[1]], axis=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--class-names", default=",".join(CLASSES))
    ap.add_argument("--zoom", type=int, default=2)
    a = ap.parse_args()
    names = a.class_names.split(",")
    sizes = sorted(int(p.name[1:]) for p in a.study.glob("N*") if (p / "samples.npz").exists())
    if 1 not in sizes or len(sizes) < 2:
        raise SystemExit(f"{a.study}: needs N1/ and a larger N*/ with samples.npz")
    n = sizes[-1]
    take = n * len(names)
    imgs = {k: np.load(a.study / f"N{k}" / "samples.npz")["arr_0"][:take] for k in (1, n)}
    labels = np.load(a.study / f"N{n}" / "labels.npy")[:take]
    if not np.array_equal(labels, np.repeat(np.arange(len(names)), n)):
        raise SystemExit(f"{a.study}: the first {take} images are not one group of {n} per class in class order")
    with open(a.study / "study.csv") as f:
        fids = {int(r["group_size"]): float(r["fid"]) for r in csv.DictReader(f) if r["fid"]}
    print("FID: " + ", ".join(f"N={k}: {fids[k]:.2f}" for k in (n, 1) if k in fids))
    Image.fromarray(side_by_side(imgs[n], imgs[1], n, a.zoom)).save(a.out)
    print(a.out)


if __name__ == "__main__":
    main()
