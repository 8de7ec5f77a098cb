"""The training loop: GroupDiff-l / -f / plain DiT-SiT with accelerate, exact resume.

Determinism: the data of step s (per process) is ``GroupBatches.batch(s * accum + m)``
and every random draw of the step (diffusion time, noise, sample-embedding rows) comes
from generators seeded with (seed, rank, step, micro-step, stream) (``seeds.py``). A
checkpoint therefore needs only the weights, the EMA, the optimizer and the step to
continue exactly: k steps + resume + k steps equal 2k steps in one go (bitwise on CPU
in fp32).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm import tqdm

from groupdiff_cli import __version__
from groupdiff_cli.data.latent_cache import open_cache
from groupdiff_cli.data.loader import GroupBatches, GroupRecipe, all_records, read_dataset
from groupdiff_cli.data.neighbours import NeighbourBatches, read_table
from groupdiff_cli.evaluation.branch_loss import branch_losses, heldout_latents
from groupdiff_cli.plumbing.defaults import GROUP_MODES, GROUPINGS, NO_DECAY_RULES, STUDY_GROUP_SIZES, TrainOptions
from groupdiff_cli.plumbing.distributed import StopSignals, process_state, take_job_lock, wait_for_main
from groupdiff_cli.plumbing.files import check_free_space, read_json_file, write_json_atomic, write_text_atomic
from groupdiff_cli.plumbing.layout import CONFIG_FILE, EVAL_LOG, METRICS_LOG, checkpoints_dir
from groupdiff_cli.plumbing.seeds import Stream, derived_seed, seed_initialisation
from groupdiff_cli.science.checkpoints import (CheckpointWriter, checkpoint_dirs, checkpoint_space, is_ours,
                                               load_model, load_training_state)
from groupdiff_cli.science.models import MODELS, SAMPLE_EMBED_KEY, create_model
from groupdiff_cli.science.objectives import create as create_objective, for_model
from groupdiff_cli.science.official import describe, load_pretrained

__all__ = ["TrainOptions", "train"]

STOP_POLL_EVERY = 10  # steps between the collective checks for a stop signal when there are several processes


def default_run_name(o: TrainOptions) -> str:
    mode = "base" if o.group_mode == "none" else f"{o.group_mode}{o.group_size}"
    return f"{o.model.replace('/', '-')}-{mode}"


def _no_decay(name: str, p: torch.Tensor, rule: str = "ours") -> bool:
    """Parameters without weight decay. ours: norms, biases and embedding tables; release
    (the GroupDiff authors' optimiser): also every parameter whose name holds "embed" (the
    patch embedding and the timestep MLP too)."""
    if rule == "release":
        return p.ndim < 2 or "embed" in name
    return p.ndim < 2 or "embedding_table" in name or name.startswith("s_embedder")


def _validate(o: TrainOptions, world: int) -> None:
    if o.run_name is not None and (o.run_name in ("", ".", "..") or Path(o.run_name).name != o.run_name):
        raise ValueError(f"--run-name {o.run_name}: must be a folder name inside --results-dir (no '/', no '..')")
    if o.model not in MODELS:
        raise ValueError(f"--model {o.model}: unknown model; valid models: {', '.join(MODELS)}")
    if o.group_mode not in GROUP_MODES:
        raise ValueError(f"--group-mode {o.group_mode}: choose from {', '.join(GROUP_MODES)}")
    if not 1 <= o.group_size <= o.max_group_size:
        raise ValueError(f"--group-size {o.group_size} is outside [1, max_group_size={o.max_group_size}]")
    unit = world * o.grad_accum * (o.group_size if o.group_mode != "none" else 1)
    if o.global_batch_size % unit:
        raise ValueError(f"--global-batch-size {o.global_batch_size} is not a multiple of processes ({world}) x "
                         f"--grad-accum ({o.grad_accum}) x --group-size ({o.group_size}) = {unit}")
    if o.no_decay_rule not in NO_DECAY_RULES:
        raise ValueError(f"--no-decay-rule {o.no_decay_rule}: choose from {', '.join(NO_DECAY_RULES)}")
    if o.grouping not in (None, *GROUPINGS):
        raise ValueError(f"--grouping {o.grouping}: choose from {', '.join(GROUPINGS)}")
    inf = math.inf
    # (flag, value, low, high, low excluded, high excluded)
    ranges = [("--group-ratio", o.group_ratio, 0, 1, False, False), ("--lr", o.lr, 0, 1, True, False),
              ("--weight-decay", o.weight_decay, 0, inf, False, True), ("--grad-clip", o.grad_clip, 0, inf, True, True),
              ("--ema-decay", o.ema_decay, 0, 1, False, True), ("label_dropout", o.label_dropout, 0, 1, False, True),
              ("--similarity-threshold", o.similarity_threshold, -1, 1, False, False),
              ("--timestep-variance", o.timestep_variance, 0, 1000, False, False),
              ("--sample-embed-std", o.sample_embed_std, 0, inf, False, True),
              ("--init-sample-embed-std", o.init_sample_embed_std, 0, inf, False, True),
              ("beta1", o.beta1, 0, 1, False, True), ("beta2", o.beta2, 0, 1, False, True)]
    for flag, v, lo, hi, lo_open, hi_open in ranges:
        if not (math.isfinite(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)):
            raise ValueError(f"{flag} {v} is outside {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep the JSON-lines rows of ``path`` up to ``step``: a resumed run logs the
    steps after its checkpoint again, so each step is listed once."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(ln + "\n" for ln in kept))


def _heldout_eval(o: TrainOptions, info: dict, ema, objective, run_dir: Path):
    """A function(step) that appends the held-out per-branch denoising loss of the EMA
    weights (what `sample` uses) to RUN/eval.jsonl (see `branch_loss`)."""
    sizes = [n for n in STUDY_GROUP_SIZES if n <= o.max_group_size]
    x0, labels = heldout_latents(info, o.eval_images, max(sizes), o.similarity_threshold, o.seed)

    def evaluate(step: int) -> float:
        """Returns the seconds it took (kept out of the logged throughput)."""
        t0 = time.perf_counter()
        rows = branch_losses(ema, objective, x0, labels, sizes, seed=o.seed)
        with open(run_dir / EVAL_LOG, "a") as f:
            f.write(json.dumps(dict(step=step, weights="ema", images=len(labels), rows=rows)) + "\n")
        return time.perf_counter() - t0

    return evaluate


def _state_checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def train(o: TrainOptions, resume: bool = False, log=print) -> dict:
    """Train; returns a summary. Raises ValueError for bad options (one line each)."""
    state = process_state(o.cpu)
    _validate(o, state.num_processes)
    info = read_dataset(o.data)
    o = resolved(o, info, state.is_main_process, log)
    run = Run(o, state, info)
    # everything that can be checked before the run directory is touched
    batches = run.loader(log)
    heldout = read_dataset(o.eval_data, "--eval-data") if o.eval_data else None
    _check_same_latent_space(info, heldout)
    ckpts = _check_run_dir(o, run.dir, resume)
    # a fine-tuning start is read and checked before the run directory is made
    initial = None if resume or not o.init_from else _initial_model(
        o, run.model_overrides, log if state.is_main_process else lambda m: None, resuming=False)
    lock = take_job_lock(run.dir, "--run-name", state)
    per_rank = sum(info["shard_counts"]) // state.num_processes
    if o.group_buffer > per_rank and o.group_mode != "none" and state.is_main_process:
        log(f"note: --group-buffer {o.group_buffer} exceeds the ~{per_rank} samples each process reads per epoch: "
            f"a window then spans epochs, so an image can appear twice in one window (even in one group)")
    try:
        with StopSignals() as stop:
            _start(run, ckpts if resume else [], log, initial)
            return run.loop(batches, heldout, stop)
    finally:
        batches.close()
        lock.release()


def _start(run: "Run", ckpts: list[Path], log, initial=None) -> None:
    """Start fresh (from ``initial``, the network at step 0), or from the newest checkpoint
    that reads back intact: a damaged one (a flipped byte, a truncated file) is passed
    over for the one before, with a note."""
    for k in range(len(ckpts) - 1, -1, -1):
        try:
            return run.start(ckpts[k], log)
        except ValueError as e:  # IntegrityError included
            if k == 0:
                raise
            if run.state.is_main_process:
                log(f"note: {e}; resuming from {ckpts[k - 1].name} instead")
    run.start(None, log, initial)


def _check_same_latent_space(info: dict, heldout: dict | None) -> None:
    if heldout is None:
        return
    for key in ("vae", "vae_scale", "latent_shape", "num_classes"):
        if heldout.get(key) != info.get(key):
            raise ValueError(f"--eval-data {heldout['dir']}: its {key} is {heldout.get(key)}, the training data's "
                             f"{info.get(key)}; held-out shards must be encoded like the training shards")


def resolved(o: TrainOptions, info: dict, main_process: bool = True, log=print) -> TrainOptions:
    """The options with every default that depends on the data or the model filled in: the
    grouping rule, the objective (chosen here, recorded in config.json, read back by
    sampling) and the run's name. A new value; ``o`` stays as given."""
    grouping = o.grouping or ("similarity" if info.get("embedder_dim") else "random")
    if o.grouping is None and grouping == "random" and o.group_mode != "none" and main_process:
        log("note: the shards have no embeddings, so groups are formed at random (--grouping class is the "
            "paper's better fallback)")
    return replace(o, grouping=grouping, objective=for_model(o.model, o.objective),
                   run_name=o.run_name or default_run_name(o))


def _check_run_dir(o: TrainOptions, run_dir: Path, resume: bool) -> list[Path]:
    """The run directory: new (or one whose start saved no checkpoint), or resumed with
    the same options. Returns its complete checkpoints."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--run-name {run_dir.name}: {run_dir} exists and is not a directory")
    ckpts = checkpoint_dirs(run_dir)
    if resume:
        if not ckpts:
            raise ValueError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
        saved = read_json_file(run_dir / CONFIG_FILE, "--resume")
        # where the run lives and how long it runs may change; options added since it
        # started take their defaults
        free = dict(max_steps=None, results_dir=None, num_workers=None)
        mine = dict(asdict(o), **free)
        theirs = {**asdict(TrainOptions(data=o.data)), **saved.get("train", {}), **free}
        if mine != theirs:
            diff = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise ValueError(f"--resume: options differ from the run in {run_dir}: {', '.join(diff)}")
    elif ckpts:
        raise ValueError(f"--results-dir {run_dir}: a run is already there; pass --resume to continue it "
                         f"or choose another --run-name")
    return ckpts


class Run:
    """One training run: its options (``resolved``), processes, directory, model, EMA and optimizer."""

    def __init__(self, o: TrainOptions, state, info: dict):
        self.o, self.state, self.info = o, state, info
        mp = o.mixed_precision or ("bf16" if torch.cuda.is_available() and not o.cpu else "no")
        self.accelerator = Accelerator(cpu=o.cpu or not torch.cuda.is_available(), mixed_precision=mp,
                                       gradient_accumulation_steps=o.grad_accum, log_with=o.report_to)
        self.dir = Path(o.results_dir) / o.run_name
        latent_c, latent_hw = info["latent_shape"][0], info["latent_shape"][1]
        self.model_overrides = dict(input_size=latent_hw, in_channels=latent_c, num_classes=info["num_classes"],
                                    max_group_size=o.max_group_size)
        self.config = dict(model=None, train=asdict(o), dataset={k: v for k, v in info.items() if k != "skipped"},
                           groupdiff=__version__)
        self.step = 0

    def loader(self, log=print) -> GroupBatches | NeighbourBatches:
        o, state = self.o, self.state
        micro = o.global_batch_size // (state.num_processes * o.grad_accum)
        recipe = GroupRecipe(o.group_mode, o.group_size, o.group_ratio, o.grouping, o.similarity_threshold)
        if o.grouping == "neighbours":
            log = log if state.is_main_process else (lambda m: None)
            table = read_table(self.info, o.neighbours_k)  # a missing or stale table is refused before the cache
            with state.main_process_first():  # one process checks or builds the cache, the others then open it
                data = open_cache(self.info, lambda: all_records(self.info), o.latent_cache, log,
                                  verify=state.is_main_process)
            return NeighbourBatches(self.info, recipe, data, batch_size=micro, seed=o.seed,
                                    num_classes=self.info["num_classes"], rank=state.process_index,
                                    world=state.num_processes, flip=o.flip, label_dropout=o.label_dropout,
                                    k=o.neighbours_k, composition=o.batch_composition, table=table)
        return GroupBatches(self.info, recipe, batch_size=micro, window=o.group_buffer, seed=o.seed,
                            num_classes=self.info["num_classes"], rank=state.process_index,
                            world=state.num_processes, flip=o.flip, label_dropout=o.label_dropout,
                            prefetch=o.num_workers > 0)

    def start(self, ckpt: Path | None, log, initial=None) -> None:
        """Build the model (``initial`` when given), EMA and optimizer (from ``ckpt`` when
        resuming), claim the run directory, and hand everything to accelerate."""
        o, self.log, self.warned = self.o, log, False
        if ckpt is not None:  # a run fine-tuned from a file without learned variance keeps its output layer
            saved = read_json_file(self.dir / CONFIG_FILE, "--resume").get("model") or {}
            self.model_overrides["learn_sigma"] = saved.get("learn_sigma", True)
        model = initial if initial is not None and ckpt is None else _initial_model(
            o, self.model_overrides, log if self.state.is_main_process else lambda m: None, resuming=ckpt is not None)
        self.model_overrides["learn_sigma"] = model.learn_sigma
        self.config["model"] = model.config
        model.gradient_checkpointing = o.gradient_checkpointing
        ema = create_model(o.model, **self.model_overrides).requires_grad_(False)
        ema.load_state_dict(model.state_dict())
        optimizer = _optimizer(model, o)
        self.step = load_training_state(ckpt, model, ema, optimizer) if ckpt is not None else 0
        self.saved_step = self.step if ckpt is not None else None  # the step whose checkpoint is (being) written
        self.writer = CheckpointWriter(self.dir, o.keep_last, o.keep_every)
        if self.state.is_main_process:
            self._claim_dir(model, resuming=ckpt is not None, log=log)
        self.accelerator.wait_for_everyone()
        self.ema = ema.to(self.accelerator.device)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.forward = torch.compile(self.model) if o.compile else self.model
        self.raw = self.accelerator.unwrap_model(self.model)
        self.objective = create_objective(o.objective, learn_sigma=self.raw.learn_sigma)
        if o.report_to:
            self.accelerator.init_trackers(o.run_name, config={k: v for k, v in asdict(o).items() if v is not None})

    def _claim_dir(self, model, resuming: bool, log) -> None:
        # a run's logs hold each step once: rows past the checkpoint are logged again
        # (a fresh start drops the rows of an earlier start that saved no checkpoint)
        for name in (METRICS_LOG, EVAL_LOG):
            _drop_rows_after(self.dir / name, self.step)
        # model, EMA and two Adam moments in fp32: refuse to train steps that cannot be saved
        o = self.o
        need, why = checkpoint_space(self.dir, 4 * 4 * sum(p.numel() for p in model.parameters()), self.step,
                                     o.max_steps, o.ckpt_every, o.keep_last, o.keep_every)
        check_free_space(self.dir, need, "--results-dir", why)
        if resuming:
            log(f"resuming {self.dir} from step {self.step}")
        else:  # the job has started: only now is the run directory claimed
            checkpoints_dir(self.dir).mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.config, self.dir / CONFIG_FILE)

    def loop(self, batches: GroupBatches, heldout: dict | None, stop: StopSignals) -> dict:
        """Train to ``max_steps``: log, evaluate and checkpoint on their schedules. A stop
        signal (preemption) ends the loop after the step in progress, with a checkpoint:
        the summary's ``stopped_by`` names the signal."""
        o, state = self.o, self.state
        main = state.is_main_process
        bar = tqdm(total=o.max_steps, initial=self.step, unit="step", disable=not main)
        window = MetricsWindow(self.accelerator)
        stopped_by = None
        evaluate = _heldout_eval(o, heldout, self.ema, self.objective, self.dir) if main and heldout else None
        while self.step < o.max_steps:
            # several processes agree on a stop with a collective (a host sync): every few steps
            if state.num_processes == 1 or self.step % STOP_POLL_EVERY == 0:
                stopped_by = stop.requested(self.accelerator)
            if stopped_by:
                bar.close()
                if self.saved_step != self.step:  # known alike on every rank, unlike the filesystem
                    self.save()
                self.finish_saving()
                return dict(run_dir=str(self.dir), step=self.step, processes=state.num_processes,
                            stopped_by=stopped_by)
            self.train_step(batches, window)
            bar.update(1)
            step = self.step
            if step % o.log_every == 0 or step == o.max_steps:
                rec = window.row(step, o, batches)
                if main:
                    with open(self.dir / METRICS_LOG, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    mates = rec["mates_similarity"] or {}
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.1f}",
                                    **({"mates_cos": f"{mates['mean']:.2f}"} if "mean" in mates else {}))
                    self._warn_if_groups_are_random(batches)
                if o.report_to:
                    self.accelerator.log({k: v for k, v in rec.items() if isinstance(v, float)}, step=step)
            if evaluate and (step % (o.eval_every or o.ckpt_every) == 0 or step == o.max_steps):
                window.t_last += evaluate(step)  # kept out of the logged throughput
            if step % o.ckpt_every == 0 or step == o.max_steps:
                self.save()
        bar.close()
        self.finish_saving()
        if o.report_to:
            self.accelerator.end_training()
        return dict(run_dir=str(self.dir), step=self.step, processes=state.num_processes)

    def train_step(self, batches: GroupBatches, window: "MetricsWindow") -> None:
        """One optimizer step (``grad_accum`` micro-steps), then the EMA."""
        o, state, accelerator = self.o, self.state, self.accelerator
        for m in range(o.grad_accum):
            batch = batches.batch(self.step * o.grad_accum + m, accelerator.device)
            window.data_wait = max(window.data_wait, batches.last_wait)
            x0, t_net, xt, noise = self._noisy(batch, m)
            ids_gen = torch.Generator(device=accelerator.device).manual_seed(
                derived_seed(o.seed, state.process_index, self.step, m, Stream.SAMPLE_IDS))
            with accelerator.accumulate(self.model), accelerator.autocast():
                out = self.forward(xt, t_net, batch.labels, group_size=batch.group_sizes, generator=ids_gen)
                per_image = self.objective.loss(out.float(), x0, xt, t_net, noise)
                loss = per_image.mean()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"step {self.step}: the loss is {loss.item()}; stopping. The last "
                                             f"checkpoint in {self.dir / 'checkpoints'} is intact")
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), o.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            window.add_micro_step(loss, per_image, batch)
        window.add_step(grad_norm, o.global_batch_size)
        with torch.no_grad():  # EMA after every optimizer step
            for pe, pm in zip(self.ema.parameters(), self.raw.parameters()):
                pe.lerp_(pm.detach().to(pe.dtype), 1 - o.ema_decay)
        self.step += 1

    def _noisy(self, batch, m: int):
        """The micro-step's diffusion times (one per group, jittered by
        --timestep-variance for group members), noise and noisy input."""
        o = self.o
        gen = torch.Generator().manual_seed(derived_seed(o.seed, self.state.process_index, self.step, m,
                                                         Stream.DIFFUSION))
        x0, b = batch.latents, batch.latents.shape[0]
        sizes = torch.tensor(batch.group_sizes)
        t = torch.rand(len(sizes), generator=gen).repeat_interleave(sizes)
        jitter = torch.randn(b, generator=gen) * (o.timestep_variance / 1000)
        t = t + jitter * (sizes.repeat_interleave(sizes) > 1)  # singles keep their own time
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        xt, t_net = self.objective.noisy(x0, t, noise)
        return x0, t_net, xt, noise

    def save(self) -> None:
        sums = gather_object([_state_checksum(self.raw)])  # ranks must hold the same weights
        if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
            raise RuntimeError(f"step {self.step}: the processes' weights differ ({sums}); not saving")
        if self.state.is_main_process:  # written in the background: no process waits for the disk
            self.writer.submit(self.step, self.raw, self.ema, self.optimizer,
                               dict(data_position=self.step * self.o.grad_accum, processes=self.state.num_processes,
                                    param_sums=sums))
        self.saved_step = self.step

    def finish_saving(self) -> None:
        """Return once the last checkpoint is on disk, on every process (the end of the
        loop, and the stop path before exit code 75)."""
        if self.state.is_main_process:
            self.writer.wait()
        wait_for_main(self.state, "train: writing the last checkpoint")

    def _warn_if_groups_are_random(self, batches: GroupBatches) -> None:
        sim, mates = batches.similarity, batches.mates
        if sim and mates and "mean" in mates and mates["mean"] - sim["median"] < 0.05 and not self.warned:
            self.warned = True
            self.log(f"warning: group mates are barely more alike than random pairs (mean cosine to the anchor "
                     f"{mates['mean']:.2f}, random pairs' median {sim['median']:.2f}): groups this close to random "
                     f"groups gain little (the paper: random groups 3.57 FID vs similarity groups 2.42)")
        if sim and sim["passing"] > 0.9 and not self.warned:
            self.warned = True
            self.log(f"warning: {sim['passing']:.0%} of the pairs in a window pass --similarity-threshold "
                     f"{self.o.similarity_threshold} (median cosine {sim['median']:.2f}): similarity groups are "
                     f"nearly random groups. Raise the threshold, or encode with a pretrained embedder")


class MetricsWindow:
    """What one row of metrics.jsonl sums up: the steps since the previous row."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        # per branch: loss sum and count of images in groups, then of single images
        self.branch_sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.losses, self.grad_norms, self.grouped = [], [], []
        self.t_last, self.images, self.data_wait = now, 0, 0.0  # data_wait: the longest wait for a batch
        self.branch_sums.zero_()

    def add_micro_step(self, loss, per_image, batch) -> None:
        self.losses.append(loss.detach())
        self.grouped.append(batch.grouped_fraction)
        sizes = torch.tensor(batch.group_sizes)
        in_group = (sizes.repeat_interleave(sizes) > 1).to(per_image.device)
        per_image = per_image.detach()
        self.branch_sums += torch.stack([per_image[in_group].sum(), in_group.sum(),
                                         per_image[~in_group].sum(), (~in_group).sum()]).double()

    def add_step(self, grad_norm, images: int) -> None:
        if grad_norm is not None:
            self.grad_norms.append(grad_norm.detach().float())
        self.images += images

    def row(self, step: int, o: TrainOptions, batches: GroupBatches) -> dict:
        """The row (gathered over processes), then start a new window."""
        # the mean over ranks of each rank's mean loss (equal micro-batch sizes)
        every = self.accelerator.gather(torch.stack(self.losses).mean().reshape(1)).float()
        sums = self.accelerator.reduce(self.branch_sums, reduction="sum").tolist()
        now = time.perf_counter()
        rec = dict(step=step, loss=float(every.mean()), loss_per_rank=[float(v) for v in every],
                   # per branch: images in groups (GroupDiff-l: null label) and single images
                   loss_grouped=sums[0] / sums[1] if sums[1] else None,
                   loss_single=sums[2] / sums[3] if sums[3] else None,
                   grad_norm=float(torch.stack(self.grad_norms).mean()) if self.grad_norms else None, lr=o.lr,
                   images_per_s=self.images / (now - self.t_last),
                   grouped_fraction=sum(self.grouped) / len(self.grouped),
                   similarity=batches.similarity, mates_similarity=batches.mates, data_wait_s=self.data_wait)
        self._reset(now)
        return rec


def _initial_model(o: TrainOptions, overrides: dict, log, resuming: bool):
    """The network at step 0: --init-from (fine-tuning), or a seeded initialisation.
    A resumed run starts from the latter and then loads its checkpoint."""
    if resuming or not o.init_from:
        seed_initialisation(o.seed)
        model = create_model(o.model, **overrides)
        if o.sample_embed_std != 0.02:  # the default init stays bitwise as before
            with torch.no_grad():
                gen = torch.Generator().manual_seed(derived_seed(o.seed, Stream.SAMPLE_EMBED_INIT))
                model.s_embedder.weight.normal_(0, o.sample_embed_std, generator=gen)
        return model
    path = Path(o.init_from)
    ours = is_ours(path)
    if ours:
        src, info = load_model(path, "ema", flag="--init-from")
        theirs = info["model"]["name"].split("-")[0]
        if theirs != o.model.split("-")[0]:
            raise ValueError(f"--init-from {path}: a {theirs} run, and --model {o.model} is not; fine-tune it with "
                             f"--model {theirs}-...")
    else:
        src, desc = load_pretrained(path, name=o.model, max_group_size=o.max_group_size)
    bad = [k for k, v in src.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"--init-from {path}: {len(bad)} tensor(s) hold NaN or Inf ({', '.join(bad[:3])}); "
                         f"refusing to start from it")
    # the output layer as the file has it: REPA's and the release's SiT learn no variance
    model = create_model(o.model, **dict(overrides, learn_sigma=src.learn_sigma))
    table = src.state_dict()[SAMPLE_EMBED_KEY].shape[0]
    if table != o.max_group_size:
        raise ValueError(f"--init-from {path}: its sample-embedding table has {table} rows; pass --max-group-size "
                         f"{table}")
    try:  # foreign files without a sample table: s_embedder zero, so step 0 equals the pretrained model
        model.load_state_dict(src.state_dict())
    except RuntimeError as e:
        why = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise ValueError(f"--init-from {path}: does not fit {o.model} on this data ({why})") from None
    if not ours:
        if desc["new_tensors"] and o.init_sample_embed_std > 0:  # the authors' fine-tuning: N(0, 0.02)
            with torch.no_grad():
                gen = torch.Generator().manual_seed(derived_seed(o.seed, Stream.SAMPLE_EMBED_INIT))
                model.s_embedder.weight.normal_(0, o.init_sample_embed_std, generator=gen)
        for note in desc["notes"]:
            log(note)
        log(f"initialised from {path} ({describe(desc)}); new tensors: {desc['new_tensors']}")
    return model


def _optimizer(model, o: TrainOptions) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p, o.no_decay_rule) else decay).append(p)
    return torch.optim.AdamW([dict(params=decay, weight_decay=o.weight_decay),
                              dict(params=no_decay, weight_decay=0.0)], lr=o.lr, betas=(o.beta1, o.beta2))
