"""The image sets that `fid` reads: an ADM-style .npz (``arr_0``, memory-mapped), a
`groupdiff sample` folder (its ``samples.npz``) or a folder of image files; and the
layout of a sample folder."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from groupdiff_cli.plumbing.defaults import IMAGE_SUFFIXES
from groupdiff_cli.plumbing.files import InputError
from groupdiff_cli.plumbing.layout import SAMPLE_CONFIG, SAMPLES_FILE


def recorded_group_size(folder) -> int | None:
    """The group size a `groupdiff sample` folder was sampled with; None for anything else."""
    config = Path(folder) / SAMPLE_CONFIG
    if not config.is_file():
        return None
    try:
        n = json.loads(config.read_text()).get("group_size")
    except (OSError, ValueError):
        return None
    return n if isinstance(n, int) and n >= 1 else None


def npz_member(path: Path, name: str) -> np.ndarray:
    """An array of an .npz, memory-mapped when it is stored uncompressed (np.savez),
    so that 50k 256px images (9.8 GB) are never read into memory at once."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
        if info.compress_type != zipfile.ZIP_STORED:  # np.savez_compressed: read it whole
            with zf.open(name) as f:
                return np.lib.format.read_array(f)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # zip local file header; name and extra-field lengths at 26..30
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: {name} holds Python objects, not numbers")
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset, order="F" if fortran else "C")


def npz_keys(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: not a readable .npz ({e})") from None


class NpzImages(torch.utils.data.Dataset):
    """``arr_0`` of an ADM-style .npz: uint8 N x H x W x 3."""

    def __init__(self, path):
        self.path = Path(path)
        keys = npz_keys(self.path)
        if "arr_0" not in keys:
            raise ValueError(f"{self.path}: no arr_0 array (found {keys}); expected uint8 N x H x W x 3 images")
        self.array = npz_member(self.path, "arr_0.npy")
        a = self.array
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"{self.path}: arr_0 is {a.dtype} {a.shape}; expected uint8 N x H x W x 3 images")

    def __len__(self):
        return self.array.shape[0]

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.array[i])).permute(2, 0, 1)  # copy: memmaps are read-only

    def __str__(self):
        return str(self.path)


class FolderImages(torch.utils.data.Dataset):
    """Every image file below a folder, in sorted path order, decoded to RGB."""

    def __init__(self, path):
        self.path = Path(path)
        self.files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise ValueError(f"{self.path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
        self.size = None
        self.size = self._open(0).shape[:2][::-1]

    def __len__(self):
        return len(self.files)

    def _open(self, i) -> np.ndarray:
        """uint8 HWC RGB. 16-bit and float images are scaled to 8 bits (Pillow's
        convert("RGB") would clip them to white)."""
        try:
            with Image.open(self.files[i]) as im:
                if self.size is not None and im.size != self.size:
                    raise InputError(f"{self.files[i]}: {im.size[0]}x{im.size[1]} image among "
                                     f"{self.size[0]}x{self.size[1]} ones; all images must have one size")
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    wide = np.asarray(im, dtype=np.float64)
                    top = 65535.0 if im.mode.startswith("I;16") or wide.max() > 255 else 255.0
                    gray = np.clip(np.round(wide / top * 255), 0, 255).astype(np.uint8)
                    return np.repeat(gray[..., None], 3, axis=-1)
                if im.mode == "F":
                    gray = np.clip(np.round(np.asarray(im, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
                    return np.repeat(gray[..., None], 3, axis=-1)
                return np.asarray(im.convert("RGB")).copy()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise InputError(f"{self.files[i]}: not a readable image ({type(e).__name__})") from None

    def __getitem__(self, i):
        return torch.from_numpy(self._open(i)).permute(2, 0, 1)

    def __str__(self):
        return str(self.path)


def open_images(path) -> torch.utils.data.Dataset:
    """An ADM .npz (``arr_0``), a `groupdiff sample` output folder (its ``samples.npz``),
    or a folder of image files. Items are uint8 CHW tensors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / SAMPLES_FILE).is_file():
            return NpzImages(path / SAMPLES_FILE)
        return FolderImages(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: expected an .npz file or a folder of images")
    return NpzImages(path)
