"""The neighbour table, the authors' grouping rule over it, the latent cache and the
loader of `train --grouping neighbours`."""

import json
import shutil

import numpy as np
import pytest
import torch

from groupdiff_cli.data import latent_cache, neighbours
from groupdiff_cli.data.loader import GroupRecipe, all_records, read_dataset
from groupdiff_cli.data.neighbours import NeighbourBatches, build_table, epoch_groups, read_table, top_k
from tests.helpers import checkpoint_weights, cli, one_line, train_args, write_dataset


def random_dataset(tmp_path, n=48, shard_size=8, seed=0):
    """Shards of 4 classes whose images have random unit embeddings (no ties but by chance)."""
    return write_dataset(tmp_path / "data", n=n, shard_size=shard_size, seed=seed, random_emb=True)


def brute_force(emb: np.ndarray, k: int) -> np.ndarray:
    sims = emb.astype(np.float64) @ emb.T.astype(np.float64)
    out = []
    for i in range(len(emb)):
        others = [j for j in range(len(emb)) if j != i]
        out.append(sorted(others, key=lambda j: (-np.float32(sims[i, j]), j))[:k])
    return np.array(out)


def test_top_k_equals_brute_force_and_breaks_ties_by_the_lower_index():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[[5, 9, 17, 30]] = emb[2]  # exact duplicates: ties everywhere around image 2
    idx, vals = top_k(torch.from_numpy(emb[:20]), torch.from_numpy(emb), 0, 6)
    want = brute_force(emb, 6)[:20]
    assert (idx == want).all()
    assert list(idx[2][:4]) == [5, 9, 17, 30] and list(idx[5][:4]) == [2, 9, 17, 30]
    assert (np.diff(vals, axis=1) <= 1e-7).all()  # most similar first


def test_the_table_built_in_blocks_equals_brute_force_and_resumes(tmp_path):
    d = random_dataset(tmp_path)
    info = read_dataset(d)
    emb = neighbours.read_embeddings(info, all_records(info))
    build_table(d, info, all_records(info), k=5, block=7, log=lambda m: None)
    index, cosine = read_table(info)
    assert index.shape == (48, 5) and (np.asarray(index) == brute_force(emb, 5)).all()
    np.testing.assert_allclose(np.asarray(cosine, np.float32),
                               np.take_along_axis(emb @ emb.T, np.asarray(index, np.int64), 1), atol=1e-3)
    # a build stopped after two of its blocks resumes and writes the same table
    first = (d / "neighbours" / "index.npy").read_bytes()
    shutil.rmtree(d / "neighbours")
    calls = []
    real = neighbours.top_k

    def stop_after_two(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    neighbours.top_k = stop_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            build_table(d, info, all_records(info), k=5, block=7, log=lambda m: None)
    finally:
        neighbours.top_k = real
    assert not (d / "neighbours" / "neighbours.json").exists()
    said = []
    build_table(d, info, all_records(info), k=5, block=7, log=said.append)
    assert any("resuming the neighbour table at 2 of 7 blocks" in s for s in said)
    assert (d / "neighbours" / "index.npy").read_bytes() == first


def test_the_authors_rule_on_a_hand_checked_table():
    """Six images, groups of 2, ratio 2/3 (2 groups wanted, 3 anchors)."""
    table = np.array([[1, 2, 3], [0, 2, 3], [3, 0, 1], [2, 1, 0], [5, 0, 1], [4, 3, 2]])

    class Fixed:
        def permutation(self, n):
            return np.array([0, 2, 1, 3, 4, 5])  # anchors 0, 2, 1; free pool 3, 4, 5

    groups, singles = epoch_groups(table, 2, 2 / 3, Fixed())
    # 0: its neighbours 1 (an anchor), 2 (an anchor), 3 (free) -> [0, 3]
    # 2: 3 (taken), 0 (taken), 1 (an anchor, not free) -> too few: 2 joins the pool
    # 1: 0 (taken), 2 (now free) -> [1, 2]
    assert groups.tolist() == [[0, 3], [1, 2]]
    assert sorted(singles.tolist()) == [4, 5]


def test_every_image_is_used_once_per_epoch_and_groups_are_near(tmp_path):
    d = random_dataset(tmp_path, n=64)
    info = read_dataset(d)
    build_table(d, info, all_records(info), k=8, log=lambda m: None)
    data = latent_cache.open_cache(info, lambda: all_records(info), log=lambda m: None)
    for composition in ("mixed", "separate"):
        recipe = GroupRecipe("l", 4, 0.5, "neighbours", 0.7)
        for world in (1, 2):
            seen = []
            for rank in range(world):
                nb = NeighbourBatches(info, recipe, data, batch_size=8, seed=3, num_classes=4, rank=rank, world=world,
                                      k=8, composition=composition)
                for s in range(nb.per_epoch):
                    b = nb.batch(s)
                    seen += b.keys
                    if composition == "separate":  # each process's batch all groups or all single
                        assert len(set(b.group_sizes)) == 1
            assert len(seen) == len(set(seen))  # no image twice in an epoch
            assert len(seen) >= 64 - 8 * world
    groups, _ = nb.epoch_plan(0)
    index, _ = read_table(info)
    assert len(groups) == int(64 * 0.5 / 4)
    for g in groups:  # mates are the anchor's neighbours
        assert set(g[1:].tolist()) <= set(np.asarray(index[g[0]]).tolist())


def test_mixed_batches_do_not_depend_on_the_number_of_processes(tmp_path):
    d = random_dataset(tmp_path, n=64)
    info = read_dataset(d)
    build_table(d, info, all_records(info), k=8, log=lambda m: None)
    data = latent_cache.open_cache(info, lambda: all_records(info), log=lambda m: None)
    recipe = GroupRecipe("l", 4, 0.5, "neighbours", 0.7)
    one = NeighbourBatches(info, recipe, data, batch_size=16, seed=1, num_classes=4, k=8)
    two = [NeighbourBatches(info, recipe, data, batch_size=8, seed=1, num_classes=4, rank=r, world=2, k=8)
           for r in range(2)]
    for step in range(one.per_epoch * 2):  # two epochs
        whole = one.batch(step)
        parts = [nb.batch(step) for nb in two]
        assert sorted(whole.keys) == sorted(parts[0].keys + parts[1].keys)
        grouped = {k for b in (whole,) for k, n in zip(b.keys, np.repeat(b.group_sizes, b.group_sizes)) if n > 1}
        assert grouped == {k for b in parts for k, n in zip(b.keys, np.repeat(b.group_sizes, b.group_sizes)) if n > 1}


def test_a_stale_or_damaged_table_is_refused_and_a_damaged_cache_rebuilt(tmp_path):
    d = random_dataset(tmp_path)
    info = read_dataset(d)
    one_line(cli(*train_args(d, tmp_path / "runs", "--grouping", "neighbours", "--max-steps", "1")), 2,
             "has no neighbour table", f"groupdiff neighbours {d}")
    assert cli("neighbours", d, "--k", "6", "--cpu").exit_code == 0
    raw = bytearray((d / "neighbours" / "index.npy").read_bytes())
    raw[-3] ^= 0x01
    (d / "neighbours" / "index.npy").write_bytes(bytes(raw))
    one_line(cli(*train_args(d, tmp_path / "runs", "--grouping", "neighbours", "--max-steps", "1")), 2,
             "index.npy is missing or damaged")
    assert cli("neighbours", d, "--k", "6", "--cpu").exit_code == 0  # a damaged table is built again
    record = json.loads((d / "neighbours" / "neighbours.json").read_text())
    record["shards_fingerprint"] = "0" * 64  # as if built from other shards
    (d / "neighbours" / "neighbours.json").write_text(json.dumps(record))
    one_line(cli(*train_args(d, tmp_path / "runs", "--grouping", "neighbours", "--max-steps", "1")), 2,
             "built from other shards")
    # the cache: damaged, then rebuilt with a note
    record["shards_fingerprint"] = neighbours.shards_fingerprint(info)
    (d / "neighbours" / "neighbours.json").write_text(json.dumps(record))
    said = []
    data = latent_cache.open_cache(info, lambda: all_records(info), log=said.append)
    want = np.array(data.mean)
    raw = bytearray((d / "cache" / "mean.npy").read_bytes())
    raw[-1] ^= 0x10
    (d / "cache" / "mean.npy").write_bytes(bytes(raw))
    again = latent_cache.open_cache(info, lambda: all_records(info), log=said.append)
    assert any("damaged (mean.npy" in s for s in said)
    assert np.array_equal(np.array(again.mean), want)


def test_train_with_neighbour_groups_resumes_exactly_and_logs_the_mates(tmp_path):
    d = random_dataset(tmp_path, n=64)
    assert cli("neighbours", d, "--k", "8", "--cpu").exit_code == 0
    extra = ("--grouping", "neighbours", "--neighbours-k", "8", "--group-ratio", "0.5")
    full = cli(*train_args(d, tmp_path / "a", "--max-steps", "6", *extra))
    assert full.exit_code == 0, full.output
    half = cli(*train_args(d, tmp_path / "b", "--max-steps", "4", *extra))
    assert half.exit_code == 0, half.output
    rest = cli(*train_args(d, tmp_path / "b", "--max-steps", "6", "--resume", *extra))
    assert rest.exit_code == 0, rest.output
    a, b = (checkpoint_weights(tmp_path / r / "SiT-Ti-2-l4", 6) for r in ("a", "b"))
    for x, y in zip(a[:2], b[:2]):
        assert all(torch.equal(x[k], y[k]) for k in x)
    rows = [json.loads(line) for line in (tmp_path / "a" / "SiT-Ti-2-l4" / "metrics.jsonl").read_text().splitlines()]
    mates = rows[-1]["mates_similarity"]
    assert set(mates) == {"mean", "p10", "all_pass", "same_class"} and mates["mean"] > rows[-1]["similarity"]["median"]
