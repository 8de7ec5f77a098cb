"""The training loop: GroupDiff-l / -f / plain DiT-SiT with accelerate, exact resume.

Determinism: the data of step s (per process) is ``GroupBatches.batch(s * accum + m)``
and every random draw of the step (diffusion time, noise, sample-embedding rows) comes
from generators seeded with (seed, rank, step, micro-step). A checkpoint therefore
needs only the weights, the EMA, the optimizer and the step to continue exactly:
k steps + resume + k steps equal 2k steps in one go (bitwise on CPU in fp32).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from groupdiff_cli import __version__
from groupdiff_cli.checkpoints import CHECKPOINT_PREFIX, checkpoint_dirs
from groupdiff_cli.data import GroupBatches, derived_seed, read_dataset
from groupdiff_cli.distributed import take_job_lock
from groupdiff_cli.files import check_free_space, read_json_file, write_json_atomic, write_text_atomic
from groupdiff_cli.models import FAMILIES, MODELS, create_model, load_pretrained, read_safetensors
from groupdiff_cli.objectives import DDPM, Flow


@dataclass
class TrainOptions:
    data: str
    model: str = "SiT-XL/2"
    results_dir: str = "runs"
    run_name: str | None = None
    objective: str | None = None  # default: the model family's
    group_mode: str = "l"  # l | f | none
    group_size: int = 4
    group_ratio: float = 0.1
    grouping: str | None = None  # similarity | class | random; default similarity when embeddings exist
    similarity_threshold: float = 0.7
    group_buffer: int = 20_000
    timestep_variance: float = 0.0
    max_group_size: int = 16
    global_batch_size: int = 256
    grad_accum: int = 1
    max_steps: int = 400_000
    lr: float = 1e-4
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 3.0
    ema_decay: float = 0.9999
    mixed_precision: str | None = None  # no | bf16 | fp16; default bf16 on GPU
    label_dropout: float = 0.1
    flip: bool = True
    gradient_checkpointing: bool = False
    compile: bool = False
    init_from: str | None = None
    ckpt_every: int = 5000
    keep_last: int = 2
    keep_every: int | None = None
    log_every: int = 100
    report_to: str | None = None
    seed: int = 0
    cpu: bool = False
    sample_embed_std: float = 0.02  # init of the sample-embedding rows (method.md §2); ignored with --init-from
    eval_data: str | None = None  # held-out `encode` shards: per-branch denoising loss every eval_every steps
    eval_every: int | None = None  # default: ckpt_every
    eval_images: int = 256


def default_run_name(o: TrainOptions) -> str:
    mode = "base" if o.group_mode == "none" else f"{o.group_mode}{o.group_size}"
    return f"{o.model.replace('/', '-')}-{mode}"


def _no_decay(name: str, p: torch.Tensor) -> bool:
    """Norms, biases and embedding tables get no weight decay."""
    return p.ndim < 2 or "embedding_table" in name or name.startswith("s_embedder")


def _validate(o: TrainOptions, world: int) -> None:
    if o.model not in MODELS:
        raise ValueError(f"--model {o.model}: unknown model; valid models: {', '.join(MODELS)}")
    if o.group_mode not in ("l", "f", "none"):
        raise ValueError(f"--group-mode {o.group_mode}: choose l, f or none")
    if not 1 <= o.group_size <= o.max_group_size:
        raise ValueError(f"--group-size {o.group_size} is outside [1, max_group_size={o.max_group_size}]")
    unit = world * o.grad_accum * (o.group_size if o.group_mode != "none" else 1)
    if o.global_batch_size % unit:
        raise ValueError(f"--global-batch-size {o.global_batch_size} is not a multiple of processes ({world}) x "
                         f"--grad-accum ({o.grad_accum}) x --group-size ({o.group_size}) = {unit}")
    if o.grouping not in (None, "similarity", "class", "random"):
        raise ValueError(f"--grouping {o.grouping}: choose similarity, class or random")
    inf = math.inf
    # (flag, value, low, high, low excluded, high excluded)
    ranges = [("--group-ratio", o.group_ratio, 0, 1, False, False), ("--lr", o.lr, 0, 1, True, False),
              ("--weight-decay", o.weight_decay, 0, inf, False, True), ("--grad-clip", o.grad_clip, 0, inf, True, True),
              ("--ema-decay", o.ema_decay, 0, 1, False, True), ("label_dropout", o.label_dropout, 0, 1, False, True),
              ("--similarity-threshold", o.similarity_threshold, -1, 1, False, False),
              ("--timestep-variance", o.timestep_variance, 0, 1000, False, False),
              ("--sample-embed-std", o.sample_embed_std, 0, inf, False, True),
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
    from groupdiff_cli.branch_loss import branch_losses, heldout_latents

    sizes = [n for n in (1, 2, 4, 8, 16) if n <= o.max_group_size]
    x0, labels = heldout_latents(info, o.eval_images, max(sizes), o.similarity_threshold, o.seed)

    def evaluate(step: int) -> float:
        """Returns the seconds it took (kept out of the logged throughput)."""
        t0 = time.perf_counter()
        rows = branch_losses(ema, objective, x0, labels, sizes, seed=o.seed)
        with open(run_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(dict(step=step, weights="ema", images=len(labels), rows=rows)) + "\n")
        return time.perf_counter() - t0

    return evaluate


def _load_checkpoint(ckpt: Path, model, ema, optimizer) -> int:
    """Weights, EMA and optimizer state of a checkpoint; returns its step. A file that
    cannot be read (corrupt, foreign, or a pickle of anything but tensors) is a one-line
    ValueError naming it."""
    for name, net in (("model.safetensors", model), ("ema.safetensors", ema)):
        try:
            net.load_state_dict(read_safetensors(ckpt / name))
        except RuntimeError as e:
            raise ValueError(f"--resume: {ckpt / name} does not fit the model ({str(e).splitlines()[0]})") from None
    try:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    except Exception as e:  # refused pickles, truncated files, another model's optimizer
        raise ValueError(f"--resume: {ckpt / 'optimizer.pt'}: cannot load ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    step = read_json_file(ckpt / "state.json", "--resume").get("step")
    if not isinstance(step, int):
        raise ValueError(f"--resume: {ckpt / 'state.json'} has no step")
    return step


def _state_checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def train(o: TrainOptions, resume: bool = False, log=print) -> dict:
    """Train; returns a summary. Raises ValueError for bad options (one line each)."""
    from accelerate import Accelerator

    from groupdiff_cli.distributed import process_state

    state = process_state(o.cpu)
    _validate(o, state.num_processes)
    info = read_dataset(o.data)
    grouping = o.grouping or ("similarity" if info.get("embedder_dim") else "random")
    if o.grouping is None and grouping == "random" and o.group_mode != "none" and state.is_main_process:
        log("note: the shards have no embeddings, so groups are formed at random (--grouping class is the "
            "paper's better fallback)")
    o.grouping = grouping
    o.objective = o.objective or FAMILIES[MODELS[o.model]["family"]]
    mp = o.mixed_precision or ("bf16" if torch.cuda.is_available() and not o.cpu else "no")
    accelerator = Accelerator(cpu=o.cpu or not torch.cuda.is_available(), mixed_precision=mp,
                              gradient_accumulation_steps=o.grad_accum, log_with=o.report_to)
    run_dir = Path(o.results_dir) / (o.run_name or default_run_name(o))
    o.run_name = run_dir.name
    latent_c, latent_hw = info["latent_shape"][0], info["latent_shape"][1]
    model_overrides = dict(input_size=latent_hw, in_channels=latent_c, num_classes=info["num_classes"],
                           max_group_size=o.max_group_size)
    config = dict(model=None, train=asdict(o), dataset={k: v for k, v in info.items() if k not in ("skipped",)},
                  groupdiff=__version__)

    # everything that can be checked before the run directory is touched
    micro = o.global_batch_size // (state.num_processes * o.grad_accum)
    batches = GroupBatches(info, state.process_index, state.num_processes, micro, o.group_size, o.group_mode,
                           o.group_ratio, grouping, o.similarity_threshold, o.group_buffer, o.seed,
                           info["num_classes"], flip=o.flip, label_dropout=o.label_dropout)
    heldout = read_dataset(o.eval_data, "--eval-data") if o.eval_data else None
    ckpts = _check_run_dir(o, run_dir, resume)
    lock = take_job_lock(run_dir, "--run-name", state)
    per_rank = sum(info["shard_counts"]) // state.num_processes
    if o.group_buffer > per_rank and o.group_mode != "none" and state.is_main_process:
        log(f"note: --group-buffer {o.group_buffer} exceeds the ~{per_rank} samples each process reads per epoch: "
            f"a window then spans epochs, so an image can appear twice in one window (even in one group)")
    try:
        return _train(o, resume, log, state, accelerator, info, heldout, run_dir, model_overrides, config, ckpts,
                      batches)
    finally:
        batches.close()
        lock.release()


def _check_run_dir(o: TrainOptions, run_dir: Path, resume: bool) -> list[Path]:
    """The run directory: new (or one whose start saved no checkpoint), or resumed with
    the same options. Returns its complete checkpoints."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--run-name {run_dir.name}: {run_dir} exists and is not a directory")
    ckpts = checkpoint_dirs(run_dir)
    if resume:
        if not ckpts:
            raise ValueError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
        saved = read_json_file(run_dir / "config.json", "--resume")
        # where the run lives and how long it runs may change; options added since it
        # started take their defaults
        free = dict(max_steps=None, results_dir=None)
        mine = dict(asdict(o), **free)
        theirs = {**asdict(TrainOptions(data=o.data)), **saved.get("train", {}), **free}
        if mine != theirs:
            diff = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise ValueError(f"--resume: options differ from the run in {run_dir}: {', '.join(diff)}")
    elif ckpts:
        raise ValueError(f"--results-dir {run_dir}: a run is already there; pass --resume to continue it "
                         f"or choose another --run-name")
    return ckpts


def _train(o, resume, log, state, accelerator, info, heldout, run_dir, model_overrides, config, ckpts,
           batches) -> dict:
    from accelerate.utils import gather_object
    from safetensors.torch import save_file
    from tqdm import tqdm

    if o.init_from and not resume:
        path = Path(o.init_from)
        if path.is_dir() or path.suffix == ".safetensors" and path.parent.name.startswith(CHECKPOINT_PREFIX):
            from groupdiff_cli.checkpoints import load_model

            src, _ = load_model(path, "ema")
            model = create_model(o.model, **model_overrides)
            try:
                model.load_state_dict(src.state_dict())
            except RuntimeError as e:
                raise ValueError(f"--init-from {path}: does not fit {o.model} on this data "
                                 f"({str(e).splitlines()[0]})") from None
        else:
            src, new = load_pretrained(path, name=o.model, max_group_size=o.max_group_size)
            model = create_model(o.model, **model_overrides)
            try:  # s_embedder zero: step 0 equals the pretrained model
                model.load_state_dict(src.state_dict())
            except RuntimeError as e:
                raise ValueError(f"--init-from {path}: does not fit {o.model} on this data "
                                 f"({str(e).splitlines()[0]})") from None
            if state.is_main_process:
                log(f"initialised from {path}; new tensors: {new}")
    else:
        torch.manual_seed(o.seed)
        model = create_model(o.model, **model_overrides)
        if o.sample_embed_std != 0.02:  # the default init stays bitwise as before
            with torch.no_grad():
                gen = torch.Generator().manual_seed(derived_seed(o.seed, 3))
                model.s_embedder.weight.normal_(0, o.sample_embed_std, generator=gen)
    config["model"] = model.config
    model.gradient_checkpointing = o.gradient_checkpointing
    ema = create_model(o.model, **model_overrides).requires_grad_(False)
    ema.load_state_dict(model.state_dict())

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=o.weight_decay),
                                   dict(params=no_decay, weight_decay=0.0)], lr=o.lr, betas=(o.beta1, o.beta2))
    step = _load_checkpoint(ckpts[-1], model, ema, optimizer) if resume else 0
    if state.is_main_process:
        # a run's logs hold each step once: rows past the checkpoint are logged again
        # (a fresh start drops the rows of an earlier start that saved no checkpoint)
        for name in ("metrics.jsonl", "eval.jsonl"):
            _drop_rows_after(run_dir / name, step)
        # model, EMA and two Adam moments in fp32: refuse to train steps that cannot be saved
        check_free_space(run_dir, 4 * 4 * sum(p.numel() for p in model.parameters()), "--results-dir")
        if resume:
            log(f"resuming {run_dir} from step {step}")
        else:  # the job has started: only now is the run directory claimed
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            write_json_atomic(config, run_dir / "config.json")
    accelerator.wait_for_everyone()

    ema = ema.to(accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    forward = torch.compile(model) if o.compile else model
    raw = accelerator.unwrap_model(model)
    objective = DDPM(learn_sigma=raw.learn_sigma) if o.objective == "ddpm" else Flow(learn_sigma=raw.learn_sigma)
    if o.report_to:
        accelerator.init_trackers(o.run_name, config={k: v for k, v in asdict(o).items() if v is not None})

    def save_checkpoint(step: int) -> None:
        sums = gather_object([_state_checksum(raw)])  # ranks must hold the same weights
        if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
            raise RuntimeError(f"step {step}: the processes' weights differ ({sums}); not saving")
        if state.is_main_process:
            final = run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:07d}"
            tmp = run_dir / "checkpoints" / f".tmp_{step:07d}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in raw.state_dict().items()}, str(tmp / "model.safetensors"))
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps(dict(step=step, data_position=step * o.grad_accum,
                                                            processes=state.num_processes, param_sums=sums)))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # complete or absent
            kept = checkpoint_dirs(run_dir)
            for old in kept[:-o.keep_last] if o.keep_last else []:
                s = int(old.name[len(CHECKPOINT_PREFIX):])
                if not (o.keep_every and s % o.keep_every == 0):
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()

    metrics_file = run_dir / "metrics.jsonl"
    bar = tqdm(total=o.max_steps, initial=step, unit="step", disable=not state.is_main_process)
    window_loss, window_gn, window_grouped, t_last, images_since = [], [], [], time.perf_counter(), 0
    data_wait = 0.0  # the longest wait for a batch since the last log row
    branch_sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    warned = False
    evaluate = _heldout_eval(o, heldout, ema, objective, run_dir) if state.is_main_process and heldout else None
    while step < o.max_steps:
        for m in range(o.grad_accum):
            batch = batches.batch(step * o.grad_accum + m, accelerator.device)
            data_wait = max(data_wait, batches.last_wait)
            gen = torch.Generator().manual_seed(derived_seed(o.seed, state.process_index, step, m, 1))
            x0, b = batch.latents, batch.latents.shape[0]
            # one time per group (shared by its members), jittered by --timestep-variance
            sizes = torch.tensor(batch.group_sizes)
            t = torch.rand(len(sizes), generator=gen).repeat_interleave(sizes)
            jitter = torch.randn(b, generator=gen) * (o.timestep_variance / 1000)
            t = t + jitter * (sizes.repeat_interleave(sizes) > 1)  # singles keep their own time
            noise = torch.randn(x0.shape, generator=gen).to(x0.device)
            ids_gen = torch.Generator(device=accelerator.device).manual_seed(
                derived_seed(o.seed, state.process_index, step, m, 2))
            if o.objective == "ddpm":
                t_int = (t.clamp(0, 1 - 1e-9) * 1000).long().to(x0.device)
                xt = objective.q_sample(x0, t_int, noise)
                t_net = t_int.float()
            else:
                t_f = t.clamp(0, 1).to(x0.device)
                xt = Flow.interpolate(x0, t_f, noise)
                t_net = Flow.network_time(t_f)
            with accelerator.accumulate(model), accelerator.autocast():
                out = forward(xt, t_net, batch.labels, group_size=batch.group_sizes, generator=ids_gen)
                out = out.float()
                if o.objective == "ddpm":
                    per_image = objective.training_loss(out, x0, xt, t_int, noise)
                else:
                    per_image = objective.training_loss(out, x0, noise)
                loss = per_image.mean()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"step {step}: the loss is {loss.item()}; stopping. The last "
                                             f"checkpoint in {run_dir / 'checkpoints'} is intact")
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), o.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window_loss.append(loss.detach())
            window_grouped.append(batch.grouped_fraction)
            in_group = (sizes.repeat_interleave(sizes) > 1).to(per_image.device)
            branch_sums += torch.stack([per_image.detach()[in_group].sum(), in_group.sum(),
                                        per_image.detach()[~in_group].sum(), (~in_group).sum()]).double()
        if grad_norm is not None:
            window_gn.append(grad_norm.detach().float())
        with torch.no_grad():  # EMA after every optimizer step
            for pe, pm in zip(ema.parameters(), raw.parameters()):
                pe.lerp_(pm.detach().to(pe.dtype), 1 - o.ema_decay)
        step += 1
        images_since += o.global_batch_size
        bar.update(1)
        if step % o.log_every == 0 or step == o.max_steps:
            # the mean over ranks of each rank's mean loss (equal micro-batch sizes)
            local = torch.stack(window_loss).mean()
            every = accelerator.gather(local.reshape(1)).float()
            sums = accelerator.reduce(branch_sums, reduction="sum").tolist()
            now = time.perf_counter()
            rec = dict(step=step, loss=float(every.mean()), loss_per_rank=[float(v) for v in every],
                       # per branch: images in groups (GroupDiff-l: null label) and single images
                       loss_grouped=sums[0] / sums[1] if sums[1] else None,
                       loss_single=sums[2] / sums[3] if sums[3] else None,
                       grad_norm=float(torch.stack(window_gn).mean()) if window_gn else None, lr=o.lr,
                       images_per_s=images_since / (now - t_last),
                       grouped_fraction=sum(window_grouped) / len(window_grouped),
                       similarity=batches.similarity, data_wait_s=data_wait)
            if batches.similarity and batches.similarity["passing"] > 0.9 and not warned and state.is_main_process:
                warned = log(f"warning: {batches.similarity['passing']:.0%} of the pairs in a window pass "
                             f"--similarity-threshold {o.similarity_threshold} (median cosine "
                             f"{batches.similarity['median']:.2f}): similarity groups are nearly random groups. "
                             f"Raise the threshold, or encode with a pretrained embedder") or True
            if state.is_main_process:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.1f}")
            if o.report_to:
                accelerator.log({k: v for k, v in rec.items() if isinstance(v, float)}, step=step)
            window_loss, window_gn, window_grouped, t_last, images_since = [], [], [], now, 0
            data_wait = 0.0
            branch_sums.zero_()
        if evaluate and (step % (o.eval_every or o.ckpt_every) == 0 or step == o.max_steps):
            t_last += evaluate(step)
        if step % o.ckpt_every == 0 or step == o.max_steps:
            save_checkpoint(step)
    bar.close()
    if o.report_to:
        accelerator.end_training()
    return dict(run_dir=str(run_dir), step=step, processes=state.num_processes)
