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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from groupdiff_cli.files import InputError, read_json_file


def derived_seed(*ints: int) -> int:
    """A 63-bit seed derived from integers (the same in every process and run)."""
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(2, np.uint64)[0] >> np.uint64(1))


DATASET_KEYS = ("shards", "num_classes", "latent_shape", "vae", "vae_scale")


def read_dataset(data_dir, flag: str = "--data") -> dict:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"{flag} {data_dir}: no such directory")
    meta = data_dir / "dataset.json"
    if not meta.is_file():
        raise ValueError(f"{flag} {data_dir}: no dataset.json (encode the images first with `groupdiff encode`)")
    info = read_json_file(meta, flag)
    missing = [k for k in DATASET_KEYS if k not in info]
    if missing:
        raise ValueError(f"{flag}: {meta} lacks {', '.join(missing)}; not written by `groupdiff encode`")
    counts = []
    for shard in info["shards"]:
        if not (data_dir / shard).is_file():
            raise ValueError(f"{flag} {data_dir}: shard {shard} listed in dataset.json is missing")
        side = read_json_file(data_dir / shard.replace(".tar", ".json"), flag)
        if not isinstance(side.get("count"), int):
            raise ValueError(f"{flag}: {data_dir / shard.replace('.tar', '.json')} has no sample count")
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


def _this_shard(urls):
    return urls


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
    except Exception as e:  # tarfile, decoding and OS errors from inside webdataset
        raise InputError(f"shard {path} is corrupt after {n} record(s) ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'unreadable'}); re-encode it") from None
    if n != expected:
        raise InputError(f"shard {path} holds {n} record(s) but its .json says {expected}; re-encode it")


def _read_shard(path: Path):
    import webdataset as wds

    # the shard is already this process's own (SampleStream splits shards between the
    # processes), so webdataset must not split it again; errors must surface, not be skipped
    ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False, nodesplitter=_this_shard,
                        workersplitter=_this_shard, handler=wds.reraise_exception)
    for s in ds.decode("rgb8"):
        if "cls" not in s or not ("image.png" in s or "mean.npy" in s):
            raise InputError(f"shard {path}: record {s.get('__key__')} lacks its label or latents; re-encode it")
        if "image.png" in s:
            yield Record(s["__key__"], int(s["cls"]), s["image.png"], None, None, None, s.get("emb.npy"))
        else:
            yield Record(s["__key__"], int(s["cls"]), s["mean.npy"], s["std.npy"], s.get("flip_mean.npy"),
                         s.get("flip_std.npy"), s.get("emb.npy"))


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
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [int(k) for k in order[self.rank::self.world]]

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
                 threshold: float, rng: np.random.Generator) -> list[list[int]]:
    """``num_groups`` disjoint groups of n indices into the window.

    similarity: a random anchor, then n - 1 random picks among the remaining samples
    whose cosine similarity to it is >= threshold (the nearest ones if too few pass);
    class: picks of the anchor's class (any if too few); random: any picks.
    Grouped samples leave the pool.
    """
    left = np.ones(len(labels), bool)
    groups = []
    for _ in range(num_groups):
        free = np.flatnonzero(left)
        anchor = int(rng.choice(free))
        left[anchor] = False
        free = np.flatnonzero(left)
        if rule == "similarity":
            sim = emb[free] @ emb[anchor]
            ok = free[sim >= threshold]
            if len(ok) >= n - 1:
                picks = rng.choice(ok, n - 1, replace=False)
            else:
                picks = free[np.argsort(-sim, kind="stable")[: n - 1]]
        elif rule == "class":
            ok = free[labels[free] == labels[anchor]]
            pool = ok if len(ok) >= n - 1 else free
            picks = rng.choice(pool, n - 1, replace=False)
        else:
            picks = rng.choice(free, n - 1, replace=False)
        left[picks] = False
        groups.append([anchor] + [int(p) for p in picks])
    return groups


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


class GroupBatches:
    """Batch number b (counted over the run, per process) as a pure function of b."""

    def __init__(self, info: dict, rank: int, world: int, batch_size: int, group_size: int, mode: str, ratio: float,
                 grouping: str, threshold: float, window: int, seed: int, num_classes: int, flip: bool = True,
                 label_dropout: float = 0.1):
        if window < batch_size:
            raise ValueError(f"--group-buffer {window} is smaller than the per-process batch of {batch_size} images")
        if mode != "none" and batch_size % group_size:
            raise ValueError(f"per-process batch of {batch_size} images is not a multiple of --group-size {group_size}")
        if grouping == "similarity" and not info.get("embedder_dim"):
            raise ValueError(f"--grouping similarity: the shards in {info['dir']} have no embeddings "
                             f"(encoded with --embedder none); use --grouping class or random")
        self.stream = SampleStream(info, rank, world, seed)
        self.b, self.n, self.mode, self.ratio = batch_size, group_size, mode, ratio
        self.grouping, self.threshold, self.window, self.seed = grouping, threshold, window, seed
        # mirror only where the data allows it (`encode --no-flip` records flip: false)
        self.rank, self.num_classes, self.label_dropout = rank, num_classes, label_dropout
        self.flip = flip and bool(info.get("flip", True))
        self.similarity: dict | None = None  # of the last window grouped by similarity (see _layout)
        self.per_window = window // batch_size
        self.scale = info["vae_scale"]
        self.pixel = info["vae"] == "pixel"
        self._cache: tuple[int, list] | None = None
        self._iter = None
        self._iter_pos = None

    def _window_records(self, w: int) -> list[Record]:
        start = w * self.window
        if self._iter is None or self._iter_pos != start:  # a fresh start or a resume
            self._iter = self.stream.iterate(start)
        recs = [next(self._iter) for _ in range(self.window)]
        self._iter_pos = start + self.window
        return recs

    def _layout(self, w: int):
        """The window's batches: lists of (record indices, group size) units."""
        recs = self._window_records(w)
        rng = np.random.default_rng([self.seed, self.rank, w])
        nb, b, n = self.per_window, self.b, self.n
        total = nb * b
        if self.mode == "none" or n == 1:
            num_groups = 0
        elif self.mode == "f":
            num_groups = total // n
        else:  # l: the ratio of the images in whole groups; the fractions carry over between windows
            x = self.ratio * total / n
            num_groups = min(total // n, math.floor((w + 1) * x) - math.floor(w * x))
        labels = np.array([r.label for r in recs])
        emb = None
        if self.grouping == "similarity" and num_groups:
            emb = np.stack([r.emb for r in recs]).astype(np.float32)
            self.similarity = pair_similarity(emb, self.threshold, rng=np.random.default_rng([self.seed, w]))
        groups = build_groups(emb, labels, num_groups, n, self.grouping, self.threshold, rng)
        used = np.zeros(len(recs), bool)
        for g in groups:
            used[g] = True
        singles = [int(i) for i in rng.permutation(np.flatnonzero(~used))]
        rng.shuffle(groups)
        batches = []
        for k in range(nb):
            g0, g1 = k * num_groups // nb, (k + 1) * num_groups // nb
            units = [(g, n) for g in groups[g0:g1]]
            need = b - (g1 - g0) * n
            units += [([i], 1) for i in singles[:need]]
            singles = singles[need:]
            batches.append(units)
        return recs, batches

    def batch(self, index: int, device="cpu") -> Batch:
        w, k = divmod(index, self.per_window)
        if self._cache is None or self._cache[0] != w:
            self._cache = (w, *self._layout(w))
        _, recs, batches = self._cache
        units = batches[k]
        gen = torch.Generator().manual_seed(derived_seed(self.seed, self.rank, index, 0))
        lat, labels, sizes, keys = [], [], [], []
        for idx, size in units:
            drop = self.mode == "f" and torch.rand((), generator=gen) < self.label_dropout
            for i in idx:
                r = recs[i]
                if self.pixel:
                    z = torch.from_numpy(np.array(r.mean)).permute(2, 0, 1).float() / 127.5 - 1
                    if self.flip and torch.rand((), generator=gen) < 0.5:
                        z = z.flip(-1)
                else:
                    use_flip = self.flip and r.flip_mean is not None and torch.rand((), generator=gen) < 0.5
                    mean = torch.from_numpy(np.array(r.flip_mean if use_flip else r.mean)).float()
                    std = torch.from_numpy(np.array(r.flip_std if use_flip else r.std)).float()
                    z = (mean + std * torch.randn(mean.shape, generator=gen)) * self.scale
                lat.append(z)
                if size > 1 and self.mode == "l":
                    labels.append(self.num_classes)  # GroupDiff-l: grouped images are unconditional
                elif self.mode == "none" and torch.rand((), generator=gen) < self.label_dropout:
                    labels.append(self.num_classes)
                else:
                    labels.append(self.num_classes if drop else r.label)
                keys.append(r.key)
            sizes.append(size)
        return Batch(torch.stack(lat).to(device), torch.tensor(labels, device=device), sizes, keys)
