"""The demo's comparison (`groupdiff demo`: every class in groups of 16 next to the same
seeds one by one; digit-classifier reading and FID against the 1,797 real digits, with the
paired interval of the difference) for several checkpoints and guidance scales.

    python study/demo_checks.py CKPT [CKPT ...] --out DIR [--cfg 1.5,2,4] [--groups-per-class 4]

One CSV row per (checkpoint, scale) in DIR/demo_checks.csv; samples and their features
are kept under DIR, so a rerun only adds what is missing.
"""

import argparse
import csv
from pathlib import Path

from groupdiff_cli.checkpoints import checkpoint_step
from groupdiff_cli.demo import compare
from groupdiff_cli.defaults import DEMO_BOOTSTRAP, DEMO_SAMPLE_STEPS

FIELDS = ["step", "cfg", "samples_per_side", "read_jointly", "read_one_by_one", "fid_jointly", "fid_one_by_one",
          "fid_diff", "fid_diff_lo", "fid_diff_hi"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpts", nargs="+", type=Path, help="checkpoint directories (RUN/checkpoints/step_*)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--cfg", default="2")
    ap.add_argument("--groups-per-class", type=int, default=1)
    ap.add_argument("--group-size", type=int, default=16)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for ckpt in a.ckpts:
        for w in (float(x) for x in a.cfg.split(",")):
            where = a.out / f"{ckpt.parent.parent.name}_{ckpt.name}_w{w:g}_g{a.groups_per_class}"
            s = compare(ckpt, where, a.out, a.group_size, a.groups_per_class, w, DEMO_SAMPLE_STEPS, None,
                        DEMO_BOOTSTRAP, print)
            d = s["fid_difference"]
            rows.append(dict(step=checkpoint_step(ckpt), cfg=w, samples_per_side=s["samples_per_side"],
                             read_jointly=s["jointly"]["read_as_asked"], read_one_by_one=s["one_by_one"]["read_as_asked"],
                             fid_jointly=round(s["jointly"]["fid"], 2), fid_one_by_one=round(s["one_by_one"]["fid"], 2),
                             fid_diff=round(d["value"], 2), fid_diff_lo=round(d["ci95"][0], 2),
                             fid_diff_hi=round(d["ci95"][1], 2)))
            print(rows[-1], flush=True)
            with open(a.out / "demo_checks.csv", "w", newline="") as f:
                w_ = csv.DictWriter(f, fieldnames=FIELDS)
                w_.writeheader()
                w_.writerows(rows)


if __name__ == "__main__":
    main()
