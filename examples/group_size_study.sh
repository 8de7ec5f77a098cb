#!/usr/bin/env bash
# The group-size study (the paper's Table 1 / scaling figure): one checkpoint sampled
# at group sizes 1, 2, 4, 8, 16 with identical seeds and labels; FID with a bootstrap
# interval over whole groups, FID(N) - FID(1) with a paired interval (the same resampled
# seeds at both sizes), and the cross-sample attention score S_cross.
# Writes study/study.csv and study/study.png; a rerun resumes.
#
# Small, on the demo's shipped model (after `make demo`, which writes the real digits as
# demo-out/digits_rgb.npz), on a CPU in about 10 minutes:
#   groupdiff study --ckpt groupdiff_cli/pretrained/digits-sit-mi1-l4 --ref demo-out/digits_rgb.npz \
#       --out demo-out/study --group-sizes 1,4,16 --num-samples 640 --steps 10 --sampler heun --cfg-scale 2 \
#       --attention-groups 4 --cpu
# The small-scale reproduction of the paper's claims: study/reproduce_small.sh.
#
# Full size: 50k samples per group size on 8 GPUs (an estimate: about 5 x the time of
# one 50k sampling run, see sample_and_evaluate.sh).
set -euo pipefail
RUN=${RUN:-runs/SiT-XL-2-l4}
REF=${REF:-VIRTUAL_imagenet256_labeled.npz}
accelerate launch --multi_gpu --num_processes 8 -m groupdiff_cli study --ckpt "$RUN" --ref "$REF" --out study --group-sizes 1,2,4,8,16 \
    --num-samples 50000 --cfg-scale 1.5 --batch-size 256 --bootstrap 100 --attention-groups 32 \
    --inception-weights "${INCEPTION:-weights-inception-2015-12-05-6726825d.pth}"
