"""What several test modules build: runs and datasets as the commands lay them out,
CLI calls and the checks of a one-line error."""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from click.testing import CliRunner
from safetensors.torch import load_file

from groupdiff_cli.cli import main
from groupdiff_cli.plumbing.integrity import save_safetensors
from groupdiff_cli.science.models import create_model


def random_model(name, **kw):
    """A registry model with random weights (std 0.05, seed 0), in eval mode."""
    torch.manual_seed(0)
    model = create_model(name, **kw)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n != "pos_embed":
                p.normal_(0, 0.05)
    return model.eval()


def write_run(root: Path, name="DiT-Ti/2", group_mode="l", group_size=4, vae="pixel", **kw) -> Path:
    """A run directory as `groupdiff train` lays it out, with random weights."""
    kw = {"input_size": 8, "in_channels": 3, "num_classes": 10, "max_group_size": 8, **kw}
    model = random_model(name, **kw)
    ckpt = root / "checkpoints" / "step_0000010"
    ckpt.mkdir(parents=True)
    save_safetensors(model.state_dict(), ckpt / "ema.safetensors")
    save_safetensors({k: v * 0 for k, v in model.state_dict().items()}, ckpt / "model.safetensors")
    cfg = dict(model=model.config, train=dict(group_size=group_size, group_mode=group_mode),
               dataset=dict(vae=vae, vae_scale=1.0 if vae == "pixel" else 0.18215))
    (root / "config.json").write_text(json.dumps(cfg))
    return root


def write_dataset(d: Path, n=32, classes=4, shard_size=8, clusters=8, seed=0, hw=8, random_emb=False) -> Path:
    """Shards as `groupdiff encode` writes them, with latents and embeddings we control:
    sample i belongs to embedding cluster i % clusters (cosine 1 inside, 0 across), or,
    with ``random_emb``, has a random unit embedding of its own."""
    rng = np.random.default_rng(seed)
    emb_rng = np.random.default_rng(seed + 1)
    d.mkdir(parents=True)
    shards = []
    centers = np.eye(16)[:clusters]
    for k in range(0, n, shard_size):
        name = f"shard-{k // shard_size:06d}.tar"
        with wds.TarWriter(str(d / name)) as sink:
            for i in range(k, min(k + shard_size, n)):
                mean = rng.normal(size=(4, hw, hw)).astype(np.float16)
                sink.write({"__key__": f"{i:09d}", "cls": i % classes, "path.txt": f"c/{i}.png",
                            "mean.npy": mean, "std.npy": np.full((4, hw, hw), 0.01, np.float16),
                            "flip_mean.npy": mean[..., ::-1].copy(), "flip_std.npy": np.full((4, hw, hw), 0.01,
                                                                                             np.float16),
                            "emb.npy": (_unit(emb_rng.normal(size=16)) if random_emb
                                        else centers[i % clusters]).astype(np.float16)})
        (d / name.replace(".tar", ".json")).write_text(json.dumps(dict(count=min(shard_size, n - k))))
        shards.append(name)
    info = dict(num_samples=n, num_classes=classes, class_names=[str(c) for c in range(classes)], image_size=hw * 8,
                vae="stabilityai/sd-vae-ft-ema", vae_scale=0.18215, latent_shape=[4, hw, hw], flip=True,
                embedder="synthetic", embedder_dim=16, shards=shards)
    (d / "dataset.json").write_text(json.dumps(info))
    return d


def _unit(v):
    return v / np.linalg.norm(v)


def checkpoint_weights(run_dir: Path, step: int):
    """(model, EMA, optimizer state) of a run's checkpoint at ``step``."""
    ck = run_dir / "checkpoints" / f"step_{step:07d}"
    return (load_file(str(ck / "model.safetensors")), load_file(str(ck / "ema.safetensors")),
            torch.load(ck / "optimizer.pt", weights_only=True))


def cli(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def one_line(res, code: int, *needles: str):
    """Exit code ``code`` and exactly one error line (progress bars and notes may come
    before it on stderr) holding every needle; no traceback."""
    assert res.exit_code == code, res.output
    errors = [ln[ln.index("Error: "):] for ln in res.output.splitlines() if "Error: " in ln]
    assert len(errors) == 1, res.output
    for n in needles:
        assert n in errors[0], res.output
    assert "Traceback" not in res.output


def snapshot(folder):
    """{relative path: bytes} of every file below ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_args(data, results, *extra):
    return ["train", "--data", data, "--model", "SiT-Ti/2", "--results-dir", results, "--global-batch-size", "8",
            "--group-buffer", "16", "--ckpt-every", "2", "--log-every", "1", "--cpu", *extra]


def sample_args(ckpt, out, *extra):
    return ["sample", "--ckpt", ckpt, "--out", out, "--group-size", "2", "--num-samples", "4", "--steps", "2",
            "--chunk-groups", "1", *extra]


def images_npz(path, n, seed=0):
    rng = np.random.default_rng(seed)
    np.savez(path, arr_0=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    return path


def launch_two_train(data, results, *extra):
    """`accelerate launch` of a 2-process CPU run (what a node of a multi-node job runs)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
            "-m", "groupdiff_cli", "train", "--data", str(data), "--model", "SiT-Ti/2", "--results-dir",
            str(results), "--global-batch-size", "16", "--group-buffer", "8", "--ckpt-every", "2", "--log-every", "1",
            "--cpu", *extra]
