"""Training batches from `groupdiff encode` shards: an endless deterministic stream cut
into windows, groups built inside each window, batches as a pure function of the step.

Stream: each process reads its own shards (shard-level node split): in epoch e the
shards are put in a seeded random order and process r takes every W-th one; samples
keep their (already random) order inside a shard. Training runs by step count, so
ranks never wait for each other at an epoch's end.

Windows: the stream is cut into windows of ``group_buffer`` samples. Inside a window
the groups are formed (similarity, class or random) and the batches laid out, all
seeded by the window's index. Batch b of the run is therefore fixed by b alone: a
resumed run rebuilds the window that holds its next batch and continues exactly.
Every sample of a window is used at most once (a window's leftover, fewer than one
batch, is skipped), so no image is used twice before the stream wraps.

Speed (bench/loader_bench.py): a DataLoader worker process reads and groups window
w + 1 while window w trains, into the other of two shared-memory buffers; shards are
read by a small tar reader (Python's tarfile was the bottleneck), groups are formed
with one matrix product per chunk of anchors, and batches by array indexing.
"""

from __future__ import annotations

import io
import itertools
import math
import mmap
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from groupdiff_cli.plumbing.distributed import worker_init
from groupdiff_cli.plumbing.files import InputError, read_json_file, size_text
from groupdiff_cli.plumbing.layout import DATASET_FILE, shard_record
from groupdiff_cli.plumbing.seeds import Stream, derived_seed, shard_order_rng, similarity_rng, window_rng

DATASET_KEYS = ("shards", "num_classes", "latent_shape", "vae", "vae_scale")


def read_dataset(data_dir, flag: str = "--data") -> dict:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"{flag} {data_dir}: no such directory")
    meta = data_dir / DATASET_FILE
    if not meta.is_file():
        raise ValueError(f"{flag} {data_dir}: no {DATASET_FILE} (encode the images first with `groupdiff encode`)")
    info = read_json_file(meta, flag)
    missing = [k for k in DATASET_KEYS if k not in info]
    if missing:
        raise ValueError(f"{flag}: {meta} lacks {', '.join(missing)}; not written by `groupdiff encode`")
    counts = []
    for shard in info["shards"]:
        if not (data_dir / shard).is_file():
            raise ValueError(f"{flag} {data_dir}: shard {shard} listed in {DATASET_FILE} is missing")
        side = read_json_file(shard_record(data_dir / shard), flag)
        if not isinstance(side.get("count"), int):
            raise ValueError(f"{flag}: {shard_record(data_dir / shard)} has no sample count")
        counts.append(side["count"])
    if sum(counts) == 0:
        raise ValueError(f"{flag} {data_dir}: the shards hold no samples")
    info["shard_counts"] = counts
    info["dir"] = str(data_dir)
    return info


@dataclass
class Record:
    key: str
    label: int
    mean: np.ndarray  # (C, h, w) fp16 moments, or uint8 HWC pixels with vae = pixel
    std: np.ndarray | None
    flip_mean: np.ndarray | None
    flip_std: np.ndarray | None
    emb: np.ndarray | None


def _records(path: Path, expected: int):
    """The shard's records; a shard that cannot be read, or holds fewer records than its
    sidecar says, is an InputError naming it (the run stops; its checkpoints stay)."""
    n = 0
    try:
        for rec in _read_shard(path):
            n += 1
            yield rec
    except InputError:
        raise
    except Exception as e:  # OS, tar-format and decoding errors
        raise InputError(f"shard {path} is corrupt after {n} record(s) ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'unreadable'}); re-encode it") from None
    if n != expected:
        raise InputError(f"shard {path} holds {n} record(s) but its .json says {expected}; re-encode it")


class CorruptTar(Exception):
    pass


def _tar_files(buf: memoryview):
    """(name, data) of each regular file of a tar archive in memory, data a view.

    Our shards are written by webdataset's TarWriter: a pax header before every member.
    Python's tarfile reads them at ~0.4 ms per member, which capped the loader at
    ~500 records/s; this reader of the same format (ustar, pax, GNU long names) takes a
    few µs per member. Member header checksums and sizes are verified (pax headers, which
    precede each member and hold only its mtime, for their structure), so a damaged shard
    fails."""
    off, end, pax, long_name = 0, len(buf), {}, None
    while off + 512 <= end:
        header = bytes(buf[off:off + 512])
        kind = header[156]
        if kind == 0 and header == _ZERO_BLOCK:
            return
        if "size" in pax:
            size = int(pax["size"])
        elif header[124] & 0x80:  # base-256 size (GNU, > 8 GiB)
            size = int.from_bytes(header[125:136], "big")
        else:
            try:
                size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
            except ValueError:
                raise CorruptTar(f"bad tar header at byte {off}") from None
        start, off = off + 512, off + 512 + -(-size // 512) * 512
        if start + size > end:
            raise CorruptTar(f"member at byte {start - 512} is cut short")
        if kind == 0x78:  # pax "x": records "LEN key=value\n" for the next member; ours carry only mtime
            raw = bytes(buf[start:start + size])
            if not raw.endswith(b"\n"):
                raise CorruptTar(f"bad pax header at byte {start - 512}")
            if b"path=" in raw or b"size=" in raw:
                pax = dict(r.split(b" ", 1)[1].decode().split("=", 1) for r in raw.splitlines() if r)
            continue
        try:  # the checksum field counts as spaces
            ok = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8) == sum(header) - sum(header[148:156]) + 256
        except ValueError:
            ok = False
        if not ok:
            raise CorruptTar(f"bad tar header checksum at byte {start - 512}")
        if kind == 0x4C:  # GNU "L": the long name of the next member
            long_name = bytes(buf[start:start + size]).split(b"\0", 1)[0].decode()
            continue
        if kind in (0x30, 0, 0x37):  # regular file
            name = long_name or pax.get("path")
            if name is None:
                name = header[:100].split(b"\0", 1)[0].decode()
                if header[257:262] == b"ustar" and header[345]:
                    name = header[345:500].split(b"\0", 1)[0].decode() + "/" + name
            yield name, buf[start:start + size]
        pax, long_name = {}, None
    raise CorruptTar("archive ends without its end-of-archive blocks")


_ZERO_BLOCK = bytes(512)


_NPY_HEADERS: dict[bytes, tuple] = {}  # a shard's arrays share a few headers: parse each once


def _npy(data: memoryview) -> np.ndarray:
    """A .npy file's array, viewed in place (np.load copies and re-parses the header)."""
    head = bytes(data[:10])
    if head[:6] != b"\x93NUMPY":
        raise CorruptTar("an .npy member is not a NumPy file")
    hlen = int.from_bytes(head[8:10], "little") + 10 if head[6] == 1 else int.from_bytes(bytes(data[8:12]), "little") + 12
    prefix = bytes(data[:hlen])
    if prefix not in _NPY_HEADERS:
        f = io.BytesIO(prefix)
        fmt = np.lib.format
        read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(f)
        _NPY_HEADERS[prefix] = (shape, fortran, dtype, math.prod(shape))
    shape, fortran, dtype, count = _NPY_HEADERS[prefix]
    arr = np.frombuffer(data, dtype, count=count, offset=hlen)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def _read_shard(path: Path):
    """The shard's records in order: members sharing a key (the name up to the first dot
    of its base name, as webdataset splits it) make one record."""
    with open(path, "rb") as f:
        buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b"")
    key, fields = None, {}
    for name, data in itertools.chain(_tar_files(buf), [("", None)]):
        folder, _, base = name.rpartition("/")
        k, _, ext = base.partition(".")
        k = f"{folder}/{k}" if folder else k
        if k != key and key is not None:  # the record ends where the key changes
            yield _record(path, key, fields)
            fields = {}
        key, fields[ext] = k, data


def _record(path: Path, key: str, fields: dict) -> Record:
    if "cls" not in fields or not ("image.png" in fields or "mean.npy" in fields):
        raise InputError(f"shard {path}: record {key} lacks its label or latents; re-encode it")
    emb = _npy(fields["emb.npy"]) if "emb.npy" in fields else None
    label = int(bytes(fields["cls"]))
    if "image.png" in fields:
        img = np.asarray(Image.open(io.BytesIO(bytes(fields["image.png"]))).convert("RGB"))
        return Record(key, label, img, None, None, None, emb)
    flip = [_npy(fields[e]) if e in fields else None for e in ("flip_mean.npy", "flip_std.npy")]
    return Record(key, label, _npy(fields["mean.npy"]), _npy(fields["std.npy"]), *flip, emb)


def all_records(info: dict):
    """Every record of the data set once, in global order: the shards as dataset.json lists
    them, each in its own order (the order of the neighbour table and the latent cache)."""
    for shard, count in zip(info["shards"], info["shard_counts"]):
        yield from _records(Path(info["dir"]) / shard, count)


class SampleStream:
    """The endless per-rank sample sequence, with a fast skip to any position."""

    def __init__(self, info: dict, rank: int, world: int, seed: int):
        n = len(info["shards"])
        if n < world:
            raise ValueError(f"--data {info['dir']}: {n} shard(s) for {world} processes; every process needs "
                             f"one: re-encode with a smaller --shard-size")
        self.dir, self.shards, self.counts = Path(info["dir"]), info["shards"], info["shard_counts"]
        self.rank, self.world, self.seed = rank, world, seed

    def epoch_shards(self, epoch: int) -> list[int]:
        order = shard_order_rng(self.seed, epoch).permutation(len(self.shards))
        return [int(k) for k in order[self.rank::self.world]]

    def first_record(self) -> Record:
        """A record of this process's first shard: what the stream's records look like."""
        k = self.epoch_shards(0)[0]
        records = _records(self.dir / self.shards[k], self.counts[k])
        try:
            return next(records)
        except StopIteration:
            raise ValueError(f"--data {self.dir}: shard {self.shards[k]} is empty") from None
        finally:
            records.close()

    def iterate(self, start: int):
        """Samples from position ``start`` of this rank's sequence on, forever."""
        epoch, pos = 0, 0
        while True:
            mine = self.epoch_shards(epoch)
            if sum(self.counts[k] for k in mine) == 0:
                raise ValueError(f"--data {self.dir}: the shards of process {self.rank} are empty")
            for k in mine:
                if pos + self.counts[k] <= start:  # skip a whole shard without reading it
                    pos += self.counts[k]
                    continue
                for rec in _records(self.dir / self.shards[k], self.counts[k]):
                    if pos >= start:
                        yield rec
                    pos += 1
            epoch += 1


def build_groups(emb: np.ndarray | None, labels: np.ndarray, num_groups: int, n: int, rule: str,
                 threshold: float, rng: np.random.Generator, chunk: int = 256) -> list[list[int]]:
    """``num_groups`` disjoint groups of n indices into the window, anchor first.

    similarity: a random anchor, then n - 1 random picks among the remaining samples
    whose cosine similarity to it is >= threshold (the nearest ones if too few pass);
    class: picks of the anchor's class (any if too few); random: any picks (a random
    partition). Grouped samples leave the pool.

    Anchors are the free samples in the order of one random permutation (the next free
    one is a uniform draw among the free, as before); their similarities to the whole
    window are computed ``chunk`` anchors at a time as one matrix product, so memory
    stays at chunk x window floats.
    """
    size = len(labels)
    if num_groups * n > size:
        raise ValueError(f"{num_groups} groups of {n} do not fit in a window of {size}")
    if rule == "random" or n == 1:
        return rng.permutation(size)[:num_groups * n].reshape(num_groups, n).tolist()
    left = np.ones(size, bool)
    order = rng.permutation(size)
    pos, groups = 0, []
    while len(groups) < num_groups:
        ahead = pos + np.flatnonzero(left[order[pos:]])[:min(chunk, num_groups - len(groups))]
        anchors = order[ahead]
        if rule == "similarity":
            sims = emb[anchors] @ emb.T  # (chunk, window)
            passing = sims >= threshold
        else:
            passing = labels[anchors][:, None] == labels[None, :]
        for i, a in enumerate(anchors):
            if not left[a]:  # picked by an earlier anchor of this chunk
                continue
            left[a] = False
            ok = np.flatnonzero(passing[i] & left)
            if len(ok) >= n - 1:
                picks = rng.choice(ok, n - 1, replace=False)
            else:
                free = np.flatnonzero(left)
                picks = nearest(sims[i, free], n - 1, free) if rule == "similarity" else rng.choice(
                    free, n - 1, replace=False)
            left[picks] = False
            groups.append([int(a)] + picks.tolist())
            if len(groups) == num_groups:
                break
        pos = int(ahead[-1]) + 1
    return groups


def nearest(sims: np.ndarray, k: int, index: np.ndarray) -> np.ndarray:
    """The ``index`` entries of the k largest ``sims``, most similar first (O(len) selection)."""
    top = np.argpartition(-sims, k - 1)[:k] if k < len(sims) else np.arange(len(sims))
    return index[top[np.lexsort((top, -sims[top]))]]


def pair_similarity(emb: np.ndarray, threshold: float, pairs: int = 20_000, rng=None) -> dict:
    """The cosine similarity of random pairs of a window's embeddings: median and the
    fraction at or above the threshold. Near 1, similarity groups are random groups
    (e.g. a randomly initialised embedder: every pair looks alike)."""
    rng = rng or np.random.default_rng(0)
    i, j = rng.integers(0, len(emb), pairs), rng.integers(0, len(emb), pairs)
    keep = i != j
    sim = np.einsum("nd,nd->n", emb[i[keep]], emb[j[keep]])
    return dict(median=float(np.median(sim)), passing=float((sim >= threshold).mean()),
                p10=float(np.percentile(sim, 10)), p90=float(np.percentile(sim, 90)))


def mates_similarity(emb: np.ndarray | None, groups: np.ndarray, labels: np.ndarray, threshold: float,
                     cosines=None) -> dict | None:
    """How alike group mates are: the cosine of each mate to its group's anchor (mean,
    10th percentile, and the share of groups whose mates all reach ``threshold``) and
    the share of mates of the anchor's class. groups: (G, n), anchor first. ``cosines``
    (G, n - 1) when known (the neighbour table); else from the unit embeddings ``emb``;
    without either, the class share alone."""
    if len(groups) == 0 or groups.shape[1] < 2:
        return None
    anchors, mates = groups[:, :1], groups[:, 1:]
    out = dict(same_class=float((labels[mates] == labels[anchors]).mean()))
    if cosines is None and emb is not None:
        cosines = np.einsum("gd,gmd->gm", emb[anchors[:, 0]], emb[mates])
    if cosines is not None:
        out.update(mean=float(cosines.mean()), p10=float(np.percentile(cosines, 10)),
                   all_pass=float((cosines >= threshold).all(1).mean()))
    return out


WINDOW_FIELDS = ("mean", "std", "flip_mean", "flip_std", "emb")


@dataclass
class Window:
    """A window's records as stacked arrays, filled in place by ``read_window``."""

    labels: np.ndarray  # (W,) int64
    mean: np.ndarray  # (W, C, h, w) fp16 moments, or (W, H, W, 3) uint8 pixels
    std: np.ndarray | None
    flip_mean: np.ndarray | None
    flip_std: np.ndarray | None
    emb: np.ndarray | None  # (W, D) float32

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.labels, *(getattr(self, f) for f in WINDOW_FIELDS)) if a is not None)


def record_bytes(probe: Record) -> int:
    """Bytes a record takes in a window (ImageNet-256 SD-VAE moments with flips and
    768-d embeddings: 35,848)."""
    return 8 + sum(getattr(probe, f).size * (4 if f == "emb" else getattr(probe, f).itemsize)
                   for f in WINDOW_FIELDS if getattr(probe, f) is not None)


def window_tensors(probe: Record, count: int, shared: bool = False) -> dict[str, torch.Tensor | None]:
    """Empty arrays for ``count`` records shaped like ``probe`` (embeddings as float32);
    in shared memory when a worker process fills them."""
    def empty(shape, dtype):
        t = torch.empty((count, *shape), dtype=dtype)
        return t.share_memory_() if shared else t

    out = {"labels": empty((), torch.int64)}
    for f in WINDOW_FIELDS:
        a = getattr(probe, f)
        out[f] = None if a is None else empty(a.shape, torch.float32 if f == "emb" else torch.from_numpy(
            np.empty(0, a.dtype)).dtype)
    return out


def as_window(tensors: dict) -> Window:
    return Window(**{k: None if v is None else v.numpy() for k, v in tensors.items()})


def read_window(records, count: int, out: Window | None = None) -> tuple[Window, list[str]]:
    """The next ``count`` records of an iterator, copied into ``out`` (allocated when
    None); returns the window and the records' keys."""
    first = next(records)
    out = out or as_window(window_tensors(first, count))
    keys = []
    arrays = [(f, getattr(out, f)) for f in WINDOW_FIELDS if getattr(out, f) is not None]
    for i, rec in enumerate(itertools.chain([first], itertools.islice(records, count - 1))):
        keys.append(rec.key)
        out.labels[i] = rec.label
        for f, arr in arrays:
            arr[i] = getattr(rec, f)
    if len(keys) < count:
        raise InputError(f"the stream ended after {len(keys)} of {count} records")
    return out, keys


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1], the pixel-space model input."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


@dataclass
class Batch:
    """One process's micro-batch: flat images, consecutive groups."""

    latents: torch.Tensor  # (B, C, h, w), scaled, drawn from the moments (or pixels in [-1, 1])
    labels: torch.Tensor  # (B,), num_classes = null
    group_sizes: list[int]  # per group, in order
    keys: list[str]

    @property
    def grouped_fraction(self) -> float:
        return sum(n for n in self.group_sizes if n > 1) / len(self.keys)


@dataclass
class GroupedWindow:
    """A window and its batches: batch k is window rows ``rows[k]``, in groups of ``sizes[k]``.
    The records sit in the builder's buffer ``slot`` (``data``, attached where it is used)."""

    index: int
    slot: int
    keys: list[str]
    rows: np.ndarray  # (batches, batch size) int64
    sizes: list[list[int]]
    similarity: dict | None
    mates: dict | None = None
    data: Window | None = None


@dataclass(frozen=True)
class GroupRecipe:
    """How training batches are grouped: `train`'s --group-mode, --group-size,
    --group-ratio, --grouping and --similarity-threshold."""

    mode: str  # "l", "f" or "none"
    size: int  # images per group
    ratio: float  # GroupDiff-l: the fraction of a batch's images in whole groups
    rule: str  # "similarity", "class" or "random"
    threshold: float  # similarity: the least cosine similarity of a group's members


class WindowBuilder(torch.utils.data.Dataset):
    """Window w read, grouped and cut into batches, all seeded by w: a pure function of w.

    A Dataset so that a DataLoader worker process can build window w + 1 while window
    w trains (no GIL shared with the training loop). Windows go to two buffers in turn
    (w % 2), in shared memory with a worker, allocated once: nothing is copied between
    the processes and nothing is unmapped at a window boundary. The worker builds
    w + 1 only once w has been handed over, when w - 1 (same buffer) is done with.
    Windows are read in order: the reader goes on where the last window ended; only a
    jump (a resume) starts it afresh."""

    def __init__(self, stream: SampleStream, recipe: GroupRecipe, *, window: int, batch_size: int, seed: int,
                 rank: int, shared: bool):
        self.stream, self.recipe, self.window, self.b = stream, recipe, window, batch_size
        self.seed, self.rank = seed, rank
        self.per_window = window // batch_size
        probe = stream.first_record()
        self.window_bytes = window * record_bytes(probe)
        if shared and Path("/dev/shm").is_dir():
            free = shutil.disk_usage("/dev/shm").free
            if 2 * self.window_bytes > free:
                raise ValueError(f"--group-buffer {window}: two windows need {size_text(2 * self.window_bytes)} "
                                 f"of shared memory and /dev/shm has {size_text(free)} free; lower "
                                 f"--group-buffer or give the container more (docker run --shm-size)")
        try:
            self.buffers = [window_tensors(probe, window, shared) for _ in range(2)]
        except RuntimeError as e:  # torch's shared memory: /dev/shm read-only, or full after the check (a race)
            if not shared:
                raise
            why = str(e).splitlines()[0].rsplit(": ", 1)[-1]
            raise ValueError(f"--group-buffer {window}: the loader's two windows ({size_text(2 * self.window_bytes)})"
                             f" cannot be placed in shared memory (/dev/shm: {why}); pass --num-workers 0 (no "
                             f"worker process, no shared memory) or give the job a writable /dev/shm with room "
                             f"(docker run --shm-size)") from None
        self._views: dict[int, Window] = {}
        self._iter, self._iter_pos = None, None

    def __getstate__(self):  # a worker process starts its own reader (the buffers are shared)
        return {**self.__dict__, "_iter": None, "_iter_pos": None, "_views": {}}

    def slot(self, k: int) -> Window:
        if k not in self._views:
            self._views[k] = as_window(self.buffers[k])
        return self._views[k]

    def __getitem__(self, w: int) -> GroupedWindow:
        win = self.build(w)
        win.data = None  # the training process has the same buffer
        return win

    def _read(self, w: int, out: Window) -> list[str]:
        start = w * self.window
        if self._iter is None or self._iter_pos != start:  # a fresh start or a resume
            self._iter = self.stream.iterate(start)
        self._iter_pos = None  # unknown until the read completes
        keys = read_window(self._iter, self.window, out)[1]
        self._iter_pos = start + self.window
        return keys

    def build(self, w: int) -> GroupedWindow:
        data = self.slot(w % 2)
        keys = self._read(w, data)
        rng = window_rng(self.seed, self.rank, w)
        r = self.recipe
        nb, b, n = self.per_window, self.b, r.size
        total = nb * b
        if r.mode == "none" or n == 1:
            num_groups = 0
        elif r.mode == "f":
            num_groups = total // n
        else:  # l: the ratio of the images in whole groups; the fractions carry over between windows
            x = r.ratio * total / n
            num_groups = min(total // n, math.floor((w + 1) * x) - math.floor(w * x))
        similarity = None
        if r.rule == "similarity" and num_groups:
            similarity = pair_similarity(data.emb, r.threshold, rng=similarity_rng(self.seed, w))
        groups = np.array(build_groups(data.emb, data.labels, num_groups, n, r.rule, r.threshold, rng),
                          np.int64).reshape(num_groups, n)
        mates = mates_similarity(data.emb, groups, data.labels, r.threshold)
        used = np.zeros(len(data.labels), bool)
        used[groups.ravel()] = True
        singles = rng.permutation(np.flatnonzero(~used))
        groups = groups[rng.permutation(num_groups)]
        rows, sizes, s0 = np.empty((nb, b), np.int64), [], 0
        for k in range(nb):  # the groups spread evenly over the window's batches
            g0, g1 = k * num_groups // nb, (k + 1) * num_groups // nb
            need = b - (g1 - g0) * n
            rows[k] = np.concatenate([groups[g0:g1].ravel(), singles[s0:s0 + need]])
            sizes.append([n] * (g1 - g0) + [1] * need)
            s0 += need
        return GroupedWindow(w, w % 2, keys, rows, sizes, similarity, mates, data)


def batch_maker(info: dict, recipe: GroupRecipe, seed: int, rank: int, num_classes: int, flip: bool,
                label_dropout: float) -> BatchMaker:
    # mirror only where the data allows it (`encode --no-flip` records flip: false)
    return BatchMaker(recipe.mode, seed, rank, num_classes, label_dropout, flip and bool(info.get("flip", True)),
                      info["vae_scale"], info["vae"] == "pixel")


class GroupBatches:
    """Batch number b (counted over the run, per process) as a pure function of b.

    With ``prefetch`` a DataLoader worker process builds window w + 1 while window w is
    used, so the loop waits only for the first window; what a window holds depends
    only on its index and the seed, never on timing. ``last_wait``: how long the last
    ``batch`` call waited for its window (seconds)."""

    def __init__(self, info: dict, recipe: GroupRecipe, *, batch_size: int, window: int, seed: int,
                 num_classes: int, rank: int = 0, world: int = 1, flip: bool = True, label_dropout: float = 0.1,
                 prefetch: bool = True):
        if window < batch_size:
            raise ValueError(f"--group-buffer {window} is smaller than the per-process batch of {batch_size} images")
        if recipe.mode != "none" and batch_size % recipe.size:
            raise ValueError(f"per-process batch of {batch_size} images is not a multiple of --group-size "
                             f"{recipe.size}")
        if recipe.rule == "similarity" and not info.get("embedder_dim"):
            raise ValueError(f"--grouping similarity: the shards in {info['dir']} have no embeddings "
                             f"(encoded with --embedder none); use --grouping class or random")
        self.builder = WindowBuilder(SampleStream(info, rank, world, seed), recipe, window=window,
                                     batch_size=batch_size, seed=seed, rank=rank, shared=prefetch)
        self.maker = batch_maker(info, recipe, seed, rank, num_classes, flip, label_dropout)
        self.per_window = self.builder.per_window
        self.prefetch = prefetch
        self.similarity: dict | None = None  # of the current window's random pairs, when grouped by similarity
        self.mates: dict | None = None  # how alike the current window's group mates are
        self.last_wait = 0.0
        self._current: GroupedWindow | None = None
        self._loader = None  # (next window index it yields, its iterator)

    def close(self) -> None:
        """Stop the worker process (if any)."""
        if self._loader is not None:
            iterator, self._loader = self._loader[1], None
            shutdown = getattr(iterator, "_shutdown_workers", None)  # else its __del__ does it
            if shutdown is not None:
                shutdown()

    def _window(self, w: int) -> GroupedWindow:
        if self._current is not None and self._current.index == w:
            return self._current
        t0 = time.perf_counter()
        if not self.prefetch:
            win = self.builder.build(w)
        else:
            if self._loader is None or self._loader[0] != w:  # the first window, or a jump
                self.close()
                loader = torch.utils.data.DataLoader(self.builder, batch_size=None, sampler=itertools.count(w),
                                                     num_workers=1, prefetch_factor=1, worker_init_fn=worker_init())
                self._loader = (w, iter(loader))
            try:
                win = next(self._loader[1])
            except Exception as e:
                if "DataLoader worker (pid" in str(e):  # the worker died (killed): stop, as mid-step
                    self.close()
                    raise
                # torch re-raises a worker's error as text with the worker's traceback;
                # the window is a pure function of w, so building it here raises the
                # error as itself (a one-line message), or goes on if it was passing
                self.close()
                win = self.builder.build(w)
            else:
                self._loader = (w + 1, self._loader[1])
                win.data = self.builder.slot(win.slot)
        self.last_wait = time.perf_counter() - t0
        self._current, self.similarity, self.mates = win, win.similarity, win.mates
        return win

    def batch(self, index: int, device="cpu") -> Batch:
        w, k = divmod(index, self.per_window)
        self.last_wait = 0.0
        win = self._window(w)
        return self.maker.make(win.data, win.rows[k], win.sizes[k], win.keys, index, device)


@dataclass(frozen=True)
class BatchMaker:
    """Rows of a window (or of the whole cached data set) -> the training micro-batch:
    mirrored and noised moments (or pixels), labels per group mode. Drawn from the stream
    keyed (seed, rank, batch index), so a batch is a function of its rows and index."""

    mode: str
    seed: int
    rank: int
    num_classes: int
    label_dropout: float
    flip: bool
    scale: float
    pixel: bool

    def make(self, data, rows: np.ndarray, sizes: list[int], keys, index: int, device="cpu") -> Batch:
        gen = torch.Generator().manual_seed(derived_seed(self.seed, self.rank, index, Stream.BATCH))
        m = len(rows)
        flip = (torch.rand(m, generator=gen) < 0.5).numpy() if self.flip else np.zeros(m, bool)
        if self.pixel:
            x = pixels_to_tensor(np.asarray(data.mean[rows]))
            latents = torch.where(torch.from_numpy(flip)[:, None, None, None], x.flip(-1), x)
        else:
            flip &= data.flip_mean is not None
            mean, std = np.asarray(data.mean[rows]), np.asarray(data.std[rows])
            if flip.any():
                mean[flip], std[flip] = data.flip_mean[rows[flip]], data.flip_std[rows[flip]]
            mean, std = torch.from_numpy(mean).float(), torch.from_numpy(std).float()
            latents = (mean + std * torch.randn(mean.shape, generator=gen)) * self.scale
        labels = torch.from_numpy(np.asarray(data.labels[rows]).copy())
        image_group = torch.from_numpy(np.repeat(sizes, sizes))
        if self.mode == "l":
            labels[image_group > 1] = self.num_classes  # GroupDiff-l: grouped images are unconditional
        elif self.mode == "none":
            labels[torch.rand(m, generator=gen) < self.label_dropout] = self.num_classes
        elif self.mode == "f":  # the label is dropped for a whole group at once
            drop = torch.rand(len(sizes), generator=gen) < self.label_dropout
            labels[torch.from_numpy(np.repeat(drop.numpy(), sizes))] = self.num_classes
        return Batch(latents.to(device), labels.to(device), list(sizes), [keys[i] for i in rows])
