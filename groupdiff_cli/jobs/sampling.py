"""Joint group sampling: every group of N images shares a class and is denoised together.

Reproducibility: image i (counted over the whole run) draws all its randomness from
its own generator keyed by (seed, i) (``seeds.seeds_of_images``; on the CPU, so the noise is the same on
every device): first its sample-embedding row for the per-image (conditional)
branch, then its initial noise, then the noise of every stochastic step. A group's
sample-embedding permutation for the grouped branch comes from a generator seeded
keyed by (seed, first index); with ``sample_ids="per-call"`` (the
GroupDiff release's way) that generator also draws the rows of every network call,
the per-image ones included. So the samples do not depend on the number of
processes or the batch size, and an interrupted run resumes exactly.

CFG: out = uncond + w (cond - uncond), guided on the first C channels (or the first
3 with ``cfg_channels=3``, DiT/SiT's published setting); the remaining channels
(learned variance) come from the conditional branch. GroupDiff-l: the conditional
branch runs at group size 1, the unconditional branch at group size N, in one
forward pass; with w = 1 only the conditional branch runs, so images do not
interact. The guidance interval is in our time convention (t = 1 noise, t = 0
data; DDPM step s is t = s / 1000).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from groupdiff_cli.data.vae import decode, load_vae
from groupdiff_cli.plumbing.defaults import (CFG_SCALE, DEFAULT_STEPS, DEFAULT_VAE, PIXEL, PRECISIONS, SAMPLE_IDS,
                                             SD_VAE_SCALE)
from groupdiff_cli.plumbing.distributed import process_state, take_job_lock, wait_for_main
from groupdiff_cli.plumbing.files import atomic_path, check_output_dir, read_json_file, write_json_atomic
from groupdiff_cli.plumbing.integrity import IntegrityError, load_arrays, save_arrays
from groupdiff_cli.plumbing.layout import (CHUNKS_DIR, GRIDS_DIR, IMAGES_DIR, LABELS_FILE, SAMPLE_CONFIG, SAMPLES_FILE,
                                           SAMPLES_RECORD, chunk_file, image_file)
from groupdiff_cli.plumbing.seeds import group_rows_generator, image_generator, label_generator, seeds_of_images
from groupdiff_cli.science import samplers
from groupdiff_cli.science.checkpoints import load_model, step_of
from groupdiff_cli.science.objectives import create, of_run


class NonFiniteSamples(FloatingPointError):
    """The model's output went NaN/inf at time t for some groups (indices in the batch)."""

    def __init__(self, t: float, groups: list[int]):
        super().__init__(f"t = {t:.4f}: the model output is not finite for group(s) {groups}")
        self.t, self.groups = t, groups


@dataclass
class Guidance:
    scale: float = 1.0  # w; 1 = off
    channels: int | None = None  # guided channels; None = all
    interval: tuple[float, float] = (0.0, 1.0)  # guide only while lo <= t <= hi (t = 1 noise)
    cond_group_size: int = 1
    uncond_group_size: int = 1

    def active(self, t: float) -> bool:
        return self.scale != 1.0 and self.interval[0] <= t <= self.interval[1]

    @classmethod
    def of_job(cls, job) -> "Guidance":
        return cls(job.cfg_scale, job.cfg_channels, tuple(job.guidance_interval), job.cond_group_size,
                   job.uncond_group_size)


def full_precision(out: torch.Tensor) -> torch.Tensor:
    """A bf16 / fp16 network output in fp32; fp32 and fp64 as they are (a float64 model
    samples in float64 throughout, which the tests use to compare batchings exactly)."""
    return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out


def make_denoiser(model, objective, labels, group_size: int, guidance: Guidance, rows, precision: str = "fp32"):
    """(x, the objective's time) -> its prediction, with CFG and group sizes: the
    denoiser the samplers integrate.

    labels: (M,) for the M = groups * group_size images of x. ``rows()`` gives the
    sample-embedding rows of the call, (single_ids, group_ids), each (M,): the same
    every call, or drawn anew (``sample_groups``). ``precision`` "bf16": the network's
    matrix products run under bf16 autocast; its output, the guidance and the sampler's
    state stay in fp32.
    """
    m = labels.shape[0]
    null = torch.full_like(labels, model.num_classes)
    c = model.in_channels

    def autocast():
        if precision == "bf16":
            return torch.autocast(labels.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sizes(n):
        """Per-group sizes for a branch that runs the batch's groups at size n."""
        if group_size % n:
            raise ValueError(f"branch group size {n} does not divide the group size {group_size}")
        return [n] * (m // n)

    def denoiser(x, t):
        t_ours = objective.unit_time(t)
        t_net = objective.network_time(t)
        gc, gu = guidance.cond_group_size, guidance.uncond_group_size
        single_ids, group_ids = rows()

        def ids_for(size):
            return single_ids if size == 1 else group_ids

        if guidance.active(t_ours):
            with autocast():
                out = model(torch.cat([x, x]), torch.cat([t_net, t_net]), torch.cat([labels, null]),
                            group_size=sizes(gc) + sizes(gu), sample_ids=torch.cat([ids_for(gc), ids_for(gu)]))
            cond, uncond = full_precision(out).chunk(2)
            k = guidance.channels or c
            guided = uncond[:, :k] + guidance.scale * (cond[:, :k] - uncond[:, :k])
            out = torch.cat([guided, cond[:, k:]], dim=1)
        else:
            with autocast():
                out = full_precision(model(x, t_net, labels, group_size=sizes(gc), sample_ids=ids_for(gc)))
        finite = torch.isfinite(out.flatten(1)).all(1)
        if not bool(finite.all()):  # never let NaN samples be written as if valid
            bad = sorted({int(i) // group_size for i in torch.nonzero(~finite).flatten()})
            raise NonFiniteSamples(t_ours, bad)
        return objective.prediction(out, c)

    return denoiser


@torch.no_grad()
def sample_groups(model, objective, labels: torch.Tensor, first_index: int, group_size: int, guidance: Guidance,
                  seed: int, sampler: str, steps: int, device="cpu",
                  image_seeds: list[int] | None = None, sample_ids: str = "fixed",
                  precision: str = "fp32") -> torch.Tensor:
    """Sample the images first_index .. first_index + M - 1 (whole groups).

    labels: (M,) class of each image (constant within a group). ``image_seeds``
    overrides the per-image seeds (default: keyed by seed and index). ``sample_ids`` "fixed": each
    image keeps its sample-embedding rows for the whole trajectory; "per-call": every
    network call draws new ones (the GroupDiff release's sampling), from each group's own
    generator, so the result still does not depend on the batch. Returns the final
    latents (M, C, H, W) on the CPU.
    """
    m = labels.shape[0]
    if m % group_size:
        raise ValueError(f"{m} images are not whole groups of {group_size}")
    c, s = model.in_channels, model.input_size
    gens = [image_generator(v) for v in image_seeds or seeds_of_images(seed, first_index, m)]
    single_ids = torch.stack([torch.randint(model.max_group_size, (), generator=g) for g in gens])
    group_ids = torch.cat([
        torch.randperm(model.max_group_size, generator=group_rows_generator(seed, first_index + j))[:group_size]
        for j in range(0, m, group_size)
    ])
    x = torch.stack([torch.randn(c, s, s, generator=g) for g in gens]).to(device)

    def noise(_step):
        return torch.stack([torch.randn(c, s, s, generator=g) for g in gens]).to(device)

    if sample_ids == "per-call":
        group_gens = [group_rows_generator(seed, first_index + j) for j in range(0, m, group_size)]

        def rows():
            single = torch.cat([torch.randint(model.max_group_size, (group_size,), generator=g) for g in group_gens])
            grouped = torch.cat([torch.randperm(model.max_group_size, generator=g)[:group_size] for g in group_gens])
            return single.to(device), grouped.to(device)
    else:
        fixed = single_ids.to(device), group_ids.to(device)

        def rows():
            return fixed

    denoiser = make_denoiser(model, objective, labels.to(device), group_size, guidance, rows, precision)
    try:
        out = samplers.run(sampler, objective, denoiser, x, noise, steps)
    except NonFiniteSamples as e:
        first = first_index // group_size
        raise FloatingPointError(f"sampling stopped at t = {e.t:.4f} (t = 1 is noise): the model output is not "
                                 f"finite for group(s) {[first + g for g in e.groups]}; nothing of their chunk "
                                 f"was written") from None
    return out.float().cpu()


# --------------------------------------------------------------------------- #
#  Labels, grids and files                                                     #
# --------------------------------------------------------------------------- #
def group_labels(num_classes: int, num_groups: int | None = None, class_labels=None, random_labels=False,
                 seed: int = 0) -> list[int]:
    """One class per group: the given list, class-balanced (group k -> k mod classes),
    or random (seeded)."""
    if class_labels:
        bad = [y for y in class_labels if not 0 <= y < num_classes]
        if bad:
            raise ValueError(f"--class-labels: label {bad[0]} is outside [0, {num_classes - 1}]")
        return list(class_labels)
    if random_labels:
        return torch.randint(num_classes, (num_groups,), generator=label_generator(seed)).tolist()
    return [k % num_classes for k in range(num_groups)]


def aligned_labels(num_samples: int, group_size: int, block: int, num_classes: int) -> list[int]:
    """One class per group such that image i always gets class (i // block) mod classes,
    whatever the group size (a divisor of ``block``)."""
    return [(g * group_size // block) % num_classes for g in range(num_samples // group_size)]


def ema_warning(info: dict, weights: str, warn) -> None:
    """Warn when the EMA weights are still mostly the initial ones: after s steps at
    decay d, a fraction d**s of the EMA is the initialisation."""
    decay, step = info.get("train", {}).get("ema_decay"), step_of(info.get("checkpoint", ""))
    if weights != "ema" or decay is None or step is None:
        return
    left = decay ** step
    if left > 0.1:
        warn(f"warning: the EMA (decay {decay}) has seen {step} steps: {left:.0%} of its weights are still the "
             f"initial ones (it needs about {round(2.3 / (1 - decay))} steps); sample with --weights model, or "
             f"train with a smaller --ema-decay")


def grid_image(images: np.ndarray, cols: int | None = None, gap: int = 0) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one grid, ``cols`` columns (default ceil(sqrt(N)): 16 -> 4x4),
    ``gap`` white pixels between tiles, black padding after the last image."""
    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255 if gap else 0, np.uint8)
    for i, img in enumerate(images):
        r, cl = divmod(i, cols)
        y, x = r * (h + gap), cl * (w + gap)
        grid[y:y + h, x:x + w] = img
    for i in range(n, rows * cols):  # padding tiles
        r, cl = divmod(i, cols)
        grid[r * (h + gap):r * (h + gap) + h, cl * (w + gap):cl * (w + gap) + w] = 0
    return grid


GRID_IMAGES, GRID_COLS, CAPTION_PX = 16, 4, 12  # a grid file: 16 images, 4 per row, a caption band


def captioned(grid: np.ndarray, text: str) -> np.ndarray:
    """The grid under a white band holding ``text`` (Pillow's built-in font)."""
    band = Image.new("RGB", (grid.shape[1], CAPTION_PX), "white")
    ImageDraw.Draw(band).text((1, 0), text, fill="black")
    return np.concatenate([np.asarray(band), grid], axis=0)


def write_grids(images: np.ndarray, labels: list[int], first_group: int, group_size: int, folder: Path) -> None:
    """One PNG per 16 images (a group of 16, four groups of 4, ... sixteen single
    images), 4 per row with white gaps, captioned with the class of each group."""
    per_file = max(1, GRID_IMAGES // group_size)
    for b in range(0, len(labels), per_file):
        chunk_labels = labels[b:b + per_file]
        members = images[b * group_size:(b + len(chunk_labels)) * group_size]
        g0, g1 = first_group + b, first_group + b + len(chunk_labels) - 1
        if g0 == g1:
            name, text = f"group_{g0:06d}_class_{chunk_labels[0]}.png", f"group {g0}: class {chunk_labels[0]}"
        else:
            name = f"groups_{g0:06d}-{g1:06d}.png"
            text = f"groups {g0}-{g1}: classes {','.join(map(str, chunk_labels))}"
        _save_png(captioned(grid_image(members, GRID_COLS, gap=2), text), folder / name)


def _save_png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp)


def write_npz_streaming(path: Path, chunks, count: int, shape, labels: np.ndarray) -> str:
    """``np.savez``-compatible npz (arr_0 uint8 NHWC, arr_1 labels) written chunk by
    chunk, so 50k images never sit in memory at once; atomic (temp name + rename).
    Returns the sha256 of the image bytes written (``images_digest`` reads it back)."""
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                    "shape": (count, *shape)})
            for chunk in chunks:
                data = np.ascontiguousarray(chunk, dtype=np.uint8).tobytes()
                digest.update(data)
                f.write(data)
        with zf.open("arr_1.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, labels.astype(np.int64))
    return digest.hexdigest()


def images_digest(path: Path, block: int = 1 << 26) -> str:
    """The sha256 of an npz's arr_0 data, read back from the disk in blocks; zipfile
    checks the member's CRC as it reads, so a file that differs from what was written
    raises (``zipfile.BadZipFile``). The header is version 1.0, as ``write_npz_streaming``
    writes it."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


# --------------------------------------------------------------------------- #
#  The whole job                                                               #
# --------------------------------------------------------------------------- #
@dataclass
class SampleJob:
    """Everything that determines the samples; stored as OUT/sample_config.json so a
    rerun of the same command resumes and a different one is refused."""

    ckpt: str
    weights: str
    model: dict
    labels: list  # one class per group
    group_size: int
    cfg_scale: float
    cfg_channels: int | None
    guidance_interval: tuple
    cond_group_size: int
    uncond_group_size: int
    objective: str
    sampler: str
    steps: int
    seed: int
    vae: str
    vae_scale: float
    chunk_groups: int
    sample_ids: str = "fixed"  # defaults.SAMPLE_IDS
    precision: str = "fp32"  # defaults.PRECISIONS

    @property
    def num_images(self) -> int:
        return len(self.labels) * self.group_size

    @property
    def num_chunks(self) -> int:
        return math.ceil(len(self.labels) / self.chunk_groups)

    def chunk_images(self, k: int) -> int:
        return (min((k + 1) * self.chunk_groups, len(self.labels)) - k * self.chunk_groups) * self.group_size


def run_sampling(job: SampleJob, model, out_dir, batch_size: int = 64, save_images: bool = False,
                 vae_batch_size: int = 32, cpu: bool = False, keep_chunks: bool = False) -> dict:
    """Sample every chunk of groups not yet on disk (chunks are spread over the
    processes of an `accelerate launch`), then write OUT/samples.npz and labels.npy,
    read them back, record them (``SAMPLES_RECORD``) and remove the chunks (unless
    ``keep_chunks``). A rerun of a finished job does nothing."""
    state = process_state(cpu)
    out = Path(out_dir)
    config_file = out / SAMPLE_CONFIG
    record = json.loads(json.dumps(asdict(job)))  # tuples -> lists, as read back
    # every rank checks before anyone writes, so that a refusal stops all of them
    check_output_dir(out, config_file, record, "--out", "samples")
    vae = load_vae(job.vae, state.device)  # a bad --vae must not leave a config behind
    if vae is not None and vae.config.latent_channels != model.in_channels:
        raise ValueError(f"--vae {job.vae}: its {vae.config.latent_channels} latent channels do not fit the "
                         f"model's {model.in_channels}")
    lock = take_job_lock(out, "--out", state)
    try:
        return _sample_chunks(job, model, out, state, vae, batch_size, save_images, vae_batch_size, keep_chunks)
    finally:
        lock.release()


def chunk_key(job: SampleJob, k: int) -> str:
    """What chunk k of ``job`` is: the sha256 of the job's configuration and k, stored in
    the chunk, so that a chunk from another job (or another chunk's file) is never joined;
    k = -1: the joined samples (``SAMPLES_RECORD``)."""
    record = json.dumps(json.loads(json.dumps(asdict(job))), sort_keys=True)
    return hashlib.sha256(f"{record}\0{k}".encode()).hexdigest()


def _chunk_ok(path: Path, job: SampleJob, k: int) -> bool:
    """A chunk file that is intact (its digest), of this job and this chunk (its key), and
    holds its images and labels; anything else is sampled again."""
    try:
        arrays = load_arrays(path)
    except (IntegrityError, OSError):
        return False
    count = job.chunk_images(k)
    return (str(arrays.get("key")) == chunk_key(job, k) and arrays["arr_0"].shape[0] == count
            and arrays["arr_1"].shape == (count,))


def _finished(job: SampleJob, out: Path) -> bool:
    """OUT holds this job's joined and verified samples (its record says so, and the
    file is the size it was written at)."""
    try:
        record = read_json_file(out / SAMPLES_RECORD, "--out")
        return (record.get("job") == chunk_key(job, -1) and (out / SAMPLES_FILE).stat().st_size == record["bytes"]
                and (out / LABELS_FILE).is_file())
    except (OSError, ValueError, KeyError, AttributeError):
        return False


def _sample_chunks(job: SampleJob, model, out: Path, state, vae, batch_size, save_images, vae_batch_size,
                   keep_chunks: bool) -> dict:
    chunks_dir, config_file = out / CHUNKS_DIR, out / SAMPLE_CONFIG
    result = dict(out=str(out), samples=str(out / SAMPLES_FILE), images=job.num_images, groups=len(job.labels),
                  processes=state.num_processes)
    if _finished(job, out):
        return result
    if state.is_main_process:
        for d in (chunks_dir, out / GRIDS_DIR) + ((out / IMAGES_DIR,) if save_images else ()):
            d.mkdir(parents=True, exist_ok=True)
        if not config_file.exists():
            write_json_atomic(json.loads(json.dumps(asdict(job))), config_file)
    state.wait_for_everyone()

    model = model.to(state.device)
    objective = job_objective(job, model)
    mine = [k for k in range(job.num_chunks) if k % state.num_processes == state.process_index]
    todo = [k for k in mine if not _chunk_ok(chunk_file(out, k), job, k)]
    bar = tqdm(total=sum(job.chunk_images(k) for k in todo) * state.num_processes, unit="img", desc="sampling",
               disable=not state.is_main_process)
    for k in todo:
        _sample_chunk(job, k, model, objective, out, state, vae, batch_size, save_images, vae_batch_size,
                      lambda n: bar.update(n * state.num_processes))
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        _join_chunks(job, out)
        if not keep_chunks:  # joined and read back: the chunks are a second copy of the samples
            shutil.rmtree(chunks_dir, ignore_errors=True)
    wait_for_main(state, "sample: joining the chunks into samples.npz")
    return result


def job_objective(job: SampleJob, model):
    """The objective a job samples with (DDPM respaced to the job's steps)."""
    return create(job.objective, model.learn_sigma, job.steps)


def _sample_chunk(job: SampleJob, k: int, model, objective, out: Path, state, vae, batch_size, save_images,
                  vae_batch_size, progress) -> None:
    """Sample, decode and write chunk k (its grids, PNGs, then the chunk file)."""
    groups_per_batch = max(1, batch_size // job.group_size)
    g0, g1 = k * job.chunk_groups, min((k + 1) * job.chunk_groups, len(job.labels))
    guidance = Guidance.of_job(job)
    images = []
    for b0 in range(g0, g1, groups_per_batch):
        b1 = min(b0 + groups_per_batch, g1)
        labels = torch.tensor(job.labels[b0:b1]).repeat_interleave(job.group_size)
        z = sample_groups(model, objective, labels, b0 * job.group_size, job.group_size, guidance, job.seed,
                          job.sampler, job.steps, state.device, sample_ids=job.sample_ids, precision=job.precision)
        images.append(decode(vae, z.to(state.device), job.vae_scale, vae_batch_size).numpy())
        progress(len(labels))
    images = np.concatenate(images)
    write_grids(images, job.labels[g0:g1], g0, job.group_size, out / GRIDS_DIR)
    if save_images:
        for i, img in enumerate(images):
            _save_png(img, image_file(out, g0 * job.group_size + i))
    labels = np.repeat(np.array(job.labels[g0:g1], np.int64), job.group_size)
    # written atomically: a chunk on disk is a finished chunk; its digest and key are checked when joined
    save_arrays(chunk_file(out, k), arr_0=images, arr_1=labels, key=np.array(chunk_key(job, k)))


def _join_chunks(job: SampleJob, out: Path) -> None:
    """OUT/samples.npz and OUT/labels.npy from the job's chunks, each read once; the
    images read back and compared, then recorded (the job's key, the file's size and
    the images' sha256) in ``SAMPLES_RECORD``."""
    all_labels = np.repeat(np.array(job.labels, np.int64), job.group_size)

    def read_chunk(k: int) -> np.ndarray:
        path = chunk_file(out, k)
        arrays = load_arrays(path)
        if str(arrays.get("key")) != chunk_key(job, k):
            raise IntegrityError(path, "it belongs to another sampling job")
        return arrays["arr_0"]

    first = read_chunk(0)  # gives the image shape
    chunks = itertools.chain([first], (read_chunk(k) for k in range(1, job.num_chunks)))
    npz = out / SAMPLES_FILE
    written = write_npz_streaming(npz, chunks, job.num_images, first.shape[1:], all_labels)
    with atomic_path(out / LABELS_FILE) as tmp:
        np.save(tmp, all_labels)
    if images_digest(npz) != written:
        raise IntegrityError(npz, "its images read back differ from the chunks written", "run the command again")
    write_json_atomic(dict(job=chunk_key(job, -1), bytes=npz.stat().st_size, images_sha256=written),
                      out / SAMPLES_RECORD)


def build_job(ckpt, *, weights="ema", model_name=None, group_size=None, num_samples=None,
              class_labels=None, random_labels=False, cfg_scale=CFG_SCALE, cfg_channels=None,
              guidance_interval=(0.0, 1.0), cond_group_size=None, uncond_group_size=None, sampler=None, steps=None,
              seed=0, vae=None, chunk_groups=None, align_labels=None, sample_ids=None, precision="fp32", loaded=None,
              warn=print):
    """Load the checkpoint and resolve every default into a ``SampleJob``.

    The GroupDiff authors' evaluation settings are ``defaults.SAMPLE_PRESETS``
    (``build_job(ckpt, **SAMPLE_PRESETS["release-sit"], num_samples=50000)``).
    ``sample_ids`` defaults to "per-call" for the authors' released files (how they
    were trained and evaluated) and to "fixed" for everything else.

    ``align_labels`` M: image i gets class (i // M) mod classes, so that runs at every
    group size dividing M sample identical seeds and labels per image. ``loaded``: what
    ``checkpoints.load_model`` returned for ``ckpt`` (several jobs of one checkpoint load
    it once).

    Returns (job, model). Raises ValueError naming the flag for bad input.
    """
    model, info = loaded or load_model(ckpt, weights, model_name)
    train, dataset = info.get("train", {}), info.get("dataset", {})
    trained = int(train.get("group_size", 1))
    n = trained if group_size is None else group_size
    if not 1 <= n <= model.max_group_size:
        raise ValueError(f"--group-size {n} is outside [1, max_group_size={model.max_group_size}] of this checkpoint")
    if n > trained:
        warn(f"warning: --group-size {n} is larger than the group size this checkpoint was trained with ({trained})")
    ema_warning(info, weights, warn)
    for note in info.get("official", {}).get("notes", []):
        warn(note)
    release = train.get("source") == "groupdiff"
    sample_ids = sample_ids or ("per-call" if release else "fixed")
    if sample_ids not in SAMPLE_IDS:
        raise ValueError(f"--sample-ids {sample_ids}: choose from {', '.join(SAMPLE_IDS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision}: choose from {', '.join(PRECISIONS)}")
    labels = _job_labels(model.num_classes, n, num_samples, class_labels, random_labels, align_labels, seed)
    gc, gu = _branch_group_sizes(n, train.get("group_mode"), cond_group_size, uncond_group_size)
    lo, hi = guidance_interval
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"--guidance-interval {lo},{hi}: need 0 <= lo <= hi <= 1 (t = 1 is noise)")
    if cfg_channels is not None and not 1 <= cfg_channels <= model.in_channels:
        raise ValueError(f"--cfg-channels {cfg_channels} is outside [1, {model.in_channels}]")
    objective = of_run(info)
    sampler = sampler or samplers.DEFAULT_SAMPLER[objective]
    samplers.check(sampler, objective, model.config["name"])
    steps = steps or DEFAULT_STEPS
    create(objective, model.learn_sigma, steps)  # a DDPM refuses steps it cannot respace to
    vae = vae or dataset.get("vae", DEFAULT_VAE)
    if (vae == PIXEL) != (model.in_channels == 3 and dataset.get("vae", vae) == PIXEL):
        raise ValueError(f"--vae {vae}: does not fit {model.config['name']} with {model.in_channels} input channels "
                         f"(trained on {dataset.get('vae', 'unknown')} latents)")
    job = SampleJob(
        ckpt=info["checkpoint"], weights=weights, model=model.config, labels=labels, group_size=n,
        cfg_scale=float(cfg_scale), cfg_channels=cfg_channels, guidance_interval=(float(lo), float(hi)),
        cond_group_size=gc, uncond_group_size=gu, objective=objective, sampler=sampler, steps=int(steps),
        seed=int(seed), vae=vae, vae_scale=float(dataset.get("vae_scale", SD_VAE_SCALE)),
        chunk_groups=chunk_groups or max(1, 256 // n), sample_ids=sample_ids, precision=precision)
    return job, model


def _job_labels(num_classes: int, n: int, num_samples, class_labels, random_labels, align_labels, seed) -> list[int]:
    """One class per group, from --align-labels, --class-labels or --num-samples."""
    ways = [flag for flag, v in (("--align-labels", align_labels), ("--class-labels", class_labels),
                                 ("--random-labels", random_labels)) if v]
    if len(ways) > 1:
        raise ValueError(f"{ways[0]} and {ways[1]} conflict: give the labels one way")
    if class_labels and num_samples:
        raise ValueError("--class-labels and --num-samples conflict: --class-labels samples one group per listed class")
    if align_labels:
        if align_labels % n or not num_samples or num_samples % align_labels:
            raise ValueError(f"--align-labels {align_labels}: needs --num-samples, a multiple of it, and a group "
                             f"size dividing it (group size {n})")
        return aligned_labels(num_samples, n, align_labels, num_classes)
    if class_labels:
        return group_labels(num_classes, class_labels=class_labels)
    if num_samples:
        if num_samples % n:
            raise ValueError(f"--num-samples {num_samples} is not a multiple of --group-size {n}")
        return group_labels(num_classes, num_samples // n, random_labels=random_labels, seed=seed)
    raise ValueError("give --num-samples N (class-balanced or --random-labels) or --class-labels A,B,...")


def _branch_group_sizes(n: int, group_mode: str | None, cond: int | None, uncond: int | None) -> tuple[int, int]:
    """Group sizes of the conditional and unconditional branches: GroupDiff-l groups
    only the unconditional one, GroupDiff-f both."""
    gc = cond or (n if group_mode == "f" else 1)
    gu = uncond or n
    for flag, v in (("--cond-group-size", gc), ("--uncond-group-size", gu)):
        if n % v:
            raise ValueError(f"{flag} {v} does not divide --group-size {n}")
    return gc, gu
