"""The demo's data and its judge: the UCI handwritten digits and a classifier that reads them.

The digits (Alpaydin and Kaynak, 1998; "Optical Recognition of Handwritten Digits",
UCI Machine Learning Repository, CC BY 4.0) are 1,797 real 8x8 images with 17 grey
levels, 10 classes: the copy that scikit-learn ships, stored in the package
(``pretrained/digits/digits.npz``, 45 kB) so that nothing is downloaded and
scikit-learn is not a dependency. The demo trains and samples them at their own 8x8
size with a patch-1 model (one token per digit pixel); images are enlarged only to
be shown and for the Inception.

The classifier is a small CNN trained on a fixed split of the real digits
(``HELDOUT`` images per class held out, chosen by a seed); its accuracy on the held-out
real digits is recorded next to its weights. The demo reports how many samples it
reads as the class they were asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from groupdiff_cli.plumbing.files import atomic_path, read_json_file, write_json_atomic
from groupdiff_cli.plumbing.integrity import IntegrityError, file_sha256, load_safetensors, save_safetensors
from groupdiff_cli.plumbing.seeds import Draw, evaluation_generator, evaluation_rng, seed_initialisation

HERE = Path(__file__).resolve().parents[1] / "pretrained"
MANIFEST = "MANIFEST.json"  # in HERE: the sha256 of every file shipped there (``write_manifest``)
DIGITS_NPZ = "digits/digits.npz"
CLASSIFIER = "digits-classifier"
SIZE = 8  # pixels a side
LEVELS = 16  # grey levels 0..16 in the source data
HELDOUT = 30  # real images per class the classifier never sees (300 in all)
SPLIT_SEED = 0


def shipped(rel: str) -> Path:
    """HERE/rel, a file shipped with the package, checked against the package's manifest:
    a truncated or altered copy is one line (an ``IntegrityError``), never a traceback."""
    path = HERE / rel
    try:
        want = json.loads((HERE / MANIFEST).read_text()).get(rel)
    except (OSError, ValueError):
        raise IntegrityError(HERE / MANIFEST, "unreadable", "reinstall groupdiff") from None
    if want is None:
        raise IntegrityError(path, f"it is not listed in {HERE / MANIFEST}", "reinstall groupdiff")
    if not path.is_file() or file_sha256(path) != want:
        raise IntegrityError(path, f"its sha256 differs from the one in {HERE / MANIFEST}", "reinstall groupdiff")
    return path


def write_manifest(root: Path = HERE) -> dict:
    """Record the sha256 of every file under ``root`` (but the manifest) in root/MANIFEST.json:
    run after changing anything shipped."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST and "__pycache__" not in p.parts)
    manifest = {p.relative_to(root).as_posix(): file_sha256(p) for p in files}
    write_json_atomic(manifest, root / MANIFEST)
    return manifest


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as uint8 images (N, 8, 8) in 0..255 and their labels (N,)."""
    with np.load(shipped(DIGITS_NPZ)) as f:
        images, labels = f["images"], f["labels"].astype(np.int64)
    return np.round(images.astype(np.float64) * 255 / LEVELS).astype(np.uint8), labels


def write_digits(root) -> Path:
    """The digits as a class-folder tree of 8x8 grey PNGs (``ROOT/<digit>/<index>.png``), the
    layout `groupdiff encode` reads. Each file is written atomically; one already there is
    kept only if it holds the right pixels (an interrupted earlier run may have left
    anything), so the tree always holds every digit."""
    root = Path(root)
    images, labels = load_digits()
    for i, (img, label) in enumerate(zip(images, labels)):
        path = root / str(label) / f"{i:04d}.png"
        if path.exists():
            try:
                with Image.open(path) as kept:
                    if np.array_equal(np.asarray(kept), img):
                        continue
            except (OSError, ValueError):
                pass
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Image.fromarray(img, "L").save(tmp, format="PNG")
    return root


def heldout_split(labels: np.ndarray, per_class: int = HELDOUT, seed: int = SPLIT_SEED) -> np.ndarray:
    """A boolean mask: ``per_class`` images of every class, chosen by ``seed``, held out."""
    rng = evaluation_rng(seed, Draw.DIGITS_SPLIT)
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        mask[rng.choice(np.flatnonzero(labels == c), per_class, replace=False)] = True
    return mask


class DigitClassifier(nn.Module):
    """Two 3x3 convolutions and a linear read-out over 8x8 grey images in [0, 1]."""
    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * width * 16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, 8, 8) or (N, 8, 8, 3) -> (N, 1, 8, 8) grey floats in [0, 1]."""
    x = torch.from_numpy(np.asarray(images)).float() / 255
    if x.ndim == 4:  # RGB samples: their grey level
        x = x.mean(-1)
    return x[:, None]


def train_classifier(images: np.ndarray, labels: np.ndarray, epochs: int = 60, seed: int = 0) -> DigitClassifier:
    """Adam on small random shifts of the images (the samples are not centred exactly)."""
    gen = evaluation_generator(seed)
    seed_initialisation(seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = to_input(images), torch.from_numpy(labels)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            batch = torch.roll(x[idx], (dy, dx), (2, 3))
            loss = nn.functional.cross_entropy(model(batch), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def classify(model: DigitClassifier, images: np.ndarray) -> np.ndarray:
    """The class the classifier reads in each uint8 image."""
    return model.eval()(to_input(images)).argmax(1).numpy()


def build_classifier(out=None) -> dict:
    """Train the classifier on the digits less the held-out split and write its weights
    and its held-out accuracy to ``out`` (what ships in the package)."""
    images, labels = load_digits()
    held = heldout_split(labels)
    model = train_classifier(images[~held], labels[~held])
    acc = float((classify(model, images[held]) == labels[held]).mean())
    out = Path(out) if out is not None else HERE / CLASSIFIER
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), out / "classifier.safetensors")
    info = dict(heldout_accuracy=acc, heldout_images=int(held.sum()), train_images=int((~held).sum()),
                split=dict(per_class=HELDOUT, seed=SPLIT_SEED, stream=f"(seed, Draw.{Draw.DIGITS_SPLIT.name})"),
                architecture="DigitClassifier(width=32)")
    write_json_atomic(info, out / "classifier.json")
    return info


def load_classifier() -> tuple[DigitClassifier, dict]:
    """The shipped classifier and its record (held-out accuracy)."""
    model = DigitClassifier()
    model.load_state_dict(load_safetensors(shipped(f"{CLASSIFIER}/classifier.safetensors")))
    return model.eval(), read_json_file(shipped(f"{CLASSIFIER}/classifier.json"), "the digit classifier")
