"""The paper's cross-sample attention score (method.md §6), measured while sampling.

For image i of a group and each other image j, P(i->j) is the attention mass from
i's query tokens onto j's key tokens, averaged over i's queries and the heads.
S_cross(i) = (max_j P(i->j) - mean_j P(i->j)) / max_j P(i->j), over j != i, in percent:
how much more image i draws on its most similar group-mate than on the average one.
It is 0 for N = 2 by construction.

Measurement recomputes the attention probabilities from each block's q and k in
chunks of queries, so the (N*L)^2 matrix is never held for all heads at once; the
model's normal SDPA path is untouched (a probe is a plain attribute, None by default).
Every group that runs at a size above 1 is measured: the unconditional branch of a
GroupDiff-l model, both branches of a GroupDiff-f one.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from groupdiff_cli.data.vae import decode, load_vae
from groupdiff_cli.jobs.sampling import Guidance, build_job, grid_image, job_objective, sample_groups
from groupdiff_cli.plumbing.defaults import CFG_SCALE
from groupdiff_cli.plumbing.distributed import process_state
from groupdiff_cli.plumbing.files import atomic_path, write_json_atomic
from groupdiff_cli.science.samplers import evaluations


@torch.no_grad()
def cross_sample_mass(q: torch.Tensor, k: torch.Tensor, n: int, chunk: int = 256) -> torch.Tensor:
    """q, k: (B, heads, N*L, d) of B groups of n images -> P: (B, n, n), float64, where
    P[b, i, j] is the mass image i's queries put on image j's keys (rows sum to 1)."""
    b, h, s, d = q.shape
    length = s // n
    out = torch.zeros(b, n, n, dtype=torch.float64, device=q.device)
    kt = k.transpose(-1, -2)
    for start in range(0, s, chunk):
        qc = q[:, :, start:start + chunk]
        probs = torch.softmax((qc @ kt).float() * d**-0.5, dim=-1)  # (B, heads, C, N*L)
        per_image = probs.view(b, h, qc.shape[2], n, length).sum(-1).sum(1)  # (B, C, n): summed over heads
        source = torch.arange(start, start + qc.shape[2], device=q.device) // length
        out.index_add_(1, source, per_image.double())
    return out / (h * length)


def s_cross(p: torch.Tensor) -> torch.Tensor:
    """P (..., n, n) -> S_cross per image (..., n), in percent."""
    n = p.shape[-1]
    off = ~torch.eye(n, dtype=torch.bool, device=p.device)
    cross = p[..., off].view(*p.shape[:-1], n - 1)
    mx = cross.max(-1).values
    return 100 * (mx - cross.mean(-1)) / mx


@contextlib.contextmanager
def probes(model, record):
    """Call ``record(block_index, n, P)`` for every group run above size 1 in every
    block while the context is active and ``record.active`` is true, and
    ``record.next_evaluation()`` before each call of the model (a ``Recorder``)."""
    blocks = list(model.blocks)
    counter = model.register_forward_pre_hook(lambda _module, _args: record.next_evaluation())

    def make(i):
        def probe(q, k, n):
            if getattr(record, "active", True):
                record(i, n, cross_sample_mass(q, k, n))
        return probe

    for i, blk in enumerate(blocks):
        blk.attn.probe = make(i)
    try:
        yield
    finally:
        for blk in blocks:
            blk.attn.probe = None
        counter.remove()


class Recorder:
    """Collects P per (network evaluation, block) for the evaluations in ``at``."""

    def __init__(self, at: set[int]):
        self.at, self.evaluation, self.active = at, -1, False
        self.p = defaultdict(list)  # (evaluation, block) -> list of (B, n, n)

    def next_evaluation(self):
        self.evaluation += 1
        self.active = self.evaluation in self.at

    def __call__(self, block, n, p):
        self.p[self.evaluation, block].append(p.cpu())


def default_steps(total: int, count: int = 8) -> list[int]:
    """A spread of network evaluations over the trajectory (first to last)."""
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)}) if total > 1 else [0]


def measure(model, objective, group_size: int, num_groups: int, guidance, seed: int, sampler: str, steps: int,
            at_steps: list[int] | None, batch_groups: int, device="cpu", num_classes: int | None = None):
    """Sample ``num_groups`` class-balanced groups and measure P at the chosen steps.

    Returns (per-(evaluation, block) stacked P of every measured group, latents of the
    first group, the evaluations measured)."""
    at = set(at_steps if at_steps is not None else default_steps(evaluations(sampler, steps)))
    num_classes = num_classes or model.num_classes
    labels_all = [g % num_classes for g in range(num_groups)]
    collected = defaultdict(list)
    first = None
    for g0 in range(0, num_groups, batch_groups):
        g1 = min(g0 + batch_groups, num_groups)
        rec = Recorder(at)
        labels = torch.tensor(labels_all[g0:g1]).repeat_interleave(group_size)
        with probes(model, rec):
            z = sample_groups(model, objective, labels, g0 * group_size, group_size, guidance, seed, sampler,
                              steps, device)
        if first is None:
            first = z[:group_size]
        for key, ps in rec.p.items():
            collected[key].append(torch.cat(ps))
    return {k: torch.cat(v) for k, v in collected.items()}, first, sorted(at)


def summarize(p_by_key: dict) -> dict:
    """S_cross overall, per block and per step, plus self and mean cross mass."""
    if not p_by_key:
        return {}
    per_block, per_step = defaultdict(list), defaultdict(list)
    selfm, crossm, allv = [], [], []
    for (ev, block), p in p_by_key.items():
        n = p.shape[-1]
        s = s_cross(p).mean().item()
        per_block[block].append(s)
        per_step[ev].append(s)
        allv.append(s)
        diag = torch.diagonal(p, dim1=-2, dim2=-1)
        selfm.append(diag.mean().item())
        crossm.append(((p.sum(-1) - diag) / (n - 1)).mean().item())
    return dict(s_cross=float(np.mean(allv)), self_mass=float(np.mean(selfm)), cross_mass=float(np.mean(crossm)),
                s_cross_per_block={int(b): float(np.mean(v)) for b, v in sorted(per_block.items())},
                s_cross_per_step={int(e): float(np.mean(v)) for e, v in sorted(per_step.items())})


def plot(report: dict, examples: dict, out: Path) -> list[str]:
    """S_cross against block and against step per group size; for each group size the
    example group's P matrix next to its images. Returns the files written."""
    # lazy: matplotlib adds ~1 s to start-up and only the figures need it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for key, xlabel, name in (("s_cross_per_block", "block", "s_cross_vs_block.png"),
                              ("s_cross_per_step", "network evaluation (0 = pure noise)", "s_cross_vs_step.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for n, r in report["group_sizes"].items():
            if r:
                xs = list(r[key])
                ax.plot([int(x) for x in xs], [r[key][x] for x in xs], marker="o", label=f"N = {n}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("S_cross (%)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        files.append(str(out / name))
    for n, (matrix, images) in examples.items():
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.5))
        im = a1.imshow(matrix, cmap="viridis")
        a1.set_title(f"P(i -> j), N = {n} (rows: image i)")
        a1.set_xlabel("j")
        a1.set_ylabel("i")
        fig.colorbar(im, ax=a1)
        a2.imshow(grid_image(images))
        a2.set_title("the group (row-major: image 0, 1, ...)")
        a2.axis("off")
        fig.tight_layout()
        path = out / f"example_group_N{n}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        files.append(str(path))
    return files


def run_attention(ckpt, group_sizes: list[int], num_groups: int, out_dir=None, *, cfg_scale=CFG_SCALE,
                  guidance_interval=(0.0, 1.0), sampler=None, steps=None, at_steps=None, seed=0, batch_size=64,
                  vae=None, weights="ema", model_name=None, cpu=False, loaded=None) -> dict:
    """The `groupdiff attention` job: measure, summarise, draw; returns the report. ``loaded``:
    the checkpoint as ``load_model`` returned it, when the caller has it already."""
    state = process_state(cpu)
    report = dict(ckpt=str(ckpt), group_sizes={}, num_groups=num_groups, seed=seed)
    examples = {}
    for n in group_sizes:
        if n < 2:
            raise ValueError(f"--group-size {n}: S_cross needs groups of at least 2 images")
        job, model = build_job(ckpt, group_size=n, class_labels=[0], cfg_scale=cfg_scale,
                               guidance_interval=guidance_interval, sampler=sampler,
                               steps=steps, seed=seed, vae=vae, weights=weights, model_name=model_name,
                               loaded=loaded, warn=lambda m: None)
        if job.cfg_scale == 1.0 and job.cond_group_size == 1:
            raise ValueError("--cfg-scale 1 with a GroupDiff-l checkpoint runs no group attention: nothing to "
                             "measure; use a guidance scale above 1")
        evals = evaluations(job.sampler, job.steps)
        if evals is None:
            raise ValueError(f"--sampler {job.sampler} chooses its steps as it goes, so there are no evaluations to "
                             f"measure at; measure S_cross with a fixed-step sampler")
        model = model.to(state.device)
        objective = job_objective(job, model)
        guidance = Guidance.of_job(job)
        bad = [s for s in (at_steps or []) if not 0 <= s < evals]
        if bad:
            raise ValueError(f"--at-steps {bad[0]} is outside [0, {evals - 1}] (network evaluations of this sampler)")
        p, first, measured = measure(model, objective, n, num_groups, guidance, seed, job.sampler, job.steps,
                                     at_steps, max(1, batch_size // n), state.device)
        report["group_sizes"][n] = dict(summarize(p), evaluations_measured=measured, sampler=job.sampler,
                                        steps=job.steps, cfg_scale=job.cfg_scale)
        if p:
            matrix = np.mean([p[(measured[0], b)][0].numpy() for b in range(len(model.blocks))
                              if (measured[0], b) in p], axis=0)
            report["group_sizes"][n]["example_matrix"] = matrix.tolist()
            images = decode(load_vae(job.vae, state.device), first.to(state.device), job.vae_scale).numpy()
            examples[n] = (matrix, images)
    if out_dir is not None and state.is_main_process:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report["figures"] = plot(report, examples, out)
        write_json_atomic(report, out / "attention.json")
    return report


def format_table(report: dict) -> str:
    rows = [("N", "S_cross %", "self mass", "mean cross mass", "evaluations")]
    for n, r in report["group_sizes"].items():
        rows.append((str(n), f"{r['s_cross']:.2f}", f"{r['self_mass']:.4f}", f"{r['cross_mass']:.4f}",
                     ",".join(map(str, r["evaluations_measured"]))))
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(x) for v, x in zip(row, w)).rstrip() for row in rows)
