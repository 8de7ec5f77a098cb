"""The latent space: a diffusers AutoencoderKL (the SD-VAE), or pixels.

``--vae`` takes a hub id (default ``stabilityai/sd-vae-ft-ema``), a local directory
written by ``save_pretrained``, or ``pixel`` for pixel-space models. Latents are
stored multiplied by ``scale`` (0.18215 for the SD-VAE), as DiT/SiT do.
"""

from __future__ import annotations

from pathlib import Path

import torch

from groupdiff_cli.plumbing.defaults import PIXEL


def load_vae(spec: str, device="cpu", flag: str = "--vae"):
    """An ``AutoencoderKL`` in eval mode, or None for ``pixel``."""
    if spec == PIXEL:
        return None
    # lazy: diffusers adds ~2.5 s to start-up and only the SD-VAE needs it
    from diffusers import AutoencoderKL

    local = Path(spec).expanduser()
    if not local.is_dir() and (spec.startswith(("/", ".", "~")) or local.exists()):
        raise ValueError(f"{flag} {spec}: no such directory (a local VAE is a folder written by save_pretrained)")
    try:
        if local.is_dir():
            vae = AutoencoderKL.from_pretrained(str(local))
        else:
            try:  # the hub cache first: no network needed when it is there
                vae = AutoencoderKL.from_pretrained(spec, local_files_only=True)
            except OSError:
                vae = AutoencoderKL.from_pretrained(spec)
    except Exception as e:
        raise ValueError(f"{flag} {spec}: cannot load an AutoencoderKL ({type(e).__name__}); on a machine without "
                         f"internet pass a local directory saved with save_pretrained to {flag}") from None
    return vae.to(device).eval().requires_grad_(False)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float NCHW -> uint8 NHWC with DiT's conversion (clamp(127.5 x + 128), truncated)."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, scale: float, batch_size: int = 32) -> torch.Tensor:
    """Scaled latents (or pixels, vae None) -> uint8 NHWC images on the CPU."""
    out = []
    for z in latents.split(batch_size):
        x = z if vae is None else vae.decode(z.to(vae.dtype) / scale).sample
        out.append(to_uint8(x.float()).cpu())
    return torch.cat(out)
