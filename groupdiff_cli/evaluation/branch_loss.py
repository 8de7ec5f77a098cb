"""Denoising loss per branch and group size: a cheaper signal than FID for whether
group attention helps.

For a fixed set of held-out images, fixed noise per image and a few fixed times t,
the loss of the network's prediction against the true target (flow: velocity MSE;
DDPM: epsilon MSE on the latent channels) is measured for each branch the sampler
can run: conditional (true labels) or unconditional (the null label), at each group
size N. Images and noise are identical for every N, so the numbers differ only by
how much the group-mates help or hurt. GroupDiff-l trains the (null, N > 1) branch;
if group attention works, that branch's loss falls below (null, N = 1).

Groups: the held-out images are laid out in blocks of the largest N (similar images
together, as in training); a group of size N is a run of N consecutive images, so
smaller groups are sub-blocks of larger ones.
"""

from __future__ import annotations

import numpy as np
import torch

from groupdiff_cli.data.loader import SampleStream, build_groups, pixels_to_tensor, read_window
from groupdiff_cli.plumbing.seeds import Draw, evaluation_generator, evaluation_rng

DEFAULT_TIMES = (0.2, 0.5, 0.8)  # our convention: t = 1 is noise
BRANCHES = ("cond", "null")


def heldout_latents(info: dict, num_images: int, max_group: int, threshold: float = 0.7, seed: int = 0):
    """The first ``num_images`` records of an encoded set (``data.read_dataset``) as
    (latents, labels), laid out in similarity groups of ``max_group`` (by class when the
    shards have no embeddings). Posterior means, no flip: deterministic."""
    num_images = min(num_images, sum(info["shard_counts"]))
    num_images -= num_images % max_group
    if num_images < max_group:
        raise ValueError(f"--eval-data {info['dir']}: need at least {max_group} images for groups of {max_group}")
    data = read_window(SampleStream(info, rank=0, world=1, seed=seed).iterate(0), num_images)[0]
    rule = "similarity" if data.emb is not None else "class"
    groups = build_groups(data.emb, data.labels, num_images // max_group, max_group, rule, threshold,
                          evaluation_rng(seed, Draw.HELDOUT_GROUPS))
    order = np.array([i for g in groups for i in g])
    if info["vae"] == "pixel":
        x = pixels_to_tensor(data.mean[order])
    else:
        x = torch.from_numpy(data.mean[order]).float() * info["vae_scale"]
    return x, torch.from_numpy(data.labels[order])


@torch.no_grad()
def branch_losses(model, objective, x0: torch.Tensor, labels: torch.Tensor, group_sizes=(1, 4),
                  times=DEFAULT_TIMES, seed: int = 0, batch_size: int = 64) -> list[dict]:
    """Rows of dict(t, branch, group_size, loss): the mean per-image denoising MSE.

    x0: (M, C, H, W) held-out latents, M a multiple of every group size; labels (M,).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    m = x0.shape[0]
    gen = evaluation_generator(seed)
    noise = torch.randn(x0.shape, generator=gen)
    ids_seed = int(torch.randint(2**62, (), generator=gen))
    null = torch.full_like(labels, model.num_classes)
    big = max(group_sizes)
    step = max(big, batch_size - batch_size % big)  # whole groups of every size per batch
    rows = []
    for t in times:
        xt, t_net = objective.noisy(x0, torch.full((m,), float(t)), noise)
        for branch in BRANCHES:
            y = labels if branch == "cond" else null
            for n in group_sizes:
                total = 0.0
                for b0 in range(0, m, step):
                    sl = slice(b0, b0 + step)
                    gids = evaluation_generator(ids_seed + b0, device)
                    out = model(xt[sl].to(device), t_net[sl].to(device), y[sl].to(device), group_size=n,
                                generator=gids).float().cpu()
                    total += float(objective.prediction_error(out, x0[sl], noise[sl]).sum())
                rows.append(dict(t=float(t), branch=branch, group_size=int(n), loss=total / m))
    model.train(was_training)
    return rows


def format_rows(rows: list[dict]) -> str:
    """A table: one line per t, one column per (branch, N)."""
    cols = sorted({(r["branch"], r["group_size"]) for r in rows}, key=lambda k: (BRANCHES.index(k[0]), k[1]))
    head = "t     " + " ".join(f"{b + ' N=' + str(n):>12}" for b, n in cols)
    lines = [head]
    for t in sorted({r["t"] for r in rows}):
        vals = {(r["branch"], r["group_size"]): r["loss"] for r in rows if r["t"] == t}
        lines.append(f"{t:<5.2f} " + " ".join(f"{vals[k]:12.4f}" for k in cols))
    return "\n".join(lines)

