#!/usr/bin/env bash
# ImageNet-1k train (1.28M images) -> 256px SD-VAE latent shards with DINOv2 embeddings.
# Hardware: 8 GPUs on one node (add --num_machines/--machine_rank for more nodes).
# Time: an estimate, not measured here: a few hours on 8 A100/H100 (two SD-VAE encoder
# passes per image for the flip, one DINOv2-B/14 pass at 224px, JPEG decoding on
# --num-workers CPU processes per GPU).
set -euo pipefail
IMAGENET=${IMAGENET:-/data/imagenet/train}   # train/<wnid>/*.JPEG
OUT=${OUT:-data/in256}
accelerate launch --multi_gpu --num_processes 8 -m groupdiff_cli encode "$IMAGENET" "$OUT" \
    --image-size 256 \
    --vae stabilityai/sd-vae-ft-ema \
    --embedder vit_base_patch14_dinov2.lvd142m --embedder-size 224 \
    --shard-size 10000 --batch-size 128 --num-workers 8
# Offline cluster: --vae /models/sd-vae-ft-ema (a save_pretrained folder) and
# --embedder-weights /models/dinov2_vitb14.safetensors. Rerun the same command after a
# crash: finished shards are kept.
# The nearest-neighbour table that `train --grouping neighbours` (the paper presets) groups
# with: every image's 100 nearest by DINOv2 cosine, exact, over all 1.28M images.
accelerate launch --multi_gpu --num_processes 8 -m groupdiff_cli neighbours "$OUT" --k 100
