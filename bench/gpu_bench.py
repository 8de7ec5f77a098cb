"""Every GPU figure in one command: training, memory, sampling, VAE encoding, FID features.

On one GPU (<= 8 minutes on an H100), with randomly initialised weights (speed does not
depend on them), bf16 autocast for training and sampling:
  train     SiT-XL/2 and DiT-XL/2 img/s and MFU for --group-mode none, l (one group of
            4 per batch of 32, ratio 1/8) and f (N = 4), eager and torch.compile;
            AdamW step included; per-GPU batch 32 (--batch)
  memory    peak memory at batch 32, and the largest per-GPU batch (a multiple of 16)
            that trains, for SiT-XL/2 in f mode at N = 16
  sample    img/s at N = 1, 4, 16 with CFG 1.5 (GroupDiff-l: unconditional branch at
            size N), SiT-XL/2, measured over --sample-steps Heun steps and given per 250
            network evaluations of the conditional batch (SiT's SDE budget)
  vae       SD-VAE encode img/s at 256 px (the real diffusers AutoencoderKL
            architecture of stabilityai/sd-vae-ft-ema, fp32 as `encode` runs it)
  fid       Inception (torch-fidelity's FID network) feature extraction img/s
  bootstrap one `fid --bootstrap` resample at 50,000 2,048-d features (float64, on the
            GPU), projected to 1,000 rounds; precision/recall at 50,000 vs 10,000
Each figure sits next to its anchor: the card's dense bf16 peak (MFU = 3 x forward
FLOPs x img/s / peak) and DiT's published training speed (~26 img/s per A100 for
DiT-XL/2, the usual anchor). Writes OUT/gpu_bench.json and OUT/gpu_bench.md
with the card's name.

    python bench/gpu_bench.py --out bench-out          # on a GPU
    python bench/gpu_bench.py --smoke --out smoke-out  # the same code paths, tiny, on the CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from groupdiff_cli.jobs.sampling import Guidance, sample_groups
from groupdiff_cli.science import objectives
from groupdiff_cli.science.models import count_flops, create_model

# dense bf16 tensor-core peaks (FLOP/s, no sparsity), by a substring of the card's name
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "4090": 165e12, "V100": 125e12}
DIT_XL_A100_IMG_S = 26.0


def layout(mode: str, batch: int, n: int) -> list[int]:
    """Group sizes of one batch: none (all single), l (one group of n, the rest single),
    f (all in groups of n)."""
    if mode == "none":
        return [1] * batch
    if mode == "l":
        return [n] + [1] * (batch - n)
    return [n] * (batch // n)


class Trainer:
    """One model with AdamW, stepping on random latents (what `train` runs per step)."""

    def __init__(self, name: str, device, compile_: bool, bf16: bool, **overrides):
        torch.manual_seed(0)
        self.model = create_model(name, **overrides).to(device).train()
        self.objective = objectives.create(objectives.for_model(name), self.model.learn_sigma)
        self.forward = torch.compile(self.model) if compile_ else self.model
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=fused)
        self.device, self.bf16 = device, bf16

    def step(self, sizes: list[int]) -> None:
        m, b = self.model, sum(sizes)
        x0 = torch.randn(b, m.in_channels, m.input_size, m.input_size, device=self.device)
        noise = torch.randn_like(x0)
        y = torch.randint(0, m.num_classes, (b,), device=self.device)
        xt, t_net = self.objective.noisy(x0, torch.rand(b), noise)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            out = self.forward(xt, t_net, y, group_size=sizes).float()
            loss = self.objective.loss(out, x0, xt, t_net, noise).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, repeats: int) -> float:
    """Seconds per call: median of ``repeats`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_flops(device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or "CPU", None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in PEAK_BF16.items() if k in name), None)


def bench_train(cfg, device, peak, deadline) -> list[dict]:
    rows = []
    for name in cfg["models"]:
        flops = {n: count_flops(name, n, **cfg["overrides"]) for n in (1, 4)}
        for compile_ in cfg["compile"]:
            tr = None
            for mode in ("none", "l", "f"):
                if time.perf_counter() > deadline:
                    rows.append(dict(model=name, mode=mode, compile=compile_, skipped="time budget"))
                    continue
                tr = tr or Trainer(name, device, compile_, cfg["bf16"], **cfg["overrides"])
                sizes = layout(mode, cfg["batch"], 4)
                t0 = time.perf_counter()
                s = timed(lambda: tr.step(sizes), device, cfg["warmup"], cfg["repeats"])
                img_s = cfg["batch"] / s
                # forward FLOPs per image: singles at N = 1, grouped images at N = 4
                per_image = sum(flops[min(n, 4)] * n for n in sizes) / cfg["batch"]
                row = dict(model=name, mode=mode, compile=compile_, batch=cfg["batch"], img_s=img_s,
                           step_s=s, wall_s=time.perf_counter() - t0, tflop_per_image=3 * per_image / 1e12)
                if peak:
                    row["mfu"] = img_s * 3 * per_image / peak
                rows.append(row)
                print("train", json.dumps(row), flush=True)
            del tr
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def bench_memory(cfg, device) -> dict:
    """Peak memory at the bench batch, and the largest batch (multiple of 16) at N = 16, f mode."""
    name, n = cfg["models"][0], 16
    tr = Trainer(name, device, False, cfg["bf16"], **cfg["overrides"])

    def fits(batch: int) -> bool:
        try:
            tr.step(layout("f", batch, n))
            sync(device)
            return True
        except torch.cuda.OutOfMemoryError:
            tr.opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return False

    out = dict(model=name, group_size=n, mode="f")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fits(max(n, cfg["batch"]))
    if device.type == "cuda":
        out["peak_gib_at_batch"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["batch"] = max(n, cfg["batch"])
        lo, hi = max(n, cfg["batch"]), None  # lo fits; double until a batch does not, then bisect
        while hi is None and lo < cfg["max_batch"]:
            if fits(2 * lo):
                lo *= 2
            else:
                hi = 2 * lo
        while hi is not None and hi - lo > n:
            mid = (lo + hi) // 2 // n * n
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        out["largest_batch"] = lo
        out["largest_batch_capped"] = hi is None
    print("memory", json.dumps(out), flush=True)
    del tr
    return out


@torch.no_grad()
def bench_sample(cfg, device) -> list[dict]:
    name = cfg["models"][0]
    torch.manual_seed(0)
    model = create_model(name, **cfg["overrides"]).to(device).eval()
    objective = objectives.create(objectives.for_model(name), model.learn_sigma)
    rows = []
    images, steps = cfg["sample_images"], cfg["sample_steps"]
    for n in (1, 4, 16):
        labels = torch.arange(images, device=device) // 16 % model.num_classes  # one class per group
        guidance = Guidance(1.5, None, (0.0, 1.0), 1, n)

        def run():
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg["bf16"]):
                sample_groups(model, objective, labels, 0, n, guidance, seed=0, sampler="heun", steps=steps,
                              device=device)

        s = timed(run, device, 1, cfg["repeats_sample"])
        evals = 2 * steps  # Heun: two network evaluations per step
        row = dict(model=name, group_size=n, cfg=1.5, images=images, heun_steps=steps, img_s=images / s,
                   img_s_per_250_evals=images / s * evals / 250)
        rows.append(row)
        print("sample", json.dumps(row), flush=True)
    return rows


@torch.no_grad()
def bench_vae(cfg, device) -> dict:
    from diffusers import AutoencoderKL

    from groupdiff_cli.data.encode import vae_moments

    torch.manual_seed(0)
    vae = AutoencoderKL(**cfg["vae"]).to(device).eval()
    size = cfg["vae"]["sample_size"]
    x = torch.randint(0, 256, (cfg["vae_batch"], 3, size, size), dtype=torch.uint8, device=device)
    s = timed(lambda: vae_moments(vae, x), device, 1, cfg["repeats_sample"])
    row = dict(image_size=size, batch=cfg["vae_batch"], img_s=cfg["vae_batch"] / s, dtype="fp32")
    print("vae", json.dumps(row), flush=True)
    return row


@torch.no_grad()
def bench_fid(cfg, device) -> dict:
    from groupdiff_cli.evaluation.inception import InceptionFeatures
    from groupdiff_cli.testing import write_random_inception_weights

    with tempfile.TemporaryDirectory() as d:
        net = InceptionFeatures(write_random_inception_weights(Path(d) / "inception.pth")).to(device).eval()
    x = torch.randint(0, 256, (cfg["fid_batch"], 3, 256, 256), dtype=torch.uint8, device=device)
    s = timed(lambda: net(x), device, 1, cfg["repeats_sample"])
    row = dict(input=256, batch=cfg["fid_batch"], img_s=cfg["fid_batch"] / s)
    print("fid", json.dumps(row), flush=True)
    return row


def bench_bootstrap(cfg, device) -> dict:
    import numpy as np

    from groupdiff_cli.evaluation.metrics import FrechetDistance, ResampledFrechet, gaussian_stats, precision_recall

    rng = np.random.default_rng(0)
    n, d = cfg["boot_n"], 2048
    ref = rng.standard_normal((4096, d), dtype=np.float32) @ rng.standard_normal((d, d), dtype=np.float32) / d**0.5
    fd = FrechetDistance(*gaussian_stats(ref))
    feats = np.tile(ref, (n // len(ref) + 1, 1))[:n] + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    resample = ResampledFrechet(feats, fd, 1, device)
    draw = lambda: resample(np.bincount(rng.integers(0, n, n), minlength=n))  # noqa: E731
    draw()  # warm-up
    t0 = time.perf_counter()
    for _ in range(cfg["boot_rounds"]):
        draw()
    per_round = (time.perf_counter() - t0) / cfg["boot_rounds"]
    t0 = time.perf_counter()
    precision_recall(feats, feats[: n // 5], device=device)
    row = dict(samples=n, seconds_per_round=per_round, minutes_per_1000=per_round * 1000 / 60,
               prc_seconds=time.perf_counter() - t0, prc_reference=n // 5)
    print("bootstrap", json.dumps(row), flush=True)
    return row


SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
              block_out_channels=(128, 256, 512, 512), sample_size=256,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
FULL = dict(models=["SiT-XL/2", "DiT-XL/2"], overrides={}, batch=32, compile=[False, True], warmup=3, repeats=10,
            bf16=True, max_batch=4096, sample_images=64, sample_steps=10, repeats_sample=3, vae=SD_VAE, vae_batch=32,
            fid_batch=200, boot_n=50_000, boot_rounds=5)
SMOKE = dict(models=["SiT-Mi/4", "DiT-Mi/4"], overrides=dict(input_size=8, num_classes=10), batch=8,
             compile=[False], warmup=1, repeats=2, bf16=False, max_batch=32, sample_images=16, sample_steps=2,
             repeats_sample=1, vae=dict(SD_VAE, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                                        sample_size=32), vae_batch=4, fid_batch=4, boot_n=500, boot_rounds=2)


def markdown(res: dict) -> str:
    peak = res["peak_bf16_tflops"]
    lines = [f"# gpu_bench on {res['device']}", "",
             f"torch {res['torch']}, {res['when']}; peak dense bf16 {peak or 'unknown'} TFLOP/s; anchor: "
             f"DiT-XL/2 trains at ~{DIT_XL_A100_IMG_S:.0f} img/s per A100 (DiT's published figure).", "",
             "| model | mode | compile | batch | img/s | MFU | x DiT on A100 |", "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in res["train"]:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['compile']} | | skipped ({r['skipped']}) | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
        lines.append(f"| {r['model']} | {r['mode']} | {r['compile']} | {r['batch']} | {r['img_s']:,.1f} | {mfu} | "
                     f"{r['img_s'] / DIT_XL_A100_IMG_S:.1f} |")
    m = res["memory"]
    if "peak_gib_at_batch" in m:
        lines += ["", f"Memory, {m['model']} f mode N = {m['group_size']}: peak {m['peak_gib_at_batch']:.1f} GiB at "
                      f"batch {m['batch']}; largest batch that trains: {m['largest_batch']}"
                      f"{' (cap reached)' if m['largest_batch_capped'] else ''}."]
    lines += ["", "| sampling (CFG 1.5) | N | img/s | img/s per 250 evaluations |", "| --- | ---: | ---: | ---: |"]
    for r in res["sample"]:
        lines.append(f"| {r['model']} | {r['group_size']} | {r['img_s']:,.1f} | {r['img_s_per_250_evals']:,.2f} |")
    lines += ["", f"SD-VAE encode ({res['vae']['image_size']} px, fp32): {res['vae']['img_s']:,.1f} img/s; "
                  f"FID Inception features: {res['fid']['img_s']:,.1f} img/s."]
    b = res["bootstrap"]
    lines += ["", f"FID bootstrap at {b['samples']:,} samples: {b['seconds_per_round']:.3f} s a resample, "
                  f"{b['minutes_per_1000']:.1f} min for 1,000; precision/recall against {b['prc_reference']:,}: "
                  f"{b['prc_seconds']:.1f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the code paths only")
    ap.add_argument("--budget-s", type=float, default=420, help="training rows after this are skipped")
    args = ap.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no GPU: run with --smoke to check the code paths on the CPU")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    card, peak = peak_flops(device)
    t0 = time.perf_counter()
    res = dict(device=card, peak_bf16_tflops=peak / 1e12 if peak else None, torch=torch.__version__,
               when=time.strftime("%Y-%m-%d %H:%M"), smoke=args.smoke)
    res["train"] = bench_train(cfg, device, peak, t0 + args.budget_s)
    res["memory"] = bench_memory(cfg, device)
    res["sample"] = bench_sample(cfg, device)
    res["vae"] = bench_vae(cfg, device)
    res["fid"] = bench_fid(cfg, device)
    res["bootstrap"] = bench_bootstrap(cfg, device)
    res["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(res, indent=1))
    (out / "gpu_bench.md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    sys.exit(main() and 0)
