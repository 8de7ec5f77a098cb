#!/usr/bin/env bash
# 50,000 class-balanced samples (50 per class, groups of 4 sharing a class), then the
# ADM evaluator's metrics against VIRTUAL_imagenet256_labeled.npz (from the ADM
# evaluation suite, downloaded beforehand).
# Hardware/time: 8 GPUs; an estimate: SiT-XL/2 with 250 SDE steps and CFG is about an
# hour on 8 A100s for 50k images; metrics take minutes.
# --cfg-scale 1.5 is DiT/SiT's FID setting; add --cfg-channels 3 to reproduce their
# published numbers exactly (their code guides 3 of 4 latent channels).
set -euo pipefail
RUN=${RUN:-runs/SiT-XL-2-l4}
REF=${REF:-VIRTUAL_imagenet256_labeled.npz}
accelerate launch --multi_gpu --num_processes 8 -m groupdiff_cli sample --ckpt "$RUN" \
    --group-size 4 --num-samples 50000 --cfg-scale 1.5 --batch-size 256 --out samples/fid50k
accelerate launch --multi_gpu --num_processes 8 -m groupdiff_cli fid samples/fid50k "$REF" \
    --bootstrap 100 --bootstrap-block 4 --json samples/fid50k/metrics.json \
    --inception-weights "${INCEPTION:-weights-inception-2015-12-05-6726825d.pth}"
