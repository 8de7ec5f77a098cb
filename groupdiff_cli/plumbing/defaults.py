"""Every default and every list of valid values, in one place.

This module imports nothing heavy, so the command line reads its defaults from here
(``groupdiff --help`` shows them) and the library functions use the same names.
``TrainOptions`` holds the training defaults; ``PRESETS`` names whole recipes
(``groupdiff train --preset NAME``): a preset sets the options not given on the
command line.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# ---- groups ----------------------------------------------------------------
GROUP_MODES = ("l", "f", "none")  # GroupDiff-l, GroupDiff-f, plain DiT/SiT
GROUPINGS = ("similarity", "class", "random", "neighbours")
BATCH_COMPOSITIONS = ("mixed", "separate")  # --grouping neighbours: groups and singles in every batch, or apart
NO_DECAY_RULES = ("ours", "release")  # which parameters get no weight decay (train._no_decay)
MAX_GROUP_SIZE = 16  # rows of the sample-embedding table: the largest group a model can run
STUDY_GROUP_SIZES = (1, 2, 4, 8, 16)  # the group sizes `study` and the held-out evaluation measure

# ---- sampling --------------------------------------------------------------
CFG_SCALE = 1.5  # DiT/SiT's FID setting
DEFAULT_STEPS = 250  # sampling steps, DiT's and SiT's
WEIGHTS = ("ema", "model")  # which weights of a checkpoint
SAMPLE_IDS = ("fixed", "per-call")  # sample-embedding rows: drawn once per image, or anew at every network call
PRECISIONS = ("fp32", "bf16")  # the network's precision while sampling

# `groupdiff sample --preset NAME`: the GroupDiff authors' evaluation of their released
# models (their eval.py and scripts/evaluate_pretrained_{sit,dit}.sh); guidance_interval
# in our time (t = 1 noise), which is theirs too
SAMPLE_PRESETS = {
    "release-sit": dict(group_size=4, cfg_scale=2.585, cfg_channels=3, guidance_interval=(0.25, 0.75),
                        cond_group_size=1, uncond_group_size=4, sampler="sde-sbdm", steps=250, precision="bf16",
                        sample_ids="per-call", vae="stabilityai/sd-vae-ft-mse"),
    "release-dit": dict(group_size=4, cfg_scale=1.65, cfg_channels=None, guidance_interval=(0.0, 1.0),
                        cond_group_size=1, uncond_group_size=4, sampler="ddpm", steps=250, precision="bf16",
                        sample_ids="per-call", vae="stabilityai/sd-vae-ft-mse"),
}

# ---- metrics ---------------------------------------------------------------
MAX_BOOTSTRAP = 100_000  # resamples: 1,000 give a steady 95% interval; beyond this is a typo

# ---- the demo (`groupdiff demo`) --------------------------------------------
DEMO_CFG_SCALE, DEMO_SAMPLER, DEMO_SAMPLE_STEPS = 2.0, "heun", 10
DEMO_GUIDANCE_INTERVAL = (0.25, 0.75)  # the authors' interval (t = 1 noise)
DEMO_GROUP_SIZE = 4  # the unconditional branch's group size: the shipped model's training size
DEMO_BOOTSTRAP = 200  # resamples of whole groups for the paired interval of the FID difference
DEMO_CHAIN_STEPS, DEMO_CHAIN_BATCH = 100, 16  # the small from-scratch chain
DEMO_BATCH = 256  # images per forward pass when the demo encodes and samples (8x8 images: memory is no limit)

# ---- data ------------------------------------------------------------------
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
RELEASE_VAE = "stabilityai/sd-vae-ft-mse"  # the GroupDiff authors' latents and decoder
SD_VAE_SCALE = 0.18215
PIXEL = "pixel"  # the --vae value of pixel-space models
VAE_DOWNSAMPLING = 8  # image pixels per latent pixel, along each side, of the SD-VAE
DEFAULT_EMBEDDER = "vit_base_patch14_dinov2.lvd142m"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})


@dataclass(frozen=True)
class TrainOptions:
    data: str
    model: str = "SiT-XL/2"
    results_dir: str = "runs"
    run_name: str | None = None
    objective: str | None = None  # default: the model family's (objectives.for_model)
    group_mode: str = "l"  # one of GROUP_MODES
    group_size: int = 4
    group_ratio: float = 0.1
    grouping: str | None = None  # one of GROUPINGS; default similarity when embeddings exist
    similarity_threshold: float = 0.7
    group_buffer: int = 20_000
    neighbours_k: int = 100  # --grouping neighbours: mates come from each anchor's top K
    batch_composition: str = "mixed"  # one of BATCH_COMPOSITIONS
    latent_cache: str | None = None  # --grouping neighbours: where the memory-mapped records go; default DATA/cache
    num_workers: int = 1  # 1: a worker process builds the next window in shared memory; 0: in the training process
    timestep_variance: float = 0.0
    max_group_size: int = MAX_GROUP_SIZE
    global_batch_size: int = 256
    grad_accum: int = 1
    max_steps: int = 400_000
    lr: float = 1e-4
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 3.0
    ema_decay: float = 0.9999
    mixed_precision: str | None = None  # no | bf16 | fp16; default bf16 on GPU
    label_dropout: float = 0.1
    flip: bool = True
    gradient_checkpointing: bool = False
    compile: bool = False
    init_from: str | None = None
    ckpt_every: int = 5000
    keep_last: int = 2
    keep_every: int | None = None
    log_every: int = 100
    report_to: str | None = None
    seed: int = 0
    cpu: bool = False
    sample_embed_std: float = 0.02  # init of the sample-embedding rows (method.md §2); ignored with --init-from
    init_sample_embed_std: float = 0.0  # --init-from a file without a sample table: 0 = zeros (step 0 = the file)
    no_decay_rule: str = "ours"  # one of NO_DECAY_RULES
    eval_data: str | None = None  # held-out `encode` shards: per-branch denoising loss every eval_every steps
    eval_every: int | None = None  # default: ckpt_every
    eval_images: int = 256


TRAIN_DEFAULTS = {f.name: f.default for f in fields(TrainOptions) if f.name != "data"}

# Named recipes. The paper's (method.md §3-§5): AdamW 1e-4, batch 256, EMA 0.9999,
# GroupDiff-l with 10% of the images in groups of 4, timestep variance 100; groups as the
# authors form them, an anchor and its nearest free neighbours over the whole data set
# (`groupdiff neighbours DATA` builds the table first).
_PAPER = dict(group_mode="l", group_size=4, group_ratio=0.1, grouping="neighbours", similarity_threshold=0.7,
              timestep_variance=100.0, global_batch_size=256, lr=1e-4, ema_decay=0.9999)
PRESETS = {
    "sit-xl-l4": dict(_PAPER, model="SiT-XL/2"),
    # the authors' released SiT: REPA-SiT-XL/2 (--init-from its checkpoint) fine-tuned
    # 500K steps as GroupDiff-l-4 with their optimiser and initialisation (docs/reproducing.md)
    "release-sit-finetune": dict(_PAPER, model="SiT-XL/2", timestep_variance=0.0, max_steps=500_000,
                                 max_group_size=4, no_decay_rule="release", init_sample_embed_std=0.02,
                                 batch_composition="separate"),
    "dit-xl-l4": dict(_PAPER, model="DiT-XL/2"),
    # the shapes at 32 px (study/shapes_dataset.py; study/README.md)
    "shapes-l4": dict(model="SiT-Mi/4", group_mode="l", group_size=4, group_ratio=0.25, global_batch_size=64,
                      lr=6e-3, ema_decay=0.995),
    # the bundled digits at their own 8x8 (the demo's weights, GroupDiff-l and with --group-mode none
    # its baseline): one token per pixel, class
    # groups (a pixel-space set with no retrieval encoder), never mirrored
    "digits-l4": dict(model="SiT-Mi/1", group_mode="l", group_size=4, group_ratio=0.25, grouping="class",
                      global_batch_size=64, lr=6e-3, ema_decay=0.995, flip=False),
}
