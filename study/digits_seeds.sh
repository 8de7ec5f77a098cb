#!/usr/bin/env bash
# The 8x8 digits' comparison of GroupDiff-l with its baseline, beyond one training run a
# side (study/README.md, "Training seeds, group sizes and training length"):
#   seeds   the demo's two recipes (--preset digits-l4, class groups of 4, and the same with
#           --group-mode none) trained from seeds 1 and 2 besides the shipped seed 0;
#   neighbours  GroupDiff-l with the authors' groups (--grouping neighbours: each anchor with
#           its nearest neighbours over the whole set, by the FID Inception's pool features of
#           the digits at 96 px) from seeds 0, 1 and 2, against the baseline of the same seed;
#           and the mean cosine of group mates under class, window-similarity and neighbour
#           groups (one training step each, read off metrics.jsonl);
#   sizes   GroupDiff-l trained with class groups of 2 and 8 and sampled at its own size;
#   long    GroupDiff-l and the baseline, seed 0, trained on to 4,000 steps.
# Each pair is then sampled as the authors sample (the study's setting: uncond. groups of
# the training size, CFG 2 for 0.25 <= t <= 0.75, Heun 10, 640 a side, image i from the
# same seed and label everywhere) and FID(GroupDiff-l) - FID(baseline) measured paired.
# Every step resumes: training with --resume, a study whose folder is complete is skipped.
# On 2 CPU cores: ~12 (GroupDiff-l) and ~7 (baseline) minutes per 1,500 steps when nothing
# else runs, ~4 minutes per study.
#
#   bash study/digits_seeds.sh [seeds|neighbours|sizes|long|all]   (OUT=digits-seeds by default)
set -euo pipefail
WHAT=${1:-all}
OUT=${OUT:-digits-seeds}
P=$(python -c "import groupdiff_cli, pathlib; print(pathlib.Path(groupdiff_cli.__file__).parent / 'pretrained')")
mkdir -p "$OUT" && cd "$OUT"
# the encoded digits and the FID reference (all 1,797 real digits), as the demo writes them
[ -f demo-out/digits_rgb.npz ] || groupdiff demo --out demo-out >/dev/null
T=(--data demo-out/data --preset digits-l4 --group-buffer 1797 --ckpt-every 500 --keep-every 500 --cpu
   --results-dir runs)
S=(--ref demo-out/digits_rgb.npz --num-samples 640 --align-labels 16 --cfg-scale 2 --attention-groups 0
   --bootstrap 200 --guidance-interval 0.25,0.75 --sampler heun --steps 10 --cpu)

train() {  # NAME STEPS [options...]: trains, or continues, runs/NAME to STEPS
  local name=$1 steps=$2; shift 2
  local resume=(); [ -d "runs/$name/checkpoints" ] && resume=(--resume)
  groupdiff train "${T[@]}" --run-name "$name" --max-steps "$steps" "${resume[@]}" "$@"
}
ck() { printf 'runs/%s/checkpoints/step_%07d' "$1" "$2"; }
study() {  # OUT CKPT BASELINE N
  [ -f "study/$1/study.csv" ] || groupdiff study --ckpt "$2" --baseline "$3" --out "study/$1" --group-sizes "$4" "${S[@]}"
}

if [[ $WHAT == seeds || $WHAT == all ]]; then
  for seed in 1 2; do
    train "l4-s$seed" 1500 --seed "$seed"
    train "base-s$seed" 1500 --seed "$seed" --group-mode none
    study "l4-s$seed" "$(ck l4-s$seed 1500)" "$(ck base-s$seed 1500)" 4
  done
  study l4-s0 "$P/digits-sit-mi1-l4" "$P/digits-sit-mi1-base" 4
fi
if [[ $WHAT == neighbours || $WHAT == all ]]; then
  # the same digits, latents unchanged, with retrieval embeddings, and their neighbour table
  [ -f data-inception/dataset.json ] || groupdiff encode demo-out/digits data-inception --image-size 8 --vae pixel \
    --no-flip --embedder inception --embedder-size 96 --shard-size 1000 --num-workers 0 --cpu
  groupdiff neighbours data-inception --k 100 --cpu
  for g in class similarity neighbours; do
    [ -f "runs/cos-$g/metrics.jsonl" ] || groupdiff train "${T[@]}" --data data-inception --run-name "cos-$g" \
      --max-steps 1 --ckpt-every 1 --grouping "$g" >/dev/null
  done
  for seed in 0 1 2; do
    train "l4nb-s$seed" 1500 --seed "$seed" --data data-inception --grouping neighbours
    base=$(ck base-s$seed 1500); [ $seed == 0 ] && base=$P/digits-sit-mi1-base
    [ -d "$base" ] || train "base-s$seed" 1500 --seed "$seed" --group-mode none
    study "l4nb-s$seed" "$(ck l4nb-s$seed 1500)" "$base" 4
  done
fi
if [[ $WHAT == sizes || $WHAT == all ]]; then
  for n in 2 8; do
    train "l$n-s0" 1500 --group-size "$n"
    study "l$n-s0" "$(ck l$n-s0 1500)" "$P/digits-sit-mi1-base" "$n"
  done
fi
if [[ $WHAT == long || $WHAT == all ]]; then
  train l4-s0 4000
  train base-s0 4000 --group-mode none
  study l4-s0-4000 "$(ck l4-s0 4000)" "$(ck base-s0 4000)" 4
fi
python - <<'PY'
import csv, json, pathlib
for f in sorted(pathlib.Path("runs").glob("cos-*/metrics.jsonl")):
    rows = [json.loads(line) for line in open(f)]
    print(f.parent.name, next((r["mates_similarity"] for r in rows if r.get("mates_similarity")), None))
for f in sorted(pathlib.Path("study").glob("*/study.csv")):
    for row in csv.DictReader(open(f)):
        print(f.parent.name, {k: row[k] for k in row if k.startswith(("group", "fid"))})
PY
