"""Plot and tabulate the held-out per-branch denoising loss (`train --eval-data`).

    python study/branch_loss_plot.py RUN [RUN ...] --out branch_loss.png [--t 0.5]

Left: the relative gap (null label, N) / (null label, N = 1) - 1 against training step
for N = 4 (solid) and 16 (dashed), one colour per run; above 0, the grouped branch
denoises worse than the same images one by one. Right: the loss against N at the last
evaluated step. Prints a Markdown table of the last step for every t.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_eval(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines() if x.strip()]


def loss(rows, t, branch, n):
    return next(r["loss"] for r in rows if r["t"] == t and r["branch"] == branch and r["group_size"] == n)


def main():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("branch_loss.png"))
    ap.add_argument("--t", type=float, default=0.5)
    a = ap.parse_args()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    print("| run | step | t | cond N=1 | null N=1 | null N=2 | null N=4 | null N=8 | null N=16 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for k, run in enumerate(a.runs):
        evals = read_eval(run)
        steps = [e["step"] for e in evals]
        for n, style in ((4, "-"), (16, "--")):
            gap = [loss(e["rows"], a.t, "null", n) / loss(e["rows"], a.t, "null", 1) - 1 for e in evals]
            left.plot(steps, gap, style, color=f"C{k}", marker="o", label=f"{run.name} N={n}")
        last = evals[-1]["rows"]
        ns = sorted({r["group_size"] for r in last})
        right.plot(ns, [loss(last, a.t, "null", n) for n in ns], marker="o", color=f"C{k}", label=f"{run.name} null")
        right.plot(ns, [loss(last, a.t, "cond", n) for n in ns], ":", marker="s", color=f"C{k}",
                   label=f"{run.name} cond")
        for t in sorted({r["t"] for r in last}):
            cells = [loss(last, t, "cond", 1)] + [loss(last, t, "null", n) for n in ns]
            print(f"| {run.name} | {evals[-1]['step']} | {t} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    left.axhline(0, color="k", linewidth=0.8)
    left.set_xlabel("training step")
    left.set_ylabel(f"null-label loss at N / at N=1 - 1 (t={a.t})")
    left.legend(fontsize=7)
    right.set_xscale("log", base=2)
    right.set_xlabel("group size N")
    right.set_ylabel(f"held-out loss at t={a.t}, last step")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"figure: {a.out}")


if __name__ == "__main__":
    main()
