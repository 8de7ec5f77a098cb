"""Throughput of `groupdiff encode` against the VAE forward passes alone.

The whole pipeline (list, decode JPEGs in a DataLoader worker, ADM crop, VAE moments
of the image and of its flip, write webdataset shards) is timed against exactly the
VAE calls it makes (image + flip, same batches) on crops already in memory. Runs
alternate; the medians are compared.

    python bench/encode_bench.py [--images 256] [--image-size 64] [--repeats 2]

Target: pipeline >= 0.8x of VAE-alone images/s on this CPU with a small VAE.
The VAE has random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timing import median_seconds, print_rates

from groupdiff_cli.data.encode import EncodeConfig, center_crop, encode, load_rgb, vae_moments


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from diffusers import AutoencoderKL

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        rng = np.random.default_rng(0)
        files = []
        for i in range(args.images):
            folder = d / "src" / f"class{i % 8}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = rng.integers(int(1.2 * args.image_size), int(2.5 * args.image_size), 2)
            files.append(folder / f"{i:05d}.JPEG")
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(files[-1], quality=90)
        torch.manual_seed(0)
        vae = AutoencoderKL(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=32,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            latent_channels=4, sample_size=args.image_size)
        vae.save_pretrained(d / "vae")
        vae = vae.eval()
        crops = torch.from_numpy(np.stack([center_crop(load_rgb(f), args.image_size) for f in files]))
        crops = crops.permute(0, 3, 1, 2)

        def vae_alone():
            for batch in crops.split(args.batch_size):
                vae_moments(vae, batch)
                vae_moments(vae, batch.flip(-1))

        def pipeline():
            out = d / "out"
            shutil.rmtree(out, ignore_errors=True)
            cfg = EncodeConfig(src=str(d / "src"), image_size=args.image_size, vae=str(d / "vae"), embedder="none",
                               shard_size=128)
            encode(d / "src", out, cfg, batch_size=args.batch_size, num_workers=args.num_workers, cpu=True,
                   log=lambda m: None)

        seconds = median_seconds({"pipeline": pipeline, "vae alone": vae_alone}, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} JPEGs -> {args.image_size}px, "
          f"batch {args.batch_size}, {args.num_workers} decode worker(s), median of {args.repeats}")
    print_rates(seconds, args.images, "pipeline", "vae alone", digits=1)


if __name__ == "__main__":
    main()
