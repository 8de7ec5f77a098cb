"""Checksums on every weights file and cache that groupdiff writes, checked when read.

A safetensors file we write carries the sha256 of its tensors (names, dtypes, shapes
and bytes, in name order) in its metadata under ``DIGEST_KEY``; an npz cache carries
the sha256 of its arrays as one more array, ``DIGEST_KEY``. Reading either recomputes
the digest: a mismatch is an ``IntegrityError``, one line naming the file. Files
written by others (official DiT/SiT weights, ADM reference batches) carry no digest
and are read as they are. Other files (``optimizer.pt``) are hashed whole, and the
hash is recorded beside them (``file_sha256``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from groupdiff_cli.plumbing.files import atomic_path

DIGEST_KEY = "groupdiff_sha256"


class IntegrityError(ValueError):
    """A file whose content does not match the checksum written with it. A ValueError:
    found when the file is first read, before the work it feeds, it exits with code 2
    (the rule is written at ``files.InputError``)."""

    def __init__(self, path, what: str = "its content does not match the checksum written with it",
                 fix: str = "restore it or delete it and run again"):
        super().__init__(f"{path}: corrupt, {what}; {fix}")


def _update(h, name: str, dtype: str, shape, data: bytes | memoryview) -> None:
    h.update(f"{name}\0{dtype}\0{tuple(shape)}\0".encode())
    h.update(data)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        _update(h, name, str(t.dtype), t.shape, t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        _update(h, name, a.dtype.str, a.shape, a.tobytes())
    return h.hexdigest()


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` with their digest, atomically (complete or absent)."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    meta = dict(metadata or {}, **{DIGEST_KEY: tensors_digest(tensors)})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_safetensors(path, require_digest: bool = False) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, checked against its digest when it has one (and,
    with ``require_digest``, an IntegrityError when it has none: every file we write
    carries one, so a digest that is missing was damaged). ValueError naming the file
    when it is not a readable safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, header decoding, OS errors
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if DIGEST_KEY not in meta and require_digest:
        raise IntegrityError(path, "it carries no checksum although groupdiff wrote it")
    if DIGEST_KEY in meta and meta[DIGEST_KEY] != tensors_digest(tensors):
        raise IntegrityError(path)
    return tensors


def save_arrays(path, **arrays) -> None:
    """An npz (uncompressed) of ``arrays`` and their digest, written atomically."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    with atomic_path(Path(path)) as tmp:
        np.savez(tmp, **arrays, **{DIGEST_KEY: np.array(arrays_digest(arrays))})


def load_arrays(path) -> dict[str, np.ndarray]:
    """The arrays that ``save_arrays`` wrote; IntegrityError when the file is unreadable,
    lacks its digest or does not match it."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # BadZipFile, truncated members, pickled objects, OS errors
        raise IntegrityError(path, f"not a readable npz ({type(e).__name__})") from None
    digest = arrays.pop(DIGEST_KEY, None)
    if digest is None or str(digest) != arrays_digest(arrays):
        raise IntegrityError(path)
    return arrays


def file_sha256(path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def recorded_folder_problem(folder, record_name: str, fingerprint: str) -> tuple[str | None, str, dict]:
    """Whether a folder of files built from something (the neighbour table, the latent
    cache) can be used: its record ``record_name`` holds the ``shards_fingerprint`` of what
    they were built from and each file's ``sha256``. Returns (problem, detail, record):
    problem None, or "missing" / "unreadable" (detail: why) / "stale" / "damaged"
    (detail: the file that does not match)."""
    folder = Path(folder)
    try:
        record = json.loads((folder / record_name).read_text())
    except FileNotFoundError:
        return "missing", "", {}
    except (OSError, ValueError) as e:
        return "unreadable", str(e), {}
    if record.get("shards_fingerprint") != fingerprint:
        return "stale", "", record
    for name, digest in record.get("sha256", {}).items():
        if not (folder / name).is_file() or file_sha256(folder / name) != digest:
            return "damaged", name, record
    return None, "", record
