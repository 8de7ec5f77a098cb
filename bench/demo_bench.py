"""Wall time of `groupdiff demo` on this machine: the default run (shipped weights) and
`--from-scratch STEPS` (a model trained here), each in a fresh output folder, as a user
runs them after `make demo`'s install. Prints the seconds and the demo's summary.

    python bench/demo_bench.py [--from-scratch 1500] [--skip-default]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_demo(out: Path, *extra: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "groupdiff_cli", "demo", "--out", str(out), *extra], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0, json.loads((out / "summary.json").read_text())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-scratch", type=int, default=1500)
    ap.add_argument("--skip-default", action="store_true")
    a = ap.parse_args()
    runs = [] if a.skip_default else [("groupdiff demo", [])]
    if a.from_scratch:
        runs.append((f"groupdiff demo --from-scratch {a.from_scratch}", ["--from-scratch", str(a.from_scratch)]))
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, extra) in enumerate(runs):
            seconds, s = timed_demo(Path(tmp) / str(k), *extra)
            g, b, d = s["groupdiff_l"], s["baseline"], s["fid_difference"]["groupdiff_l_vs_baseline"]
            print(f"{name}: {seconds:.0f} s; read as asked {g['read_as_asked']} / {b['read_as_asked']} of "
                  f"{s['samples_per_side']} (GroupDiff-l / baseline); FID {g['fid']:.2f} / {b['fid']:.2f}, "
                  f"difference {d['value']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]", flush=True)


if __name__ == "__main__":
    main()
