#!/usr/bin/env bash
# SiT-XL/2 GroupDiff-l with groups of 4, from scratch (the paper's released setting:
# 10% of the images in similarity groups with the null label, sigma_tv = 100 steps).
# Recipe: AdamW 1e-4 constant, betas (0.9, 0.95), wd 0.01, clip 3.0, EMA 0.9999, bf16,
# global batch 256. 800 epochs of ImageNet = 4M steps: weeks on 8 A100/H100 (SiT-XL/2
# costs about 3 x 118.6 GFLOPs per image per step). Preempted? Rerun with --resume.
set -euo pipefail
DATA=${DATA:-data/in256}
accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 -m groupdiff_cli train \
    --data "$DATA" --model SiT-XL/2 --results-dir runs \
    --group-mode l --group-size 4 --group-ratio 0.1 --grouping similarity --similarity-threshold 0.7 \
    --timestep-variance 100 \
    --global-batch-size 256 --max-steps 4000000 \
    --ckpt-every 50000 --keep-every 400000 "$@"
