"""The two figures and the table of the small-scale reproduction (study/README.md).

Reads the `groupdiff study` outputs of each run (STUDY_DIR/NAME/study.csv: FID with its
bootstrap interval, precision/recall, S_cross, merged with any further studies of the same
run in STUDY_DIR/NAME_*/, e.g. one per extra group size) and, when present, a second study
of the same run that measured S_cross only (--scross), plus the run's held-out loss
(eval.jsonl at --step). Where the studies have paired differences (fid_diff: FID(N) -
FID(1) from the same seeds), a third figure shows them with their paired intervals. Where
`fid --paired-with` wrote each run's difference from the baseline one by one
(STUDY_DIR/cross_NAME_N<n>.json, as study/gpu_study.sh does), a fourth figure shows them.

    python study/reproduction_plot.py --study STUDY_DIR --scross SCROSS_DIR --runs RUNS_DIR \
        --out bench/ [--names base,l_sim,l_rand,f_sim] [--step 1000] [--suffix _4000]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

LABELS = {"base": "baseline (no groups)", "l_sim": "GroupDiff-l-4, similarity groups",
          "l_rand": "GroupDiff-l-4, random groups", "f_sim": "GroupDiff-f-4, similarity groups"}


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in r.items()} for r in csv.DictReader(f)]


def heldout(run: Path, step: int) -> dict:
    """Held-out null-branch loss per group size at t = 0.5 from eval.jsonl at ``step``."""
    path = run / "eval.jsonl"
    if not path.exists():
        return {}
    for row in map(json.loads, path.read_text().splitlines()):
        if row.get("step") == step:
            return {int(r["group_size"]): r["loss"] for r in row["rows"] if r["branch"] == "null" and r["t"] == 0.5}
    return {}


def save_figure(fig, ax, sizes: list[int], ylabel: str, path: Path) -> None:
    """Group size on a log2 axis, labels, legend; written and closed."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("group size N at sampling")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_differences(pts: dict, header: str, title: str, sizes: list[int], ylabel: str, path: Path) -> None:
    """Paired differences per run, {name: [(N, value, lo, hi), ...]}: printed, and drawn
    with their intervals (run i in colour i, as in the FID figure)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhline(0, color="k", linewidth=0.8)
    print(header)
    for i, (name, rows) in enumerate(pts.items()):
        if rows:
            ns, d, lo, hi = zip(*rows)
            ax.errorbar([n * (1 + 0.04 * (i - 1.5)) for n in ns], d,
                        yerr=[[a - b for a, b in zip(d, lo)], [b - a for a, b in zip(d, hi)]],
                        marker="o", capsize=3, color=f"C{i}", label=LABELS.get(name, name))
            print(f"  {name}: " + ", ".join(f"N={n}: {v:+.2f} [{a:+.2f}, {b:+.2f}]" for n, v, a, b in rows))
    ax.set_title(title, fontsize=9)
    save_figure(fig, ax, sizes, ylabel, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", required=True, type=Path)
    ap.add_argument("--scross", type=Path)
    ap.add_argument("--runs", type=Path)
    ap.add_argument("--step", type=int, default=1000)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--names", default="base,l_sim,l_rand,f_sim")
    ap.add_argument("--suffix", default="", help="appended to the figures' file names")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = args.names.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lines = ["| run | N | FID | 95% interval | precision | recall | S_cross (%) |", "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    scross, paired = {}, {}
    for i, name in enumerate(names):
        rows = [r for d in [args.study / name, *sorted(args.study.glob(f"{name}_*"))] for r in read_csv(d / "study.csv")]
        rows.sort(key=lambda r: r["group_size"])
        extra = read_csv(args.scross / name / "study.csv") if args.scross else []
        sc = {int(r["group_size"]): r["s_cross"] for r in rows + extra if r.get("s_cross") is not None}
        scross[name] = dict(sorted(sc.items()))
        pts = [r for r in rows if r.get("fid") is not None]
        paired[name] = [(int(r["group_size"]), r["fid_diff"], r["fid_diff_lo"], r["fid_diff_hi"])
                        for r in rows if r.get("fid_diff") is not None]
        if pts:
            ns = [int(r["group_size"]) for r in pts]
            fid = [r["fid"] for r in pts]
            lo = [r["fid"] - r["fid_ci_lo"] for r in pts]
            hi = [r["fid_ci_hi"] - r["fid"] for r in pts]
            ax.errorbar([n * (1 + 0.04 * (i - 1.5)) for n in ns], fid, yerr=[lo, hi], marker="o", capsize=3, color=f"C{i}",
                        label=LABELS.get(name, name))
        for r in pts:
            n = int(r["group_size"])
            lines.append(f"| {name} | {n} | {r['fid']:.2f} | {r['fid_ci_lo']:.2f} - {r['fid_ci_hi']:.2f} | "
                         f"{r['precision']:.3f} | {r['recall']:.3f} | "
                         f"{'' if sc.get(n) is None else f'{sc[n]:.2f}'} |")
    ax.set_title(f"step {args.step:,}", fontsize=9)
    save_figure(fig, ax, [1, 2, 4, 8, 16], "FID vs the dataset (bars: 95% bootstrap)",
                args.out / f"reproduction_fid{args.suffix}.png")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (name, sc) in enumerate(scross.items()):
        if sc:  # colour i as in the FID figure
            ax.plot(list(sc), list(sc.values()), marker="s", color=f"C{i}", label=LABELS.get(name, name))
    ax.set_title(f"step {args.step:,}", fontsize=9)
    save_figure(fig, ax, [2, 4, 8, 16], "S_cross (%)", args.out / f"reproduction_scross{args.suffix}.png")

    if any(paired.values()):
        plot_differences(paired, "\nFID(N) - FID(1), paired 95% interval:", f"step {args.step:,}", [2, 4, 8, 16],
                         "FID(N) - FID(1) (bars: paired 95% bootstrap)",
                         args.out / f"reproduction_fid_diff{args.suffix}.png")

    print("\n".join(lines))
    print("\nS_cross (%) per N:")
    for name, sc in scross.items():
        print(f"  {name}: " + ", ".join(f"N={n}: {v:.2f}" for n, v in sc.items()))
    cross = {}  # `fid --paired-with BASELINE/N1 --json study/cross_RUN_N<n>.json`
    for name in names:
        rows = [(int(p.stem.rsplit("_N", 1)[1]), json.loads(p.read_text())["metrics"]["fid_paired"])
                for p in args.study.glob(f"cross_{name}_N*.json")]
        cross[name] = sorted((n, r["difference"], *r["ci95"]) for n, r in rows)
    if any(cross.values()):
        plot_differences(cross, "\nFID(run, N) - FID(baseline, N = 1), paired 95% interval:",
                         f"step {args.step:,}; baseline sampled one by one", [1, 2, 4, 8, 16],
                         "FID(run, N) - FID(baseline, N=1) (bars: paired 95%)",
                         args.out / f"reproduction_fid_vs_base{args.suffix}.png")
    if args.runs:
        print(f"\nheld-out null-branch loss at t = 0.5, step {args.step} (N: loss):")
        for name in names:
            h = heldout(args.runs / name, args.step)
            if h:
                print(f"  {name}: " + ", ".join(f"N={n}: {v:.4f}" for n, v in sorted(h.items())))


if __name__ == "__main__":
    main()
