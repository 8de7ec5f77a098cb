"""The `groupdiff` command line. Each subcommand parses options and calls a function
that also works from Python; bad input becomes a one-line error with exit code 2."""

from __future__ import annotations

import os

import click

from groupdiff_cli import __version__


class UsageError(click.ClickException):
    """A one-line error (no usage dump) that exits with code 2."""

    exit_code = 2


class Group(click.Group):
    # Library functions raise ValueError for bad input: show it as one line, exit 2.
    # GROUPDIFF_DEBUG=1 shows the traceback instead.
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ValueError, FileNotFoundError) as e:
            if os.environ.get("GROUPDIFF_DEBUG"):
                raise
            raise UsageError(str(e)) from e


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="groupdiff")
def main():
    """groupdiff: Group Diffusion (arXiv 2512.10954), diffusion transformers whose
    images attend to each other in groups.

    \b
    Workflow:
      groupdiff encode   images -> webdataset shards of VAE latents + embeddings
      groupdiff train    train a GroupDiff DiT/SiT (accelerate, 1..many GPUs)
      groupdiff sample   sample image groups jointly -> grids + ADM .npz
      groupdiff fid      FID / sFID / IS / precision-recall vs ADM references
      groupdiff models   the model registry with parameters and GFLOPs
    """


def _not_implemented(what: str) -> None:
    raise UsageError(f"`groupdiff {what}` is not implemented yet in this version ({__version__})")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def encode():
    """Encode an image folder into webdataset latent shards (not implemented yet)."""
    _not_implemented("encode")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def train():
    """Train a GroupDiff model (not implemented yet)."""
    _not_implemented("train")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def sample():
    """Sample image groups jointly (not implemented yet)."""
    _not_implemented("sample")


@main.command()
@click.argument("samples", type=click.Path(path_type=str))
@click.argument("ref", type=click.Path(path_type=str))
@click.option("--metrics", default=None, metavar="LIST",
              help="Comma-separated subset of fid,sfid,isc,prc,kid. [default: fid,sfid,isc,prc; "
                   "those the reference cannot support are skipped with a note]")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write every number, the inputs' counts and sha256 hashes and the feature "
                   "extractor's weights hash to this JSON file.")
@click.option("--inception-weights", type=click.Path(dir_okay=False), default=None,
              help="Local copy of torch-fidelity's Inception weights (weights-inception-2015-12-05-6726825d.pth) "
                   "for machines without internet. [default: download once into the torch hub cache]")
@click.option("--save-ref-stats", type=click.Path(dir_okay=False), default=None,
              help="When REF is images: save its statistics (mu, sigma, mu_s, sigma_s and pool features of "
                   "up to 10k images for precision/recall) to this .npz, usable as REF later.")
@click.option("--bootstrap", default=0, show_default=True, type=click.IntRange(0),
              help="Resample the samples this many times for a 95% confidence interval of FID.")
@click.option("--bootstrap-block", default=1, show_default=True, type=click.IntRange(1),
              help="Resample blocks of this many consecutive samples together: set it to the group size, "
                   "since group-mates are correlated.")
@click.option("--batch-size", default=100, show_default=True, type=click.IntRange(1),
              help="Images per Inception forward pass (per process).")
@click.option("--num-workers", default=0, show_default=True, type=click.IntRange(0),
              help="DataLoader workers for decoding image folders.")
@click.option("--seed", default=0, show_default=True, help="Seed of the bootstrap, P/R subset and KID subsets.")
@click.option("--cpu", is_flag=True, help="Run on the CPU even when a GPU is present.")
def fid(samples, ref, metrics, json_out, inception_weights, save_ref_stats, bootstrap, bootstrap_block,
        batch_size, num_workers, seed, cpu):
    """FID, sFID, Inception Score, precision/recall (and KID) of SAMPLES against REF,
    computed as the ADM evaluator does, so numbers compare with published ones.

    \b
    SAMPLES: an ADM-style .npz (arr_0 = uint8 N x H x W x 3), a folder of images,
             or a `groupdiff sample` output folder.
    REF:     the ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz: FID/sFID
             from its stored mu/sigma and mu_s/sigma_s, precision/recall from its
             images), a file written with --save-ref-stats, or images (npz/folder).

    Runs on several GPUs under `accelerate launch -m groupdiff_cli fid ...`.
    """
    from groupdiff_cli.fid import DEFAULT_METRICS, evaluate, format_table

    chosen = tuple(m.strip() for m in metrics.split(",") if m.strip()) if metrics else DEFAULT_METRICS
    report = evaluate(samples, ref, chosen, inception_weights=inception_weights, batch_size=batch_size,
                      num_workers=num_workers, bootstrap=bootstrap, bootstrap_block=bootstrap_block,
                      save_ref_stats=save_ref_stats, seed=seed, cpu=cpu, explicit_metrics=metrics is not None)
    from accelerate import PartialState

    if PartialState().is_main_process:
        click.echo(format_table(report))
        if json_out:
            from groupdiff_cli.fid import write_json_atomic

            write_json_atomic(report, json_out)


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
    from groupdiff_cli.models import describe_models

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
