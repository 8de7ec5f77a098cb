"""The group-size study (the paper's Table 1 / scaling figure) for one checkpoint.

For each group size N: sample the same images (image i has the stream of (seed, i) and class
(i // max N) mod classes, so every group size sees identical seeds and labels), FID
with a bootstrap interval that resamples whole groups, and S_cross from `attention`.
Because image i is the same seed and label at every N, FID(N) - FID(smallest N) gets a
paired interval (the same resampled images on both sides), far narrower than the two
separate intervals: it is what answers "does FID fall with N". Writes study.csv and
study.png (FID and S_cross against N); each N{n}/ keeps its pool features, so a rerun
(e.g. with more bootstrap rounds) skips sampling and the Inception network.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from groupdiff_cli.data.loader import read_dataset
from groupdiff_cli.evaluation import fid
from groupdiff_cli.evaluation.branch_loss import branch_losses, format_rows, heldout_latents
from groupdiff_cli.jobs import attention
from groupdiff_cli.jobs.sampling import build_job, run_sampling
from groupdiff_cli.plumbing.defaults import CFG_SCALE, STUDY_GROUP_SIZES
from groupdiff_cli.plumbing.files import atomic_path
from groupdiff_cli.plumbing.layout import (BASELINE_DIR, BRANCH_LOSS_CSV, LABELS_FILE, STUDY_CSV, STUDY_PLOT,
                                           STUDY_REFERENCE, group_size_dir)
from groupdiff_cli.science.checkpoints import check_comparable, load_model
from groupdiff_cli.science.objectives import create, of_run


def label_block(group_sizes, num_samples: int, align_labels: int | None = None) -> int:
    """The block M of the study's label order: image i gets seed i and class (i // M) mod
    classes at every N, so another run's study (or `sample --align-labels`) with the same
    M pairs image by image with this one. Default: the largest group size."""
    block = align_labels or max(group_sizes)
    if align_labels and any(block % n for n in group_sizes):
        raise ValueError(f"--align-labels {block}: every group size must divide it "
                         f"(--group-sizes {','.join(map(str, group_sizes))})")
    if num_samples % block:
        what = "--align-labels" if align_labels else "the largest group size"
        raise ValueError(f"--num-samples {num_samples} is not a multiple of {what} {block}")
    return block


def run_study(ckpt, ref, out_dir, group_sizes=STUDY_GROUP_SIZES, num_samples: int = 1024, *, cfg_scale=CFG_SCALE,
              sampler=None, steps=None, seed=0, batch_size=64, bootstrap=100, attention_groups=16,
              inception_weights=None, vae=None, cpu=False, eval_data=None, align_labels=None,
              guidance_interval=(0.0, 1.0), baseline=None, log=print) -> list[dict]:
    """One row per group size N (the unconditional branch's group size for GroupDiff-l).
    ``baseline``: a second checkpoint sampled one by one on the same seeds and labels
    (OUT/baseline/); each row then also gets FID(N) - FID(baseline) with a paired
    interval (columns fid_vs_base*), the paper's comparison."""
    if bootstrap == 1:
        raise ValueError("--bootstrap 1: use 0 (no interval) or at least 2 resamples")
    block = label_block(group_sizes, num_samples, align_labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    evaluator = None if ref is None else _evaluator(ref, out, inception_weights, cpu)
    loaded = load_model(ckpt)  # once: every group size, the attention figures and the branch losses use it
    # every group size's job, so that a size the checkpoint cannot run is refused before any sampling
    settings = dict(num_samples=num_samples, align_labels=block, cfg_scale=cfg_scale, sampler=sampler, steps=steps,
                    seed=seed, vae=vae, guidance_interval=guidance_interval, warn=log)
    jobs = {n: build_job(ckpt, group_size=n, loaded=loaded, **settings)[0] for n in group_sizes}
    base_job = None
    if baseline is not None:  # checked and resolved before any sampling, as every group size is
        base_loaded = load_model(baseline, flag="--baseline")
        check_comparable(loaded, base_loaded, "--baseline", baseline)
        base_job = build_job(baseline, group_size=1, loaded=base_loaded, **settings)[0]
        run_sampling(base_job, base_loaded[0], out / BASELINE_DIR, batch_size=batch_size, cpu=cpu)
    rows = []
    for n, job in jobs.items():
        run_sampling(job, loaded[0], group_size_dir(out, n), batch_size=batch_size, cpu=cpu)
        row = dict(group_size=n)
        if evaluator is not None:
            # pool features only: a rerun reuses those kept in N{n}/ (no Inception pass)
            m = evaluator.evaluate(group_size_dir(out, n), ("fid", "prc"), bootstrap=bootstrap, bootstrap_block=n, seed=seed,
                                   explicit_metrics=False)[0]["metrics"]
            row.update(fid=m["fid"], **{k: m[k] for k in ("precision", "recall") if k in m})
            if "fid_bootstrap" in m:
                row.update(fid_ci_lo=m["fid_bootstrap"]["ci95"][0], fid_ci_hi=m["fid_bootstrap"]["ci95"][1])
        if n >= 2 and (job.cfg_scale != 1.0 or job.cond_group_size > 1) and attention_groups:
            r = attention.run_attention(ckpt, [n], attention_groups, None, cfg_scale=cfg_scale,
                                        guidance_interval=guidance_interval, sampler=sampler, steps=steps, seed=seed,
                                        batch_size=batch_size, vae=vae, cpu=cpu, loaded=loaded)
            row.update(s_cross=r["group_sizes"][n]["s_cross"])
        else:
            # no cross-image attention (guidance off), or not measured (--attention-groups 0)
            row.update(s_cross=0.0 if n >= 2 and attention_groups else None)
        rows.append(row)
        log(f"N={n}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
    if evaluator is not None and bootstrap:
        add_paired_differences(rows, out, evaluator, bootstrap, seed, log)
        if base_job is not None:
            add_baseline_differences(rows, out, evaluator, bootstrap, seed, log)
    write_study_csv(rows, out / STUDY_CSV)
    plot_study(rows, out / STUDY_PLOT)
    if eval_data:
        write_branch_losses(loaded, eval_data, group_sizes, out, seed, log)
    return rows


def _evaluator(ref, out: Path, inception_weights, cpu: bool) -> fid.Evaluator:
    """The study's evaluator; images given as REF have their statistics kept in
    OUT/reference_stats.npz, which a rerun reads instead."""
    stats = out / STUDY_REFERENCE
    if fid.is_stats_file(Path(ref)):
        return fid.Evaluator(ref, inception_weights, cpu=cpu)
    if stats.exists():
        return fid.Evaluator(stats, inception_weights, cpu=cpu)
    return fid.Evaluator(ref, inception_weights, cpu=cpu, save_ref_stats=stats)


STUDY_FIELDS = ["group_size", "fid", "fid_ci_lo", "fid_ci_hi", "fid_diff", "fid_diff_lo", "fid_diff_hi",
                "fid_vs_base", "fid_vs_base_lo", "fid_vs_base_hi", "precision", "recall", "s_cross"]


def write_study_csv(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=STUDY_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in STUDY_FIELDS})


def add_paired_differences(rows: list[dict], out: Path, evaluator: fid.Evaluator, rounds: int, seed: int = 0,
                           log=print) -> None:
    """Add FID(N) - FID(smallest N) with a paired bootstrap interval (fid_diff,
    fid_diff_lo, fid_diff_hi) to the rows. The resampled blocks hold whole groups of
    every N (the least common multiple of the group sizes), and the same blocks are drawn
    for every N; only group sizes whose images carry the same labels as the smallest
    N's (N{n}/labels.npy) are paired."""
    sizes = [r["group_size"] for r in rows if "fid" in r]
    if len(sizes) < 2:
        return
    base, block = min(sizes), math.lcm(*sizes)
    count = len(np.load(group_size_dir(out, base) / LABELS_FILE))
    if count % block:
        log(f"paired FID differences skipped: {count} samples are not a multiple of {block}, "
            f"the least common multiple of the group sizes")
        return
    for row in rows:
        n = row["group_size"]
        if n == base or n not in sizes:
            continue
        d = _paired(evaluator, group_size_dir(out, n), group_size_dir(out, base), f"N={base}", rounds, block, seed, log)
        if d is not None:
            row.update(fid_diff=d["difference"], fid_diff_lo=d["ci95"][0], fid_diff_hi=d["ci95"][1])
            log(f"N={n}: FID - FID(N={base}) = {d['difference']:+.3f}, paired 95% interval "
                f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] ({rounds} resamples of blocks of {block})")


def add_baseline_differences(rows: list[dict], out: Path, evaluator: fid.Evaluator, rounds: int, seed: int,
                             log=print) -> None:
    """Add FID(N) - FID(baseline) with a paired interval (fid_vs_base*) to the rows: the
    baseline in OUT/baseline/ drew image i from the same seed and label as every N."""
    block = math.lcm(*(r["group_size"] for r in rows))
    log(f"baseline: FID {evaluator.fid(out / 'baseline'):.4g}")
    for row in rows:
        n = row["group_size"]
        d = _paired(evaluator, group_size_dir(out, n), out / BASELINE_DIR, "the baseline", rounds, block, seed, log)
        if d is not None:
            row.update(fid_vs_base=d["difference"], fid_vs_base_lo=d["ci95"][0], fid_vs_base_hi=d["ci95"][1])
            log(f"N={n}: FID - FID(baseline) = {d['difference']:+.3f}, paired 95% interval "
                f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")


def _paired(evaluator: fid.Evaluator, folder: Path, other: Path, other_name: str, rounds: int, block: int,
            seed: int, log) -> dict | None:
    """The paired FID difference of two sample folders, None (with a note) when their labels differ."""
    if not np.array_equal(np.load(folder / LABELS_FILE), np.load(other / LABELS_FILE)):
        log(f"N={folder.name[1:]}: labels differ from {other_name}'s, no paired difference")
        return None
    return evaluator.paired_difference(folder, other, rounds, block, seed)


def write_branch_losses(loaded, eval_data, group_sizes, out: Path, seed: int = 0, log=print) -> list[dict]:
    """The held-out denoising loss per branch and group size (`branch_loss`) of a loaded
    checkpoint's (``load_model``) EMA weights, to OUT/branch_loss.csv."""
    model, info = loaded
    objective = create(of_run(info), model.learn_sigma)
    x0, labels = heldout_latents(read_dataset(eval_data, "--eval-data"), 256, max(group_sizes),
                                 info.get("train", {}).get("similarity_threshold", 0.7), seed)
    rows = branch_losses(model, objective, x0, labels, sorted(group_sizes), seed=seed)
    with atomic_path(out / BRANCH_LOSS_CSV) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["t", "branch", "group_size", "loss"])
        w.writeheader()
        w.writerows(rows)
    log(f"held-out denoising loss ({len(labels)} images, EMA weights):\n{format_rows(rows)}")
    return rows


def plot_study(rows: list[dict], path: Path) -> None:
    # lazy: matplotlib adds ~1 s to start-up and only the figures need it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["group_size"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    if all("fid" in r for r in rows):
        ax.plot(ns, [r["fid"] for r in rows], marker="o", color="C0", label="FID")
        # the bootstrap interval need not contain the full-sample FID (resampling biases FID up)
        ci = [(r["group_size"], r["fid_ci_lo"], r["fid_ci_hi"]) for r in rows if "fid_ci_lo" in r]
        if ci:
            ax.vlines(*zip(*ci), color="C0", alpha=0.5, linewidth=4)
        ax.set_ylabel("FID (bars: 95% bootstrap interval)", color="C0")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("group size N")
    ax2 = ax.twinx()
    pts = [(r["group_size"], r["s_cross"]) for r in rows if r.get("s_cross") is not None]
    if pts:
        ax2.plot(*zip(*pts), marker="s", color="C1", label="S_cross")
    ax2.set_ylabel("S_cross (%)", color="C1")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
