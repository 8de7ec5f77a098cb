"""The encoded records as memory-mapped arrays, for random access by global index.

Neighbour groups join images from anywhere in the data set, which the streaming shard
reader cannot serve; this cache can. It is built once from the shards (one sequential
read) on each node, checksummed, and checked (sizes and sha256) each time it is opened:
a damaged or stale cache is rebuilt, with a note.

    DATA/cache/          (or --latent-cache DIR)
      labels.npy         (N,) int64
      mean.npy, std.npy  (N, C, h, w) float16 moments (pixel data sets: mean.npy is (N, H, W, 3) uint8)
      flip_mean.npy, flip_std.npy   those of the mirrored crop, when encoded
      emb.npy            (N, D) float16 retrieval embeddings, when encoded
      keys.npy           (N,) the records' keys
      cache.json         written last: the shards it was built from and every file's sha256

Size at ImageNet-256 with the SD-VAE: 4 x 4 x 32 x 32 x 2 bytes = 32 KB of moments an image
with its mirror, 1.5 KB of 768-d embeddings: ~43 GB for 1.28M images, on disk and, once
read, in the page cache.
"""

from __future__ import annotations

import itertools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from groupdiff_cli.data.neighbours import shards_fingerprint
from groupdiff_cli.plumbing.files import write_json_atomic
from groupdiff_cli.plumbing.integrity import file_sha256, recorded_folder_problem

CACHE_DIR, CACHE_RECORD = "cache", "cache.json"
FIELDS = ("mean", "std", "flip_mean", "flip_std", "emb")


@dataclass
class CachedRecords:
    """Every record of the data set, memory-mapped: what a ``loader.Window`` holds, for all."""

    labels: np.ndarray
    mean: np.ndarray
    std: np.ndarray | None
    flip_mean: np.ndarray | None
    flip_std: np.ndarray | None
    emb: np.ndarray | None
    keys: np.ndarray


def cache_dir(info: dict, where=None) -> Path:
    return Path(where) if where else Path(info["dir"]) / CACHE_DIR


def open_cache(info: dict, records, where=None, log=print, verify: bool = True) -> CachedRecords:
    """The cache of the data set ``info`` describes, built from ``records`` (a callable
    returning an iterator of every record in global order) when missing, stale or
    damaged. ``verify`` False opens it as it is: for the processes that wait while the
    first one checks or builds it."""
    folder = cache_dir(info, where)
    if not verify:
        return _open(folder)
    problem, detail, _ = recorded_folder_problem(folder, CACHE_RECORD, shards_fingerprint(info))
    if problem is None:
        return _open(folder)
    if problem != "missing":
        why = {"unreadable": "unreadable", "stale": "stale (built from other shards)",
               "damaged": f"damaged ({detail} does not match its sha256)"}[problem]
        log(f"note: the latent cache {folder} is {why}; building it again")
    _build(folder, info, records(), log)
    return _open(folder)


def _open(folder: Path) -> CachedRecords:
    def load(name):
        path = folder / f"{name}.npy"
        return np.load(path, mmap_mode="r") if path.is_file() else None

    return CachedRecords(labels=load("labels"), keys=load("keys"), **{f: load(f) for f in FIELDS})


def _build(folder: Path, info: dict, records, log) -> None:
    n = sum(info["shard_counts"])
    tmp = folder.with_name(f".{folder.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    first = next(records)
    arrays = {"labels": np.lib.format.open_memmap(tmp / "labels.npy", "w+", np.int64, (n,))}
    for f in FIELDS:
        a = getattr(first, f)
        if a is not None:
            dtype = np.float16 if f == "emb" else a.dtype
            arrays[f] = np.lib.format.open_memmap(tmp / f"{f}.npy", "w+", dtype, (n, *a.shape))
    keys = []
    for i, rec in enumerate(itertools.chain([first], records)):
        keys.append(rec.key)
        arrays["labels"][i] = rec.label
        for f in FIELDS:
            if f in arrays:
                arrays[f][i] = getattr(rec, f)
    if len(keys) != n:
        raise ValueError(f"--data {info['dir']}: the shards hold {len(keys)} records, dataset.json says {n}")
    np.save(tmp / "keys.npy", np.array(keys))
    for a in arrays.values():
        a.flush()
    names = sorted(p.name for p in tmp.iterdir())
    for name in names:
        with open(tmp / name, "rb+") as fh:
            os.fsync(fh.fileno())
    write_json_atomic(dict(shards_fingerprint=shards_fingerprint(info), num_images=n,
                           sha256={name: file_sha256(tmp / name) for name in names}), tmp / CACHE_RECORD)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    log(f"built the latent cache {folder} ({n} images)")

