#!/usr/bin/env bash
# The small-scale reproduction of the paper's claims (study/README.md): four runs
# on the bundled shapes at equal steps and batch, then the group-size study of each.
# On 2 CPU cores: about 6-8 minutes per 1,000-step run when nothing else runs, and
# ~40 minutes for the evaluation (Inception at ~8 img/s is the bottleneck).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-reproduction}
STEPS=${STEPS:-1000}
mkdir -p "$OUT" && cd "$OUT"
python "$HERE/shapes_dataset.py" shapes_train --per-class 400 --seed 0   # 8 classes x 400
python "$HERE/shapes_dataset.py" shapes_heldout --per-class 32 --seed 1  # held-out images for the per-branch loss
groupdiff encode shapes_train data_train --image-size 32 --vae pixel --embedder inception --embedder-size 96 \
    --shard-size 1000 --cpu
groupdiff encode shapes_heldout data_heldout --image-size 32 --vae pixel --embedder none --shard-size 1000 --cpu
COMMON=(--data data_train --model SiT-Mi/4 --results-dir runs --group-size 4 --global-batch-size 64
        --group-buffer 3200 --lr 6e-3 --ema-decay 0.995 --ckpt-every 500 --keep-every 500 --log-every 50
        --eval-data data_heldout --eval-every 500 --max-steps "$STEPS" --cpu)
groupdiff train "${COMMON[@]}" --run-name l_sim --group-mode l --group-ratio 0.25 --grouping similarity
groupdiff train "${COMMON[@]}" --run-name base --group-mode none
groupdiff train "${COMMON[@]}" --run-name l_rand --group-mode l --group-ratio 0.25 --grouping random
groupdiff train "${COMMON[@]}" --run-name f_sim --group-mode f --grouping similarity

# the FID reference: the 3,200 training images' Inception statistics
python - <<'PY'
import numpy as np
from pathlib import Path
from PIL import Image
files = sorted(p for d in sorted(Path("shapes_train").iterdir()) for p in sorted(d.iterdir()))
np.savez("ref_images.npz", arr_0=np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
PY
groupdiff fid ref_images.npz --save-ref-stats ref_stats.npz
CK=checkpoints/step_$(printf %07d "$STEPS")
S=(--ref ref_stats.npz --num-samples 1024 --cfg-scale 1.5 --sampler heun --steps 10 --bootstrap 30 --batch-size 256 --cpu)
groupdiff study --ckpt runs/l_sim/$CK --out study/l_sim --group-sizes 1,4,16 "${S[@]}"
groupdiff study --ckpt runs/base/$CK --out study/base --group-sizes 1 "${S[@]}"
groupdiff study --ckpt runs/l_rand/$CK --out study/l_rand --group-sizes 1,4 "${S[@]}"
groupdiff study --ckpt runs/f_sim/$CK --out study/f_sim --group-sizes 1,4 "${S[@]}"
# S_cross at every group size (16 samples each: no FID)
for r in l_sim l_rand f_sim; do
  groupdiff study --ckpt runs/$r/$CK --out scross/$r --group-sizes 2,4,8,16 --num-samples 16 --cfg-scale 1.5 \
      --sampler heun --steps 10 --attention-groups 16 --cpu
done
# the guidance scale
groupdiff study --ckpt runs/l_sim/$CK --out study_cfg3/l_sim --group-sizes 1,4 --ref ref_stats.npz \
    --num-samples 1024 --cfg-scale 3.0 --sampler heun --steps 10 --bootstrap 30 --batch-size 256 --cpu
python "$HERE/reproduction_plot.py" --study study --scross scross --runs runs --out .

# all four runs to 4,000 steps, 2,048 samples
LONG=(--data data_train --model SiT-Mi/4 --results-dir runs --group-size 4 --global-batch-size 64
      --group-buffer 3200 --lr 6e-3 --ema-decay 0.995 --ckpt-every 500 --keep-every 500 --log-every 50
      --eval-data data_heldout --eval-every 500 --max-steps 4000 --cpu --resume)
groupdiff train "${LONG[@]}" --run-name l_sim --group-mode l --group-ratio 0.25 --grouping similarity
groupdiff train "${LONG[@]}" --run-name base --group-mode none
groupdiff train "${LONG[@]}" --run-name l_rand --group-mode l --group-ratio 0.25 --grouping random
groupdiff train "${LONG[@]}" --run-name f_sim --group-mode f --grouping similarity
S4=(--ref ref_stats.npz --num-samples 2048 --cfg-scale 1.5 --sampler heun --steps 10 --bootstrap 50 --batch-size 256 --cpu)
CK4=checkpoints/step_0004000
groupdiff study --ckpt runs/l_sim/$CK4 --out study4k/l_sim --group-sizes 1,4,16 "${S4[@]}"
# N = 2 and 8 as studies of their own (each point resumes on its own; the plot merges study4k/l_sim_*)
groupdiff study --ckpt runs/l_sim/$CK4 --out study4k/l_sim_N2 --group-sizes 2 "${S4[@]}"
groupdiff study --ckpt runs/l_sim/$CK4 --out study4k/l_sim_N8 --group-sizes 8 "${S4[@]}"
groupdiff study --ckpt runs/base/$CK4 --out study4k/base --group-sizes 1 "${S4[@]}"
groupdiff study --ckpt runs/l_rand/$CK4 --out study4k/l_rand --group-sizes 1,4 "${S4[@]}"
groupdiff study --ckpt runs/f_sim/$CK4 --out study4k/f_sim --group-sizes 1,4 "${S4[@]}"
python "$HERE/reproduction_plot.py" --study study4k --runs runs --step 4000 --suffix _4000 --out .
# FID over training at 2,000 and 3,000 steps (N = 1, 1,024 samples); its 4,000-step point is the first 1,024 samples of
# study4k/l_sim/N1 (groupdiff fid on an npz of them, --bootstrap 30)
for step in 2000 3000; do
  groupdiff study --ckpt runs/l_sim/checkpoints/step_000$step --out study_$step/l_sim --group-sizes 1,4 \
      --num-samples 1024 --cfg-scale 1.5 --sampler heun --steps 10 --bootstrap 30 --batch-size 256 --cpu --ref ref_stats.npz
done
python - <<'PY'
import numpy as np
for run in ("l_sim", "base"):
    with np.load(f"study4k/{run}/N1/samples.npz") as f:
        np.savez(f"{run}_4000_first1024.npz", arr_0=f["arr_0"][:1024], arr_1=f["arr_1"][:1024])
PY
for run in l_sim base; do groupdiff fid "${run}_4000_first1024.npz" ref_stats.npz --bootstrap 30 --cpu; done
# the guidance scale at 4,000 steps: 256 images (image i: seed i, class i // 32) jointly in 16 groups of 16
# and one by one, FID with whole groups of 16 resampled (through the Python API: build_job +
# run_sampling + fid.evaluate, with the same seeds, labels and settings)
for w in 3 6; do
  for n in 16 1; do
    groupdiff sample --ckpt runs/l_sim/$CK4 --out cfg4k/cfg${w}_N$n --group-size $n --num-samples 256 --align-labels 32 \
        --cfg-scale $w --sampler heun --steps 10 --batch-size 256 --cpu
    groupdiff fid cfg4k/cfg${w}_N$n ref_stats.npz --bootstrap 50 --bootstrap-block 16 --cpu
  done
done

# ---- claim 1: paired differences FID(N) - FID(1) at 4,000 steps ----
# The same seeds and labels at every N; `study` adds a paired bootstrap interval of the
# difference. These reuse the samples above (the folders were copied with `cp -al`, so
# sampling resumes with nothing to do) and sample l_sim at N = 2 and 8 again with l_sim's
# label order (the N2/N8 studies above used their own); the plot's third figure shows them.
mkdir -p paired4k/l_sim paired4k/l_rand paired4k/f_sim
for n in N1 N4 N16; do cp -al study4k/l_sim/$n paired4k/l_sim/$n; done
for r in l_rand f_sim; do for n in N1 N4; do cp -al study4k/$r/$n paired4k/$r/$n; done; done
groupdiff study --ckpt runs/l_sim/$CK4 --out paired4k/l_sim --group-sizes 1,2,4,8,16 "${S4[@]}"
groupdiff study --ckpt runs/l_rand/$CK4 --out paired4k/l_rand --group-sizes 1,4 "${S4[@]}"
groupdiff study --ckpt runs/f_sim/$CK4 --out paired4k/f_sim --group-sizes 1,4 "${S4[@]}"
# the third figure, reproduction_fid_diff_4000.png (its other two outputs are the same as study4k's)
python "$HERE/reproduction_plot.py" --study paired4k --names l_sim,l_rand,f_sim --step 4000 --suffix _4000 --out paired4k

# ---- claim 6: a small real image set, the UCI handwritten digits (scikit-learn's copy) ----
# 1,797 images of 8x8 pixels, 10 classes, enlarged 4x to 32x32 (one /4 patch = one pixel);
# never flipped. Baseline and GroupDiff-l-4 with similarity groups, the shapes recipe, 2,000 steps.
pip install scikit-learn
python "$HERE/digits_dataset.py" digits/images
groupdiff encode digits/images digits/data --image-size 32 --vae pixel --embedder inception --embedder-size 96 \
    --shard-size 1000 --no-flip --cpu
groupdiff fid digits/images --save-ref-stats digits/ref_stats.npz --cpu  # the FID reference: all 1,797 images
DIG=(--data digits/data --preset shapes-l4 --results-dir digits/runs --group-buffer 1797 --no-flip
     --ckpt-every 500 --keep-every 500 --log-every 100 --max-steps 2000 --cpu)
groupdiff train "${DIG[@]}" --run-name base --group-mode none
groupdiff train "${DIG[@]}" --run-name l_sim --grouping similarity
SD=(--ref digits/ref_stats.npz --num-samples 2048 --cfg-scale 1.5 --sampler heun --steps 10 --bootstrap 50 --batch-size 256 --cpu)
groupdiff study --ckpt digits/runs/l_sim/checkpoints/step_0002000 --out digits/study/l_sim --group-sizes 1,4,16 "${SD[@]}"
groupdiff study --ckpt digits/runs/base/checkpoints/step_0002000 --out digits/study/base --group-sizes 1 "${SD[@]}"
python "$HERE/reproduction_plot.py" --study digits/study --names base,l_sim --step 2000 --suffix _digits --out .
python "$HERE/reproduction_samples.py" digits/study/l_sim --class-names 0,1,2,3,4,5,6,7,8,9 --out reproduction_digits_samples.png

# ---- claims 2-4: paired differences between runs (`fid --paired-with`) ----
# The baseline one by one with l_rand's and f_sim's label order (image i: seed i, class (i // 4) mod 8),
# so that image i of base/N1, l_rand/N* and f_sim/N* shares its seed and label; then each run against it.
# (paired4k/l_rand and paired4k/f_sim are the studies above; each N*/ keeps its pool features.)
groupdiff sample --ckpt runs/base/$CK4 --out paired4k/base/N1 --group-size 1 --num-samples 2048 --align-labels 4 \
    --cfg-scale 1.5 --sampler heun --steps 10 --batch-size 256 --cpu
P=(ref_stats.npz --metrics fid --bootstrap 50 --bootstrap-block 4 --cpu)
for s in l_rand/N1 l_rand/N4 f_sim/N1 f_sim/N4; do
  groupdiff fid paired4k/$s "${P[@]}" --paired-with paired4k/base/N1
done

# ---- every run at every N, in one label order (image i: seed i, class (i // 16) mod 8) ----
# l_sim's study above already uses this order; l_rand and f_sim are studied again in it (the
# folders above used (i // 4) mod 8), and the baseline is sampled once in it, so that every run
# at every N pairs with every other (`fid --paired-with`).
mkdir -p paired16
cp -al paired4k/l_sim paired16/l_sim
groupdiff study --ckpt runs/l_rand/$CK4 --out paired16/l_rand --group-sizes 1,2,4,8,16 "${S4[@]}"
groupdiff sample --ckpt runs/base/$CK4 --out paired16/base/N1 --group-size 1 --num-samples 2048 --align-labels 16 \
    --cfg-scale 1.5 --sampler heun --steps 10 --batch-size 256 --cpu
groupdiff fid paired16/base/N1 ref_stats.npz --metrics fid --bootstrap 50 --bootstrap-block 16 --cpu
groupdiff study --ckpt runs/f_sim/$CK4 --out paired16/f_sim --group-sizes 1,2,4,8,16 "${S4[@]}"
P16=(ref_stats.npz --metrics fid --bootstrap 50 --bootstrap-block 16 --cpu)
for r in l_sim l_rand f_sim; do for n in 1 2 4 8 16; do
  groupdiff fid paired16/$r/N$n "${P16[@]}" --paired-with paired16/base/N1 --json paired16/cross_${r}_N$n.json
done; done
# the figures reproduction_*_4000_all.png (the baseline's point: its study above, another label order)
ln -s ../study4k/base paired16/base_s6
python "$HERE/reproduction_plot.py" --study paired16 --names base,l_sim,l_rand,f_sim --step 4000 --suffix _4000_all --out .

# ---- why joint sampling hurts GroupDiff-f (N = 4, paired with f_sim one by one) ----
C=(--ckpt runs/f_sim/$CK4 --num-samples 2048 --align-labels 16 --sampler heun --steps 10 --batch-size 256 --cpu)
groupdiff sample "${C[@]}" --out fdiag/N4_cond1 --group-size 4 --cond-group-size 1 --cfg-scale 1.5
groupdiff sample "${C[@]}" --out fdiag/N4_uncond1 --group-size 4 --uncond-group-size 1 --cfg-scale 1.5
for d in N4_cond1 N4_uncond1; do groupdiff fid fdiag/$d "${P16[@]}" --paired-with paired16/f_sim/N1; done
groupdiff sample "${C[@]}" --out fdiag/N1_cfg1 --group-size 1 --cfg-scale 1.0
groupdiff sample "${C[@]}" --out fdiag/N4_cfg1 --group-size 4 --cfg-scale 1.0
groupdiff fid fdiag/N1_cfg1 "${P16[@]}"
groupdiff fid fdiag/N4_cfg1 "${P16[@]}" --paired-with fdiag/N1_cfg1

# ---- is the cost of joint sampling for GroupDiff-f in the images or in FID's estimate? ----
# (f_sim trained again with the LONG command above, in a fresh folder, then:)
groupdiff study --ckpt runs/f_sim/$CK4 --out st/f_sim --group-sizes 1,4,16 "${S4[@]}" --align-labels 16
groupdiff sample "${C[@]}" --out st/f_sim_c1/N16 --group-size 16 --cond-group-size 1 --cfg-scale 1.5
groupdiff fid st/f_sim_c1/N16 "${P16[@]}" --paired-with st/f_sim/N1
ln -sfn ../f_sim/N1 st/f_sim_c1/N1
groupdiff study --ckpt runs/l_sim/$CK4 --out st/l_sim \
    --group-sizes 1,16 "${S4[@]}" --align-labels 16
for s in f_sim f_sim_c1 l_sim; do
  python "$HERE/group_correlation.py" st/$s ref_stats.npz --bootstrap 30 --repeats 4 --ref-images ref_images.npz
done
python "$HERE/group_pull.py" runs/f_sim/$CK4 data_heldout
python "$HERE/group_pull.py" runs/l_sim/$CK4 data_heldout
for step in 1000 2000 3000; do  # the pull over training
  python "$HERE/group_pull.py" runs/f_sim/checkpoints/step_000$step data_heldout --times 0.5,0.8
done

# ---- why grouped predictions are pulled ----
# the held-out shapes again, with embeddings, so that group_pull.py lays them out in similarity groups
groupdiff encode shapes_heldout data_heldout_emb --image-size 32 --vae pixel --embedder inception --embedder-size 96 \
    --shard-size 1000 --cpu
for d in data_heldout data_heldout_emb; do  # class groups (as sampled), similarity groups (as trained)
  python "$HERE/group_pull.py" runs/f_sim/$CK4 $d --group-sizes 1,4 --times 0.5,0.8
  python "$HERE/group_pull.py" runs/f_sim/$CK4 $d --group-sizes 1,16 --times 0.8
  python "$HERE/group_pull.py" runs/l_sim/$CK4 \
      $d --group-sizes 1,4,16 --times 0.8
done
# GroupDiff-f trained with class groups, the groups sampling forms (LONG without its final --resume: new runs)
FRESH=("${LONG[@]:0:${#LONG[@]}-1}")
groupdiff train "${FRESH[@]}" --run-name f_class --group-mode f --grouping class
groupdiff study --ckpt runs/f_class/$CK4 --out st/f_class --group-sizes 1,4,16 "${S4[@]}" --align-labels 16
# GroupDiff-l with random groups, trained again (in the fresh folder above, where runs/l_rand did not exist):
# its grouped branch's pull and its study
groupdiff train "${FRESH[@]}" --run-name l_rand --group-mode l --group-ratio 0.25 --grouping random
for d in data_heldout data_heldout_emb; do
  python "$HERE/group_pull.py" runs/l_rand/$CK4 $d --group-sizes 1,4,16 --times 0.5,0.8
done
groupdiff study --ckpt runs/l_rand/$CK4 --out st/l_rand --group-sizes 1,16 "${S4[@]}" --align-labels 16
for s in f_class l_rand; do
  python "$HERE/group_correlation.py" st/$s ref_stats.npz --bootstrap 30 --repeats 4 --ref-images ref_images.npz
done
python "$HERE/group_pull.py" runs/f_class/$CK4 data_heldout --group-sizes 1,4,16 --times 0.3,0.5,0.8,0.95

# ---- GroupDiff-l trained with class groups ----
groupdiff train "${FRESH[@]}" --run-name l_class --group-mode l --group-ratio 0.25 --grouping class
for d in data_heldout data_heldout_emb; do
  python "$HERE/group_pull.py" runs/l_class/$CK4 $d --group-sizes 1,4,16 --times 0.5,0.8
done
groupdiff study --ckpt runs/l_class/$CK4 --out st/l_class --group-sizes 1,16 "${S4[@]}" --align-labels 16
python "$HERE/group_correlation.py" st/l_class ref_stats.npz --ref-images ref_images.npz
# GroupDiff-f on the digits (the data and reference above), similarity groups and class groups, 2,000 steps each;
# the digits once more without embeddings, so that group_pull.py lays them out in class groups
groupdiff encode digits/images digits/data_noemb --image-size 32 --vae pixel --embedder none --shard-size 1000 --no-flip --cpu
groupdiff train "${DIG[@]}" --run-name f_sim --group-mode f --grouping similarity
groupdiff train "${DIG[@]}" --run-name f_class --group-mode f --grouping class
for r in f_sim f_class; do
  for d in data_noemb data; do  # class groups, similarity groups (of the training images: the digits have no held-out set)
    python "$HERE/group_pull.py" digits/runs/$r/checkpoints/step_0002000 digits/$d --group-sizes 1,4,16 --times 0.5,0.8
  done
  sizes=1,16; [ $r = f_sim ] && sizes=1,4,16
  groupdiff study --ckpt digits/runs/$r/checkpoints/step_0002000 --out digits/study/$r --group-sizes $sizes "${SD[@]}" --align-labels 16
  python "$HERE/group_correlation.py" digits/study/$r digits/ref_stats.npz --ref-images digits/images
done
