"""Every name the commands give to what they write: writers and readers both ask here.

    DATA/                         `encode`
      dataset.json                written last: what training and sampling read
      shard-000000.tar, .json     the records of a shard, and its count
    RUN/                          `train`
      config.json                 the run's options, model and dataset
      metrics.jsonl, eval.jsonl   training and held-out losses, one row per logged step
      checkpoints/step_0001000/   model.safetensors, ema.safetensors, optimizer.pt, state.json
    OUT/                          `sample`
      sample_config.json          the job: a rerun resumes, another job is refused
      samples.npz, labels.npy     ADM-style arr_0 (N, H, W, 3) uint8 and the labels (N,)
      samples.json                written once samples.npz is joined and read back: the job's
                                  key, the file's size, the images' sha256 (a rerun stops here)
      grids/, images/             PNGs: 16 images a grid; one per image (--save-images)
      chunks/chunk_00000.npz      the job's pieces, joined into samples.npz at the end, then
                                  removed (kept with --keep-chunks)
      pool_features.npz           the samples' Inception pool features, kept there by `fid`
    STUDY/                        `study`
      N1/, N4/, ..., baseline/    a sample folder per group size, and the baseline's
      study.csv, study.png        the rows and the figure
      reference_stats.npz         the reference's statistics, when REF was images
      branch_loss.csv             with --eval-data
"""

from __future__ import annotations

from pathlib import Path

# an encoded dataset
DATASET_FILE = "dataset.json"


def shard_stem(k: int) -> str:
    return f"shard-{k:06d}"


def shard_record(shard: Path | str) -> Path:
    """The JSON written beside a shard (its count, what was skipped)."""
    return Path(shard).with_suffix(".json")


# a training run
CONFIG_FILE, METRICS_LOG, EVAL_LOG = "config.json", "metrics.jsonl", "eval.jsonl"
CHECKPOINTS_DIR, CHECKPOINT_PREFIX = "checkpoints", "step_"
MODEL_FILE, EMA_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "ema.safetensors", "optimizer.pt", "state.json"


def checkpoints_dir(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def checkpoint_dir(run_dir, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"{CHECKPOINT_PREFIX}{step:07d}"


# a sample folder
SAMPLE_CONFIG, SAMPLES_FILE, LABELS_FILE = "sample_config.json", "samples.npz", "labels.npy"
SAMPLES_RECORD = "samples.json"
POOL_FEATURES = "pool_features.npz"
GRIDS_DIR, IMAGES_DIR, CHUNKS_DIR = "grids", "images", "chunks"


def chunk_file(out, k: int) -> Path:
    return Path(out) / CHUNKS_DIR / f"chunk_{k:05d}.npz"


def image_file(out, index: int) -> Path:
    return Path(out) / IMAGES_DIR / f"{index:06d}.png"


# a study folder
STUDY_CSV, STUDY_PLOT, BRANCH_LOSS_CSV = "study.csv", "study.png", "branch_loss.csv"
STUDY_REFERENCE, BASELINE_DIR = "reference_stats.npz", "baseline"


def group_size_dir(out, n: int) -> Path:
    """The samples a study drew at group size ``n``."""
    return Path(out) / f"N{n}"
