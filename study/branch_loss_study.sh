#!/usr/bin/env bash
# Why is joint sampling worse than one by one? The per-branch denoising loss over
# training on the bundled shapes (CPU, about 12 minutes per 1,000-step run on 2 cores).
# Results and figures: bench/RESULTS.md, "Why joint sampling is worse".
set -euo pipefail
OUT=${OUT:-branch-study}
mkdir -p "$OUT"
python - "$OUT" "$(cd "$(dirname "$0")" && pwd)" <<'PY'
import sys
sys.path.insert(0, sys.argv[2])
from shapes_dataset import write_dataset
from groupdiff_cli.data.encode import EncodeConfig, encode
out = sys.argv[1]
for name, per_class, seed in (("train", 400, 0), ("heldout", 32, 1)):  # held-out images: another seed
    src = write_dataset(f"{out}/shapes_{name}", per_class, seed=seed)
    encode(src, f"{out}/data_{name}", EncodeConfig(src=str(src), image_size=32, vae="pixel", embedder="none",
                                                    shard_size=1000), cpu=True, log=lambda m: None)
PY
# the demo's recipe, class groups of 4; every 250 steps the held-out loss goes to eval.jsonl
COMMON=(--data "$OUT/data_train" --model SiT-Mi/4 --results-dir "$OUT/runs" --group-size 4 --grouping class
        --global-batch-size 64 --group-buffer 3200 --lr 6e-3 --ema-decay 0.995 --ckpt-every 250 --keep-every 1000
        --log-every 50 --eval-data "$OUT/data_heldout" --max-steps 1000 --cpu)
groupdiff train "${COMMON[@]}" --run-name A_l25 --group-mode l --group-ratio 0.25
groupdiff train "${COMMON[@]}" --run-name B_l25_semb1 --group-mode l --group-ratio 0.25 --sample-embed-std 1.0
groupdiff train "${COMMON[@]}" --run-name C_f --group-mode f
python study/branch_loss_plot.py "$OUT"/runs/*/ --out "$OUT/branch_loss.png"
