#!/usr/bin/env bash
# The authors' recipe for their released SiT model: REPA-SiT-XL/2 at 4M iterations
# (REPA's checkpoint, loaded as it is: its projector heads are dropped, its time
# convention converted), fine-tuned 500K steps as GroupDiff-l-4 at batch 256, lr 1e-4,
# their weight-decay rule (none on parameters named *embed*), their sample-embedding
# init N(0, 0.02), no timestep jitter, a sample table of 4 rows
# (`--preset release-sit-finetune`). What differs from their code, and why:
# docs/reproducing.md. Then sample with `--preset release-sit` (reproduce_release.sh).
# Hardware/time: 8 GPUs; an estimate, not measured: 128M images at ~100 img/s per A100
# in bf16 is ~45 hours on 8 A100s (~360 A100-hours).
set -euo pipefail
DATA=${DATA:-data/in256}                      # groupdiff encode ... --vae stabilityai/sd-vae-ft-mse
INIT=${INIT:-last.pt}                         # REPA-SiT-XL/2, 4M iterations
accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 -m groupdiff_cli train \
    --data "$DATA" --preset release-sit-finetune --init-from "$INIT" --results-dir runs \
    --run-name SiT-XL-2-repa-ft-l4 --ckpt-every 50000 "$@"
