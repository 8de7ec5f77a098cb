"""Where our models live on disk: run directories and their checkpoints. This module
writes, finds, prunes, reads and exports them, and nothing else spells the layout;
``load_model`` also takes a file released by others (DiT, SiT, REPA, the GroupDiff authors), which
``official.load_pretrained`` reads.

A run directory (written by `groupdiff train`)::

    RUN/config.json                      {"model": {...}, "train": {...}, "dataset": {...}}
    RUN/metrics.jsonl, RUN/eval.jsonl    one row per logged step
    RUN/checkpoints/step_0001000/        one directory per checkpoint, renamed into place
        model.safetensors                only when complete and on the disk (.tmp_*, fsync)
        ema.safetensors
        optimizer.pt                     AdamW state (weights_only pickle)
        state.json                       {"step", "data_position", "processes", "param_sums",
                                          "sha256": {"optimizer.pt": ...}}

Every safetensors file carries the sha256 of its tensors and ``state.json`` that of
``optimizer.pt`` (``integrity.py``); both are checked when a checkpoint is read.

``config.json["model"]`` is ``models.model_config(...)``: enough to rebuild the
network. ``train`` records how it was trained (group size and mode), ``dataset``
the latent space (VAE id, latent scale, image size).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import threading
from pathlib import Path

import torch

from groupdiff_cli.plumbing.defaults import DEFAULT_VAE, PIXEL, RELEASE_VAE, SD_VAE_SCALE, VAE_DOWNSAMPLING, WEIGHTS
from groupdiff_cli.plumbing.files import read_json_file, size_text, write_json_atomic
from groupdiff_cli.plumbing.integrity import IntegrityError, file_sha256, load_safetensors, save_safetensors
from groupdiff_cli.plumbing.torchfiles import load_torch
from groupdiff_cli.plumbing.layout import (CHECKPOINT_PREFIX, CONFIG_FILE, EMA_FILE, MODEL_FILE, OPTIMIZER_FILE,
                                           STATE_FILE, checkpoint_dir, checkpoints_dir)
from groupdiff_cli.science.models import GroupDiT, model_from_config
from groupdiff_cli.science.official import load_pretrained

WEIGHT_FILES = dict(zip(WEIGHTS, (EMA_FILE, MODEL_FILE)))  # defaults.WEIGHTS: ("ema", "model")


def checkpoint_step(ckpt_dir: Path) -> int:
    return int(Path(ckpt_dir).name[len(CHECKPOINT_PREFIX):])


def step_of(path) -> int | None:
    """The step of a checkpoint directory or of a file in one; None for anything else."""
    for p in (Path(path), *Path(path).parents[:1]):
        if p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit():
            return checkpoint_step(p)
    return None


def is_ours(path) -> bool:
    """A run directory, one of its checkpoint directories, or a weights file in one (as
    opposed to an official DiT/SiT file)."""
    path = Path(path)
    return path.is_dir() or path.suffix == ".safetensors" and path.parent.name.startswith(CHECKPOINT_PREFIX)


def host_copy(obj, into=None):
    """``obj`` (a state dict, nested in dicts and lists) with every tensor copied to host
    memory: the state of this step, fixed while training changes the originals. ``into``:
    an earlier copy of the same structure whose tensors are reused (no new pages to fault
    in); a GPU's tensors go to pinned memory, which copies at the bus's full speed."""
    if torch.is_tensor(obj):
        obj = obj.detach()
        if not (torch.is_tensor(into) and into.shape == obj.shape and into.dtype == obj.dtype):
            into = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
        return into.copy_(obj)
    if isinstance(obj, dict):
        return {k: host_copy(v, into.get(k) if isinstance(into, dict) else None) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        kept = into if isinstance(into, (list, tuple)) and len(into) == len(obj) else [None] * len(obj)
        return type(obj)(host_copy(v, k) for v, k in zip(obj, kept))
    return obj


def save_checkpoint(run_dir: Path, step: int, weights: dict, optimizer: dict, state: dict) -> Path:
    """Write RUN/checkpoints/step_<step> atomically: into a temporary directory whose
    files are flushed to the disk (fsync), then renamed into place, so a checkpoint is
    complete or absent, a crash of the machine included. ``weights``: {file name: state
    dict} (``MODEL_FILE``, ``EMA_FILE``); ``optimizer``: its state dict."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for name, tensors in weights.items():
            save_safetensors(tensors, tmp / name)
        torch.save(optimizer, tmp / OPTIMIZER_FILE)
        sha = {OPTIMIZER_FILE: file_sha256(tmp / OPTIMIZER_FILE)}
        (tmp / STATE_FILE).write_text(json.dumps(dict(step=step, **state, sha256=sha)))
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
    except Exception as e:  # safetensors and torch report a full disk in errors of their own
        shutil.rmtree(tmp, ignore_errors=True)
        if "DataLoader worker" in str(e):  # torch's report of a dead loader worker, raised wherever the step is
            raise
        raise _write_error(e, final) from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)  # the rename itself
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriter:
    """Checkpoints written in the background, one at a time, so that the training loop
    (and every other process, which does not wait at all) pays only for a copy of the
    state to host memory. ``submit`` waits for the write in flight, copies the state,
    and returns; the write, its checksums and the pruning of old checkpoints happen in a
    thread. ``wait`` returns once the last one is on disk and raises its error, if any:
    the end of a run and the stop path call it before the process exits. Host memory:
    one extra copy of the checkpoint while it is written."""

    def __init__(self, run_dir: Path, keep_last: int, keep_every: int | None):
        self.run_dir, self.keep_last, self.keep_every = run_dir, keep_last, keep_every
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._host: tuple = (None, None)  # the last copy, whose memory the next one reuses

    def submit(self, step: int, model, ema, optimizer, state: dict) -> None:
        self.wait()
        weights = host_copy({MODEL_FILE: model.state_dict(), EMA_FILE: ema.state_dict()}, self._host[0])
        self._host = (weights, host_copy(optimizer.state_dict(), self._host[1]))
        args = (step, *self._host, state)
        # not a daemon: an exception in the loop still lets the interpreter finish the write
        self._thread = threading.Thread(target=self._write, args=args, name=f"checkpoint-{step}")
        self._thread.start()

    def _write(self, step: int, weights: dict, optimizer: dict, state: dict) -> None:
        try:
            save_checkpoint(self.run_dir, step, weights, optimizer, state)
            prune_checkpoints(self.run_dir, self.keep_last, self.keep_every)
        except BaseException as e:  # noqa: BLE001 (raised in the training thread by ``wait``)
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _write_error(e: Exception, path: Path) -> OSError:
    """An OSError naming the checkpoint that could not be written, whatever the writer raised."""
    code = getattr(e, "errno", None)
    if code is None:
        found = re.search(r"(?:code|errno):? (\d+)", str(e))
        code = int(found.group(1)) if found else None
    if code is None and shutil.disk_usage(path.parent).free < 2**26:  # torch.save names no cause
        code = errno.ENOSPC
    why = os.strerror(code) if code else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return OSError(code, f"{why}; not written (the earlier checkpoints are intact)", str(path))


def prune_checkpoints(run_dir: Path, keep_last: int, keep_every: int | None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, keeping multiples of ``keep_every``."""
    for old in checkpoint_dirs(run_dir)[:-keep_last] if keep_last else []:
        if not (keep_every and checkpoint_step(old) % keep_every == 0):
            shutil.rmtree(old)


def checkpoint_space(run_dir: Path, per_checkpoint: int, step: int, max_steps: int, ckpt_every: int,
                     keep_last: int, keep_every: int | None) -> tuple[int, str]:
    """The disk space this run's checkpoints still need at their peak (bytes), and why.

    Old checkpoints are pruned only once the new one is complete, so at a save the disk
    holds ``keep_last`` checkpoints, the one being written, and every one kept by
    ``keep_every``; those already on disk need nothing more."""
    on_disk = checkpoint_dirs(run_dir) if checkpoints_dir(run_dir).is_dir() else []
    future = [s for s in range(step + 1, max_steps + 1) if s % ckpt_every == 0 or s == max_steps]
    kept = {s for s in [*map(checkpoint_step, on_disk), *future] if keep_every and s % keep_every == 0}
    peak = len(on_disk) + len(future) if not keep_last else min(keep_last + 1 + len(kept),
                                                                 len(on_disk) + len(future))
    why = (f"{peak} checkpoints of {size_text(per_checkpoint)} at once: --keep-last {keep_last}, the one being "
           f"written, {len(kept)} kept by --keep-every" + (f", {len(on_disk)} on disk already" if on_disk else ""))
    return max(0, peak - len(on_disk)) * per_checkpoint, why


def load_training_state(ckpt: Path, model, ema, optimizer) -> int:
    """Weights, EMA and optimizer state of a checkpoint; returns its step. A file that
    cannot be read (corrupt, foreign, or a pickle of anything but tensors) is a one-line
    ValueError naming it."""
    for name, net in ((MODEL_FILE, model), (EMA_FILE, ema)):
        try:
            net.load_state_dict(load_safetensors(ckpt / name, require_digest=True))
        except RuntimeError as e:
            raise ValueError(f"--resume: {ckpt / name} does not fit the model ({str(e).splitlines()[0]})") from None
    state = read_json_file(ckpt / STATE_FILE, "--resume")
    recorded = (state.get("sha256") or {}).get(OPTIMIZER_FILE)  # checkpoints written before checksums: none
    if recorded and (ckpt / OPTIMIZER_FILE).is_file() and file_sha256(ckpt / OPTIMIZER_FILE) != recorded:
        raise IntegrityError(ckpt / OPTIMIZER_FILE, f"its sha256 differs from the one in {STATE_FILE}")
    state_dict = load_torch(ckpt / OPTIMIZER_FILE, f"--resume: {ckpt / OPTIMIZER_FILE}")
    try:
        optimizer.load_state_dict(state_dict)
    except Exception as e:  # another model's optimizer
        raise ValueError(f"--resume: {ckpt / OPTIMIZER_FILE}: cannot load ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    step = state.get("step")
    if not isinstance(step, int):
        raise ValueError(f"--resume: {ckpt / STATE_FILE} has no step")
    if step != checkpoint_step(ckpt):  # resuming it would overwrite the checkpoint of the step it names
        raise IntegrityError(ckpt / STATE_FILE, f"it says step {step} in the folder of step {checkpoint_step(ckpt)}")
    return step


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary ones are named otherwise)."""
    ckpts = checkpoints_dir(run_dir)
    if not ckpts.is_dir():
        return []
    return sorted(p for p in ckpts.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def _run_of(path: Path, flag: str = "--ckpt") -> tuple[Path | None, Path | None]:
    """(run dir, checkpoint dir) for a run dir, a checkpoint dir or a weights file in one."""
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        ckpts = checkpoint_dirs(path)
        if not ckpts:
            raise ValueError(f"{flag} {path}: run directory without a complete checkpoint in {path / 'checkpoints'}")
        return path, ckpts[-1]
    if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX):
        return path.parent.parent, path
    if path.is_file() and path.parent.name.startswith(CHECKPOINT_PREFIX):
        return path.parent.parent.parent, path.parent
    return None, None


def load_model(ckpt, weights: str = "ema", name: str | None = None, flag: str = "--ckpt") -> tuple[GroupDiT, dict]:
    """Load a model for inference from one of our runs or an official checkpoint.

    Returns the model (eval mode) and a description: the run's config.json (or a
    minimal one for a foreign file, with ``official``: what ``official.load_pretrained``
    read) plus ``checkpoint`` (the file read). ``weights`` picks the EMA or the raw
    weights of our checkpoints and of foreign files that hold both. ``flag`` is the
    option that named the checkpoint, for error lines (--baseline, --init-from, ...).
    """
    path = Path(ckpt)
    if not path.exists():
        raise ValueError(f"{flag} {path}: no such file or directory")
    if weights not in WEIGHT_FILES:
        raise ValueError(f"--weights {weights}: choose from {', '.join(WEIGHT_FILES)}")
    run_dir, ckpt_dir = _run_of(path, flag)
    if run_dir is not None:
        cfg = read_json_file(run_dir / CONFIG_FILE, flag)
        if not isinstance(cfg.get("model"), dict):
            raise ValueError(f"{flag}: {run_dir / CONFIG_FILE} has no model description")
        model = model_from_config(cfg["model"])
        file = path if path.is_file() else ckpt_dir / WEIGHT_FILES[weights]
        if not file.is_file():
            raise ValueError(f"{flag} {ckpt_dir}: no {file.name} in this checkpoint")
        try:
            model.load_state_dict(load_safetensors(file, require_digest=True), strict=True)
        except RuntimeError as e:
            raise ValueError(f"{flag} {file}: does not fit the model in config.json "
                             f"({str(e).splitlines()[0]})") from None
        return model.eval(), dict(cfg, checkpoint=str(file))
    if path.is_dir():
        raise ValueError(f"{flag} {path}: neither a run directory (with config.json) nor a checkpoint file")
    model, desc = load_pretrained(path, name=name, weights=weights)
    g = desc["group_size"]  # the authors' release: GroupDiff-l, groups as large as its sample table
    train = dict(group_size=g or 1, group_mode="l" if g else "none", official=True, source=desc["layout"])
    # the release was trained and evaluated on sd-vae-ft-mse latents
    dataset = dict(vae=RELEASE_VAE, vae_scale=SD_VAE_SCALE) if desc["layout"] == "groupdiff" else {}
    cfg = dict(model=model.config, train=train, dataset=dataset, checkpoint=str(path), official=desc)
    return model.eval(), cfg


# the SD-VAEs whose encoder is one (their fine-tuning changed the decoder only): one latent space
SD_VAE_FAMILY = (DEFAULT_VAE, RELEASE_VAE)


def image_space(loaded) -> dict:
    """What a loaded model's samples are: image size in pixels, latent space, channels and
    classes. Two models can be compared image for image only when these are equal."""
    model, info = loaded
    dataset = info.get("dataset", {})
    vae = dataset.get("vae") or (PIXEL if model.in_channels == 3 else DEFAULT_VAE)
    scale = float(dataset.get("vae_scale", SD_VAE_SCALE))
    space = "pixels" if vae == PIXEL else f"{'the SD-VAE' if vae in SD_VAE_FAMILY else vae}'s latents x {scale:g}"
    size = dataset.get("image_size") or model.input_size * (1 if vae == PIXEL else VAE_DOWNSAMPLING)
    return {"image size": f"{size}x{size}", "latent space": space, "channel count": model.in_channels,
            "class count": model.num_classes}


def check_comparable(loaded, other, flag: str, path, against: str = "--ckpt") -> None:
    """Refuse, naming ``flag``, a second model (``other``, read from ``path``) whose samples
    cannot be paired image for image with ``loaded``'s: another image size, latent space,
    channel count or class count."""
    mine, theirs = image_space(loaded), image_space(other)
    differ = [f"its {what} is {theirs[what]}, {against}'s {mine[what]}" for what in mine if mine[what] != theirs[what]]
    if differ:
        raise ValueError(f"{flag} {path}: {'; '.join(differ)}: the two cannot be compared image for image")


def export_ema(ckpt_dir, dest, dtype=torch.float16, note: dict | None = None) -> Path:
    """A run directory holding only the EMA weights of ``ckpt_dir`` (in ``dtype``) and its
    config.json (plus ``note`` under "shipped"): what one shares or ships for sampling."""
    ckpt_dir, dest = Path(ckpt_dir), Path(dest)
    cfg = read_json_file(ckpt_dir.parent.parent / CONFIG_FILE, "export")
    target = checkpoint_dir(dest, checkpoint_step(ckpt_dir))
    target.mkdir(parents=True, exist_ok=True)
    ema = load_safetensors(ckpt_dir / EMA_FILE, require_digest=True)
    save_safetensors({k: v.to(dtype) for k, v in ema.items()}, target / EMA_FILE)
    write_json_atomic(dict(cfg, shipped=dict(note or {}, weights=f"EMA at step {checkpoint_step(ckpt_dir)}, "
                                                               f"stored as {str(dtype).removeprefix('torch.')}")),
                      dest / CONFIG_FILE)
    return target
