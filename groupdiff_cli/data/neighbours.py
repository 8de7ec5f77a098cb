"""Groups as the GroupDiff authors form them: every image's nearest neighbours over the
whole encoded data set, and the epoch plan that groups an anchor with its nearest free
neighbours.

The table (``groupdiff neighbours DATA``) holds, for image i (the i-th record of the
shards in dataset.json's order), the K images of highest cosine similarity of their
stored retrieval embeddings, itself left out, most similar first, ties broken by the
lower index: exact, from one matrix product per block of rows (on the GPU when there is
one, the blocks shared by the processes of `accelerate launch`).

    DATA/neighbours/
      index.npy       (N, K) int32, the neighbours' indices
      cosine.npy      (N, K) float16, their cosine similarity
      done.npy        (blocks,) uint8 while it is built: which row blocks are written
      neighbours.json written last: K, N, the shards it was built from, the files' sha256

A stopped build resumes at the first block not written. A table is read only when its
record says it was built from these shards with this embedder and its files match their
sha256; anything else is refused in one line that says how to rebuild it.

The epoch plan (``epoch_groups``) follows the authors' rule: the images in a seeded random
order; the first ``1.5 x ratio x N / n`` are anchors, the others the free pool; each
anchor in turn takes its n - 1 nearest neighbours (among its top K) still in the pool,
or, with too few, goes back to the pool itself; the first ``ratio x N / n`` groups are
kept and the members of later ones go back to the pool.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from groupdiff_cli.plumbing.files import write_json_atomic
from groupdiff_cli.plumbing.integrity import file_sha256, recorded_folder_problem

NEIGHBOURS_DIR, NEIGHBOURS_RECORD = "neighbours", "neighbours.json"
INDEX_FILE, COSINE_FILE, DONE_FILE = "index.npy", "cosine.npy", "done.npy"
DEFAULT_K = 100


def table_dir(data_dir) -> Path:
    return Path(data_dir) / NEIGHBOURS_DIR


def shards_fingerprint(info: dict) -> str:
    """What a table was built from: the shards' names and counts and the embedder."""
    what = dict(shards=info["shards"], counts=info["shard_counts"], embedder=info.get("embedder"),
                embedder_dim=info.get("embedder_dim"))
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def read_embeddings(info: dict, records) -> np.ndarray:
    """(N, D) float32 unit vectors of every record, in global order."""
    n, d = sum(info["shard_counts"]), info.get("embedder_dim")
    if not d:
        raise ValueError(f"--data {info['dir']}: the shards hold no retrieval embeddings (encoded with "
                         f"--embedder none); encode with an embedder to build a neighbour table")
    emb = np.empty((n, d), np.float32)
    for i, rec in enumerate(records):
        emb[i] = rec.emb
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(norms, 1e-12)


def top_k(block: torch.Tensor, every: torch.Tensor, first: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar rows of ``every`` to each row of ``block`` (rows first ..
    first + len(block) - 1 of ``every``, which are left out of their own lists): indices
    (B, k) and cosines (B, k), most similar first, ties by the lower index."""
    sims = block @ every.T
    rows = torch.arange(len(block), device=sims.device)
    sims[rows, rows + first] = -math.inf
    vals, idx = sims.topk(min(k + 1, sims.shape[1] - 1), dim=1)
    vals, idx = vals.cpu().double().numpy(), idx.cpu().numpy()
    sims_np = None
    out_i, out_v = np.empty((len(block), k), np.int64), np.empty((len(block), k), np.float64)
    for r in range(len(block)):
        v, i = vals[r], idx[r]
        cut = v[k - 1]
        if len(v) > k and v[k] == cut:  # a tie at the boundary: every index at that value competes
            if sims_np is None:
                sims_np = sims.cpu().double().numpy()
            i = np.concatenate([i[v > cut], np.flatnonzero(sims_np[r] == cut)])
            v = sims_np[r][i]
        order = np.lexsort((i, -v))[:k]
        out_i[r], out_v[r] = i[order], v[order]
    return out_i, out_v


def build_table(data_dir, info: dict, records, k: int = DEFAULT_K, block: int = 1024, state=None,
                log=print) -> Path:
    """Write DATA/neighbours/ (see the module's docstring); resumes a stopped build. Every
    process of ``state`` (accelerate's) computes its share of the row blocks."""
    from groupdiff_cli.plumbing.distributed import process_state

    state = state or process_state()
    folder = table_dir(data_dir)
    n = sum(info["shard_counts"])
    if not 1 <= k < n:
        raise ValueError(f"--k {k}: must be at least 1 and below the {n} images of the data set")
    fingerprint = shards_fingerprint(info)
    problem, _, record = recorded_folder_problem(folder, NEIGHBOURS_RECORD, fingerprint)
    if problem is None and record.get("k", 0) >= k:  # intact and wide enough; a damaged one is built again
        if state.is_main_process:
            log(f"{folder}: a table of the {k} nearest neighbours is already there")
        return folder
    emb = torch.from_numpy(read_embeddings(info, records)).to(state.device)
    blocks = math.ceil(n / block)
    partial = folder / f".building-{fingerprint[:16]}-k{k}-b{block}"
    if state.is_main_process:
        partial.mkdir(parents=True, exist_ok=True)
        for name, dtype in ((INDEX_FILE, np.int32), (COSINE_FILE, np.float16)):
            if not (partial / name).is_file():
                np.lib.format.open_memmap(partial / name, "w+", dtype, (n, k)).flush()
        if not (partial / DONE_FILE).is_file():
            np.save(partial / DONE_FILE, np.zeros(blocks, np.uint8))
    state.wait_for_everyone()
    done = np.load(partial / DONE_FILE, mmap_mode="r+")
    index = np.load(partial / INDEX_FILE, mmap_mode="r+")
    cosine = np.load(partial / COSINE_FILE, mmap_mode="r+")
    todo = [b for b in range(blocks) if not done[b]][state.process_index::state.num_processes]
    if state.is_main_process and len(todo) < blocks:
        log(f"resuming the neighbour table at {int(np.sum(done))} of {blocks} blocks")
    for b in todo:
        lo, hi = b * block, min(n, (b + 1) * block)
        idx, vals = top_k(emb[lo:hi], emb, lo, k)
        index[lo:hi], cosine[lo:hi] = idx, vals
        index.flush(), cosine.flush()
        done[b] = 1  # only once the rows are on disk
        done.flush()
    state.wait_for_everyone()
    if state.is_main_process:
        _finish(folder, partial, fingerprint, n, k, info)
    state.wait_for_everyone()
    return folder


def _finish(folder: Path, partial: Path, fingerprint: str, n: int, k: int, info: dict) -> None:
    for name in (INDEX_FILE, COSINE_FILE):
        with open(partial / name, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial / name, folder / name)
    record = dict(k=k, num_images=n, shards_fingerprint=fingerprint, embedder=info.get("embedder"),
                  sha256={name: file_sha256(folder / name) for name in (INDEX_FILE, COSINE_FILE)})
    write_json_atomic(record, folder / NEIGHBOURS_RECORD)
    (partial / DONE_FILE).unlink()
    partial.rmdir()


def read_table(info: dict, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The checked table of an encoded data set, memory-mapped: (index, cosine), each (N,
    K). ValueError in one line for a missing, stale, foreign or damaged table."""
    folder = table_dir(info["dir"])
    rebuild = f"rebuild it with `groupdiff neighbours {info['dir']}`"
    problem, detail, _ = recorded_folder_problem(folder, NEIGHBOURS_RECORD, shards_fingerprint(info))
    if problem == "missing":
        raise ValueError(f"--grouping neighbours: {info['dir']} has no neighbour table; "
                         f"build it with `groupdiff neighbours {info['dir']}`")
    if problem == "unreadable":
        raise ValueError(f"--grouping neighbours: {folder / NEIGHBOURS_RECORD} is unreadable ({detail}); {rebuild}")
    if problem == "stale":
        raise ValueError(f"--grouping neighbours: the table in {folder} was built from other shards or another "
                         f"embedder than those in {info['dir']}/dataset.json; {rebuild}")
    if problem == "damaged":
        raise ValueError(f"--grouping neighbours: {folder / detail} is missing or damaged (its sha256 differs "
                         f"from {NEIGHBOURS_RECORD}); {rebuild}")
    index, cosine = np.load(folder / INDEX_FILE, mmap_mode="r"), np.load(folder / COSINE_FILE, mmap_mode="r")
    if k is not None and k > index.shape[1]:
        raise ValueError(f"--neighbours-k {k}: the table holds {index.shape[1]} neighbours per image; "
                         f"rebuild it with --k {k}")
    return index[:, :k] if k else index, cosine[:, :k] if k else cosine


def epoch_groups(table: np.ndarray, n: int, ratio: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's groups by the authors' rule (the module's docstring): (groups (G, n),
    anchor first then its mates nearest first, and the singles, in the order they were
    left). Every image is in exactly one of the two."""
    size = len(table)
    order = rng.permutation(size)
    wanted = int(size * ratio / n)
    num_anchors = min(size, int(size * ratio / n * 1.5))
    free = np.zeros(size, bool)
    free[order[num_anchors:]] = True
    groups = []
    for a in order[:num_anchors]:
        cand = table[a]
        mates = cand[free[cand]][:n - 1]
        if len(mates) == n - 1:
            free[mates] = False
            groups.append(np.concatenate([[a], mates]))
        else:
            free[a] = True
    kept = np.array(groups[:wanted], np.int64).reshape(-1, n)
    for g in groups[wanted:]:
        free[g] = True
    return kept, order[free[order]]




def mate_cosines(index: np.ndarray, cosine: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(G, n - 1): each mate's cosine to its anchor, read off the anchor's row of the table."""
    rows = np.asarray(index[groups[:, 0]])
    hit = rows[:, :, None] == groups[:, None, 1:]  # (G, K, n - 1)
    return (np.asarray(cosine[groups[:, 0]], np.float32)[:, :, None] * hit).sum(1)


class NeighbourBatches:
    """Batch number b of the run, per process, under ``--grouping neighbours``: a pure
    function of b, the seed and the number of processes, read from the latent cache.

    Epoch e's groups are ``epoch_groups`` of the table, seeded by (seed, e) alone, the
    same in every process. ``composition`` "mixed": a global batch (the micro-batch times
    the processes) holds its even share of the epoch's groups and single images, split
    between the processes in whole groups; the global batch, not the split, is what the
    seed fixes. "separate" (the authors'): each micro-batch is all groups or all single
    images, the epoch's micro-batches in a seeded order dealt to the processes in turn.
    An epoch is N // (micro-batch x processes) steps ("mixed") or (N // micro-batch) //
    processes ("separate"), the same every epoch, so a resumed run computes only the
    epoch it resumes in."""

    def __init__(self, info: dict, recipe, data, *, batch_size: int, seed: int, num_classes: int, rank: int = 0,
                 world: int = 1, flip: bool = True, label_dropout: float = 0.1, k: int = DEFAULT_K,
                 composition: str = "mixed", table: tuple | None = None):
        from groupdiff_cli.data.loader import batch_maker, pair_similarity

        self.index, self.cosine = table if table is not None else read_table(info, k)
        if recipe.mode != "none" and batch_size % recipe.size:
            raise ValueError(f"per-process batch of {batch_size} images is not a multiple of --group-size "
                             f"{recipe.size}")
        self.data, self.recipe, self.composition = data, recipe, composition
        self.b, self.seed, self.rank, self.world = batch_size, seed, rank, world
        size = len(self.index)
        per = size // (batch_size * world) if composition == "mixed" else (size // batch_size) // world
        if per == 0:
            raise ValueError(f"--global-batch-size {batch_size * world} is larger than the {size} images of "
                             f"{info.get('dir', 'the data set')}")
        self.per_epoch = self.per_window = per  # per_window: what the run's progress notes read
        self.maker = batch_maker(info, recipe, seed, rank, num_classes, flip, label_dropout)
        self.similarity = None if data.emb is None else pair_similarity(
            data.emb, recipe.threshold, rng=np.random.default_rng([seed, 0x6e62]))
        self.mates: dict | None = None
        self.last_wait = 0.0
        self._epoch, self._steps = None, []

    def close(self) -> None:
        pass

    def epoch_plan(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """Epoch e's groups (G, n) and single images, as every process computes them."""
        from groupdiff_cli.plumbing.seeds import neighbour_plan_rng

        r, size = self.recipe, len(self.index)
        rng = neighbour_plan_rng(self.seed, e)
        if r.mode == "none" or r.size == 1:
            return np.empty((0, max(r.size, 1)), np.int64), rng.permutation(size)
        return epoch_groups(self.index, r.size, r.ratio if r.mode == "l" else 1.0, rng)

    def _plan(self, e: int) -> None:
        from groupdiff_cli.data.loader import mates_similarity

        groups, singles = self.epoch_plan(e)
        layout_rng = np.random.default_rng([self.seed, e, 0x6c61])  # the batches' layout, apart from the groups
        lay = self._mixed if self.composition == "mixed" else self._separate
        self._steps = lay(groups, singles, layout_rng)
        self.mates = mates_similarity(None, groups, self.data.labels, self.recipe.threshold,
                                      cosines=mate_cosines(self.index, self.cosine, groups) if len(groups) else None)
        self._epoch = e

    def _mixed(self, groups: np.ndarray, singles: np.ndarray, rng) -> list:
        n, b, world, nb = groups.shape[1], self.b, self.world, self.per_epoch
        cap = nb * ((b * world) // n)  # at most a global batch of groups per step
        groups = groups[rng.permutation(len(groups))]
        singles = np.concatenate([singles, groups[cap:].ravel()])
        groups = groups[:cap]
        steps, s_used = [], 0
        for j in range(nb):
            g0, g1 = j * len(groups) // nb, (j + 1) * len(groups) // nb
            count = g1 - g0
            mine = (g0 + self.rank * count // world, g0 + (self.rank + 1) * count // world)
            before = self.rank * b - (mine[0] - g0) * n  # singles the lower ranks take in this step
            start = s_used + before
            need = b - (mine[1] - mine[0]) * n
            rows = np.concatenate([groups[mine[0]:mine[1]].ravel(), singles[start:start + need]])
            steps.append((rows, [n] * (mine[1] - mine[0]) + [1] * need))
            s_used += world * b - count * n
        return steps

    def _separate(self, groups: np.ndarray, singles: np.ndarray, rng) -> list:
        n, b = groups.shape[1], self.b
        per = b // n
        full = len(groups) // per
        seq = [(groups[i * per:(i + 1) * per].ravel(), [n] * per) for i in range(full)]
        pool = np.concatenate([singles, groups[full * per:].ravel()])
        pool = pool[rng.permutation(len(pool))]
        direct = [(pool[i * b:(i + 1) * b], [1] * b) for i in range(len(pool) // b)]
        plan = seq + direct
        plan = [plan[i] for i in rng.permutation(len(plan))][:self.per_epoch * self.world]
        return plan[self.rank::self.world]

    def batch(self, index: int, device="cpu"):
        e, s = divmod(index, self.per_epoch)
        t0 = time.perf_counter()
        if self._epoch != e:
            self._plan(e)
        self.last_wait = time.perf_counter() - t0
        rows, sizes = self._steps[s]
        return self.maker.make(self.data, np.asarray(rows, np.int64), sizes, self.data.keys, index, device)
