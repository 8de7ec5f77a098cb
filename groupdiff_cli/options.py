"""Command-line options that several commands share (`sample`, `attention`, `study`),
each defined once: a command takes ``@options.seed`` and gets the same flag, default and
help as every other."""

from __future__ import annotations

import click

from groupdiff_cli.plumbing.defaults import CFG_SCALE, DEFAULT_STEPS
from groupdiff_cli.plumbing.hub import hub_file, is_hub_name


class Number(click.FloatRange):
    """A finite float in a range (click's FloatRange lets NaN through: every comparison
    with NaN is false)."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if v != v or v in (float("inf"), float("-inf")):
            self.fail(f"{value} is not a finite number", param, ctx)
        return v


class PathValue(click.Path):
    """A path that cannot be a flag: `fid S R --json --cpu` must not write a file named
    `--cpu` and run without --cpu. A file whose name starts with '-' is spelt ./-name."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.startswith("-") and value != "-":
            self.fail(f"{value!r} looks like an option, not a path (for a file of that name, write ./{value})",
                      param, ctx)
        return super().convert(value, param, ctx)


class CheckpointValue(PathValue):
    """A checkpoint: a path, or a file on the Hugging Face Hub (hf://OWNER/REPO/FILE),
    fetched into huggingface_hub's cache and given on as its local path (plumbing/hub.py)."""

    def convert(self, value, param, ctx):
        if is_hub_name(value):
            return hub_file(value, param.opts[0] if param is not None else "--ckpt")
        return super().convert(value, param, ctx)


class SamplerOption(click.Option):
    """--sampler, whose help lists the registered samplers (read only when help is shown,
    so that the command line starts without importing torch)."""

    def get_help_record(self, ctx):
        from groupdiff_cli.science.samplers import DEFAULT_SAMPLER, SAMPLERS

        per_objective = {}
        for smp in SAMPLERS.values():
            per_objective.setdefault(smp.objective, []).append(f"{smp.name} ({smp.help})")
        self.help = "; ".join(f"{obj} objective: {', '.join(names)}" for obj, names in per_objective.items()) + (
            f". [default: {' / '.join(DEFAULT_SAMPLER[obj] for obj in per_objective)}]")
        return super().get_help_record(ctx)


ckpt = click.option(
    "--ckpt", required=True, type=CheckpointValue(path_type=str),
    help="A run directory of `groupdiff train` (its latest checkpoint), one of its checkpoint directories, or a "
         "released file as it is: DiT's or SiT's .pt, REPA's SiT, the GroupDiff authors' .pth "
         "(docs/reproducing.md); a file on the Hugging Face Hub as hf://OWNER/REPO/FILE (fetched once into "
         "its cache).")
cfg_scale = click.option(
    "--cfg-scale", type=Number(0), default=CFG_SCALE, show_default=True,
    help="Classifier-free guidance w (out = uncond + w (cond - uncond); 1 = off). 1.5 is the FID setting of "
         "DiT/SiT; about 4.0 gives the crisper images of their figures. A GroupDiff-l model attends across "
         "images only in its unconditional branch, so only with w != 1.")
guidance_interval = click.option(
    "--guidance-interval", default="0,1", show_default=True, metavar="LO,HI",
    help="Guide only while LO <= t <= HI, with t = 1 pure noise and t = 0 data (DDPM step s is t = s/1000; the "
         "authors' release: 0.25,0.75).")
sampler = click.option("--sampler", cls=SamplerOption, default=None)
steps = click.option("--steps", type=click.IntRange(1), default=None,
                     help=f"Sampling steps. [default: {DEFAULT_STEPS}]")
seed = click.option(
    "--seed", default=0, show_default=True, type=click.IntRange(0),
    help="Image i draws from a stream keyed by (seed, i): other seeds give independent images.")
batch_size = click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1),
                          help="Images per forward pass and process (rounded down to whole groups).")
vae = click.option(
    "--vae", default=None, type=PathValue(path_type=str), metavar="ID|DIR",
    help="AutoencoderKL hub id or local directory to decode with (e.g. stabilityai/sd-vae-ft-mse), or `pixel`. "
         "[default: the training data's VAE; stabilityai/sd-vae-ft-ema for official checkpoints]")
cpu = click.option("--cpu", is_flag=True, help="Run on the CPU even when a GPU is present.")
