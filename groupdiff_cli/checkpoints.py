"""Where models live on disk: our run directories and official DiT/SiT files.

A run directory (written by `groupdiff train`)::

    RUN/config.json                      {"model": {...}, "train": {...}, "dataset": {...}}
    RUN/checkpoints/step_0001000/        one directory per checkpoint, renamed into
        model.safetensors                place only when complete
        ema.safetensors
        ...

``config.json["model"]`` is ``models.model_config(...)``: enough to rebuild the
network. ``train`` records how it was trained (group size and mode), ``dataset``
the latent space (VAE id, latent scale, image size).
"""

from __future__ import annotations

from pathlib import Path

from groupdiff_cli.files import read_json_file
from groupdiff_cli.models import GroupDiT, load_pretrained, model_from_config, read_safetensors

CHECKPOINT_PREFIX = "step_"
WEIGHT_FILES = {"ema": "ema.safetensors", "model": "model.safetensors"}


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary ones are named otherwise)."""
    ckpts = Path(run_dir) / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(p for p in ckpts.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def _run_of(path: Path) -> tuple[Path | None, Path | None]:
    """(run dir, checkpoint dir) for a run dir, a checkpoint dir or a weights file in one."""
    if path.is_dir() and (path / "config.json").is_file():
        ckpts = checkpoint_dirs(path)
        if not ckpts:
            raise ValueError(f"--ckpt {path}: run directory without a complete checkpoint in {path / 'checkpoints'}")
        return path, ckpts[-1]
    if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX):
        return path.parent.parent, path
    if path.is_file() and path.parent.name.startswith(CHECKPOINT_PREFIX):
        return path.parent.parent.parent, path.parent
    return None, None


def load_model(ckpt, weights: str = "ema", name: str | None = None) -> tuple[GroupDiT, dict]:
    """Load a model for inference from one of our runs or an official checkpoint.

    Returns the model (eval mode) and a description: the run's config.json (or a
    minimal one for official files) plus ``checkpoint`` (the file read).
    """
    path = Path(ckpt)
    if not path.exists():
        raise ValueError(f"--ckpt {path}: no such file or directory")
    if weights not in WEIGHT_FILES:
        raise ValueError(f"--weights {weights}: choose from {', '.join(WEIGHT_FILES)}")
    run_dir, ckpt_dir = _run_of(path)
    if run_dir is not None:
        cfg = read_json_file(run_dir / "config.json", "--ckpt")
        if not isinstance(cfg.get("model"), dict):
            raise ValueError(f"--ckpt: {run_dir / 'config.json'} has no model description")
        model = model_from_config(cfg["model"])
        file = path if path.is_file() else ckpt_dir / WEIGHT_FILES[weights]
        if not file.is_file():
            raise ValueError(f"--ckpt {ckpt_dir}: no {file.name} in this checkpoint")
        try:
            model.load_state_dict(read_safetensors(file), strict=True)
        except RuntimeError as e:
            raise ValueError(f"--ckpt {file}: does not fit the model in config.json "
                             f"({str(e).splitlines()[0]})") from None
        return model.eval(), dict(cfg, checkpoint=str(file))
    if path.is_dir():
        raise ValueError(f"--ckpt {path}: neither a run directory (with config.json) nor a checkpoint file")
    model, new = load_pretrained(path, name=name)
    cfg = dict(model=model.config, train=dict(group_size=1, group_mode="none", official=True), dataset={},
               checkpoint=str(path), new_tensors=new)
    return model.eval(), cfg
