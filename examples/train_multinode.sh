#!/usr/bin/env bash
# SiT-XL/2 GroupDiff-l-4 on 2 nodes x 8 GPUs, launched by hand: run this on every node,
# with NODE_RANK=0 on the first and NODE_RANK=1 on the second, MASTER=<first node's address>.
# (Under SLURM use examples/train_multinode.sbatch, which does this for you.)
#
# Shared by all nodes (one parallel filesystem path, the same on every node):
#   $DATA  the `groupdiff encode` shards: each process reads its own shards (needs at
#          least 16 shards for 16 processes; encode writes 10,000 samples per shard);
#   $RUNS  the results directory: rank 0 writes checkpoints, metrics and the job lock
#          there, and every rank reads the checkpoint on --resume.
# Node-local: /dev/shm for the loader's two windows (2 x --group-buffer x 35.8 kB per
# process at ImageNet-256: 1.4 GB x 8 per node).
#
# Preempted? Start the same command again on both nodes with --resume: it continues from
# the last complete checkpoint, bit for bit as if uninterrupted (same number of processes).
set -euo pipefail
DATA=${DATA:-/shared/data/in256}
RUNS=${RUNS:-/shared/runs}
NODE_RANK=${NODE_RANK:?set NODE_RANK to 0 or 1}
MASTER=${MASTER:?set MASTER to the address of the node with NODE_RANK=0}
accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank "$NODE_RANK" \
    --main_process_ip "$MASTER" --main_process_port 29500 --mixed_precision bf16 \
    -m groupdiff_cli train --data "$DATA" --results-dir "$RUNS" --run-name sit-xl-l4 \
    --model SiT-XL/2 --group-mode l --group-size 4 --group-ratio 0.1 --grouping similarity \
    --timestep-variance 100 --global-batch-size 256 --max-steps 4000000 \
    --ckpt-every 10000 --keep-every 400000 "$@"
