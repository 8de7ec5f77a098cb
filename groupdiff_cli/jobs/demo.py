"""`groupdiff demo`: real handwritten digits, GroupDiff-l against an equally trained
baseline, judged by a digit classifier and by FID.

The data are the UCI handwritten digits shipped in the package (``digits.py``). The
compared models are the two shipped in the package (``pretrained/digits-sit-mi1-l4``,
GroupDiff-l with class groups of 4, and ``pretrained/digits-sit-mi1-base``, the same
network, data, steps and seed trained the ordinary way with label dropout 0.1; their
READMEs say how) or, with ``from_scratch``, two trained here. The comparison is the
paper's: GroupDiff-l sampled as its authors sample (the unconditional branch in groups
of the training size, guidance only inside an interval of t) against the baseline, on
the same seeds and labels. A second, labelled comparison runs the GroupDiff-l model's
unconditional branch one image at a time: a path it never trained (its null label is
only ever seen in groups), shown because it is what sampling "without groups" means for
this model, not because the paper compares it. The demo also runs the chain from
scratch at a small size (encode -> train -> sample) to show that it works here.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from groupdiff_cli.data.digits import HERE, classify, load_classifier, load_digits, shipped, write_digits
from groupdiff_cli.data.encode import EncodeConfig, encode
from groupdiff_cli.evaluation import fid
from groupdiff_cli.evaluation.inception import InceptionFeatures
from groupdiff_cli.jobs.sampling import build_job, run_sampling
from groupdiff_cli.jobs.train import TrainOptions, train
from groupdiff_cli.plumbing.defaults import (DEMO_BATCH, DEMO_BOOTSTRAP, DEMO_CFG_SCALE, DEMO_CHAIN_BATCH,
                                             DEMO_CHAIN_STEPS, DEMO_GUIDANCE_INTERVAL, DEMO_SAMPLE_STEPS, DEMO_SAMPLER,
                                             PRESETS)
from groupdiff_cli.plumbing.files import atomic_path, write_json_atomic
from groupdiff_cli.plumbing.integrity import IntegrityError, load_arrays, save_arrays
from groupdiff_cli.plumbing.layout import DATASET_FILE, SAMPLES_FILE
from groupdiff_cli.science.checkpoints import check_comparable, checkpoint_dirs, checkpoint_step, load_model

DEMO_RECIPE = "digits-l4"  # the training recipe of the shipped GroupDiff-l weights and of --from-scratch
DEMO_MODEL = PRESETS[DEMO_RECIPE]["model"]
TRAINED_GROUP_SIZE = PRESETS[DEMO_RECIPE]["group_size"]
PRETRAINED = HERE / "digits-sit-mi1-l4"
PRETRAINED_BASELINE = HERE / "digits-sit-mi1-base"  # the same recipe with --group-mode none
# the real digits' pool features under the offline TF Inception (the default), stored in
# fp16 so that the demo skips that Inception pass (~3 min on 2 CPU cores); recomputed for
# other --inception-weights
REFERENCE_FEATURES = "digits-fid-reference/pool_features.npz"
CLASS_NAMES = [str(d) for d in range(10)]
SAMPLES_PER_CLASS = 16  # one figure row per digit


class DemoStopped(Exception):
    """Training inside the demo was stopped by a signal; its checkpoint resumes it."""

    def __init__(self, signal: str, step: int, steps: int, run: Path):
        super().__init__(f"{signal}: stopped training {run} at step {step} of {steps} with a checkpoint; rerun the "
                         f"same command to continue")


@dataclass(frozen=True)
class Sampling:
    """How both models are sampled: guidance w inside the interval of t (t = 1 noise), the
    GroupDiff-l model's unconditional branch in groups of ``group_size``."""

    cfg_scale: float = DEMO_CFG_SCALE
    guidance_interval: tuple[float, float] = DEMO_GUIDANCE_INTERVAL
    sampler: str = DEMO_SAMPLER
    steps: int = DEMO_SAMPLE_STEPS
    group_size: int = TRAINED_GROUP_SIZE


def digits_evaluator(out: Path, extractor: InceptionFeatures, log) -> fid.Evaluator:
    """An evaluator against the 1,797 real digits: their FID statistics kept in ``out``
    (from the shipped pool features when they fit the Inception weights in use). Both
    files it keeps in ``out`` are checked when reused: a bad one is rebuilt, with a note."""
    stats = out / f"digits_fid_stats_{extractor.weights['sha256'][:12]}.npz"
    if stats.exists():
        evaluator = fid.Evaluator(stats, extractor=extractor, cpu=True)
        try:
            evaluator.reference  # noqa: B018 (read and checked now: a bad file is rebuilt)
            return evaluator
        except ValueError as e:  # IntegrityError included
            log(f"note: {e}: rebuilt")
    real = out / "digits_rgb.npz"
    rgb = np.repeat(load_digits()[0][..., None], 3, -1)
    try:
        kept = real.exists() and np.array_equal(load_arrays(real)["arr_0"], rgb)
    except IntegrityError as e:
        log(f"note: {e}: rewritten")
        kept = False
    if not kept:
        save_arrays(real, arr_0=rgb)
    evaluator = fid.Evaluator(real, extractor=extractor, cpu=True, save_ref_stats=stats,
                              reference_features=shipped(REFERENCE_FEATURES))
    evaluator.reference  # noqa: B018 (computed and saved now, so that its notes come first)
    for note in evaluator.notes:
        log(f"note: {note}")
    return evaluator


def check_shipped_runs() -> None:
    """The shipped weights and configurations, against the package's manifest."""
    for run in (PRETRAINED, PRETRAINED_BASELINE):
        for path in sorted(run.rglob("*")):
            if path.is_file() and path.suffix in (".json", ".safetensors"):
                shipped(path.relative_to(HERE).as_posix())


def _encode(digits: Path, data: Path) -> None:
    if not (data / DATASET_FILE).exists():
        encode(digits, data, EncodeConfig(src=str(digits), image_size=8, vae="pixel", embedder="none", flip=False,
                                          shard_size=1000), batch_size=DEMO_BATCH, num_workers=0, cpu=True,
               log=lambda m: None)


def _train(data: Path, runs: Path, name: str, steps: int, batch: int, **changes) -> Path:
    """The demo's recipe (the digits-l4 preset, with ``changes``); resumes what an earlier
    run left. A stop signal during training raises ``DemoStopped`` (its checkpoint is on disk)."""
    run = runs / name
    done = [checkpoint_step(p) for p in checkpoint_dirs(run)]
    if not any(s >= steps for s in done):
        recipe = dict(PRESETS[DEMO_RECIPE], global_batch_size=batch, **changes)
        opts = TrainOptions(data=str(data), results_dir=str(runs), run_name=name,
                            group_buffer=max(len(load_digits()[1]), batch),  # a window: the whole set
                            max_steps=steps, ckpt_every=max(1, steps // 4), log_every=50, cpu=True, **recipe)
        result = train(opts, resume=bool(done), log=lambda m: None)
        if result.get("stopped_by"):
            raise DemoStopped(result["stopped_by"], result["step"], steps, run)
    return run


def _sample(loaded, run: Path, out: Path, labels: list[int], s: Sampling, group_size: int) -> np.ndarray:
    job, model = build_job(run, group_size=group_size, class_labels=labels, cfg_scale=s.cfg_scale,
                           guidance_interval=s.guidance_interval, sampler=s.sampler, steps=s.steps, seed=0,
                           loaded=loaded, warn=lambda m: None)
    run_sampling(job, model, out, batch_size=DEMO_BATCH, cpu=True)
    with np.load(out / SAMPLES_FILE) as f:
        return f["arr_0"]


SIDES = ("groupdiff_l", "baseline", "groupdiff_l_one_by_one")


def compare(run, baseline, out: Path, ref_dir: Path, s: Sampling, groups_per_class: int, extractor: InceptionFeatures,
            bootstrap: int, log) -> dict:
    """Both models on the same seeds and labels: what the classifier reads and the FID of
    each, with the paired intervals of FID(GroupDiff-l) - FID(baseline) and of the
    within-model difference (jointly - one by one)."""
    per_class = SAMPLES_PER_CLASS * groups_per_class
    asked = np.repeat(np.arange(len(CLASS_NAMES)), per_class)
    grouped = asked[::s.group_size].tolist()
    loaded = load_model(run)
    folders = dict(groupdiff_l=out / f"groupdiff_l_N{s.group_size}", baseline=out / "baseline",
                   groupdiff_l_one_by_one=out / "groupdiff_l_N1")
    images = dict(groupdiff_l=_sample(loaded, run, folders["groupdiff_l"], grouped, s, s.group_size),
                  baseline=_sample(load_model(baseline), baseline, folders["baseline"], asked.tolist(), s, 1),
                  groupdiff_l_one_by_one=_sample(loaded, run, folders["groupdiff_l_one_by_one"], asked.tolist(), s, 1))
    clf, clf_info = load_classifier()
    evaluator = digits_evaluator(ref_dir, extractor, log)
    sides, differences = {}, {}
    for name in SIDES:
        read = int((classify(clf, images[name]) == asked).sum())
        sides[name] = dict(read_as_asked=read, accuracy=read / len(asked), fid=evaluator.fid(folders[name]))
    for key, other in (("groupdiff_l_vs_baseline", "baseline"), ("jointly_vs_one_by_one", "groupdiff_l_one_by_one")):
        paired = evaluator.paired_difference(folders["groupdiff_l"], folders[other], bootstrap, s.group_size)
        differences[key] = dict(value=paired["difference"], ci95=paired["ci95"], resamples=paired["rounds"],
                                block=paired["block"])
    return dict(run=str(run), baseline_run=str(baseline), sampling=asdict(s), samples_per_side=len(asked),
                group_labels=grouped,
                classifier=dict(heldout_accuracy=clf_info["heldout_accuracy"], heldout_images=clf_info["heldout_images"]),
                **sides, fid_difference=differences, fid_reference=f"the {len(load_digits()[1])} real digits",
                images=images)


def run_demo(out, *, from_scratch: int | None = None, baseline=None, sampling: Sampling = Sampling(),
             groups_per_class: int = 1,
             chain_steps: int = DEMO_CHAIN_STEPS, bootstrap: int = DEMO_BOOTSTRAP, inception_weights=None,
             log=print) -> dict:
    """The comparison (shipped weights, or two models trained here for ``from_scratch``
    steps) and the small chain from scratch; writes OUT/groupdiff_vs_baseline.png and
    OUT/summary.json and returns the summary. Every stage resumes when rerun; a stop
    signal while training raises ``DemoStopped``."""
    t0 = time.perf_counter()
    out = Path(out)
    extractor = InceptionFeatures(inception_weights)  # built once, before any work: the weights must be readable,
    if baseline is not None:  # the baseline must load and draw the demo's images (8x8 digits, 10 classes),
        check_comparable(load_model(PRETRAINED), load_model(baseline, flag="--baseline"), "--baseline", baseline,
                         against="the demo's model")
    if not from_scratch:
        check_shipped_runs()  # and the shipped files must be intact

    def say(msg):
        log(f"[{time.perf_counter() - t0:5.0f}s] {msg}")

    digits = write_digits(out / "digits")
    _encode(digits, out / "data")
    say(f"encoded the {len(load_digits()[1])} real digits at 8x8: {out / 'data'}")
    chain = _train(out / "data", out / "runs", "chain", chain_steps, DEMO_CHAIN_BATCH)
    chain_out = out / "chain_samples" / _key(chain, sampling)
    _sample(load_model(chain), chain, chain_out, [0] * (SAMPLES_PER_CLASS // sampling.group_size), sampling,
            sampling.group_size)
    say(f"trained {DEMO_MODEL} for {chain_steps} steps from scratch and sampled {SAMPLES_PER_CLASS} images from it "
        f"(the chain runs here; too short to draw digits): {chain_out}")
    if from_scratch:
        batch = PRESETS[DEMO_RECIPE]["global_batch_size"]
        run = _train(out / "data", out / "runs", "demo", from_scratch, batch)
        if baseline is None:
            baseline = _train(out / "data", out / "runs", "demo-baseline", from_scratch, batch, group_mode="none")
        say(f"trained {DEMO_MODEL} for {from_scratch} steps as GroupDiff-l: {run}; the baseline: {baseline}")
    else:
        run, baseline = PRETRAINED, baseline or PRETRAINED_BASELINE
        say(f"the shipped weights: {run} and the baseline {baseline} (their READMEs say how they were trained)")
    where = out / ("samples" if not from_scratch else f"samples_from_scratch_{from_scratch}")
    where = where / _key(run, baseline, sampling, groups_per_class)
    summary = compare(run, baseline, where, out, sampling, groups_per_class, extractor, bootstrap, log)
    imgs = summary.pop("images")
    figure = out / "groupdiff_vs_baseline.png"
    with atomic_path(figure) as tmp:
        Image.fromarray(comparison_figure(imgs, summary)).save(tmp, format="PNG")
    summary.update(figure=str(figure), wall_time_s=round(time.perf_counter() - t0, 1))
    write_json_atomic(summary, out / "summary.json")
    for side, title in zip(SIDES, TITLES):
        v = summary[side]
        say(f"{title}: the classifier reads {v['read_as_asked']}/{summary['samples_per_side']} as asked, "
            f"FID {v['fid']:.2f}")
    for key, text in DIFFERENCES.items():
        d = summary["fid_difference"][key]
        say(f"{text} = {d['value']:+.2f}, paired 95% interval [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]")
    say(f"{figure}, {out / 'summary.json'}")
    return summary


def _key(*parts) -> str:
    """A folder name per comparison: other settings (or a moved --out, whose runs have other
    paths) sample anew beside what is there, and a rerun of the same reuses it."""
    text = json.dumps([asdict(p) if isinstance(p, Sampling) else str(p) for p in parts])
    return hashlib.sha256(text.encode()).hexdigest()[:10]


TITLES = ("GroupDiff-l, unconditional branch in groups", "baseline (plain SiT), the same seeds",
          "GroupDiff-l, unconditional branch one by one")
DIFFERENCES = {"groupdiff_l_vs_baseline": "FID(GroupDiff-l) - FID(baseline)",
               "jointly_vs_one_by_one": "within GroupDiff-l (not the paper's comparison): FID(in groups) - "
                                        "FID(one by one)"}


def _strip(images: np.ndarray, zoom: int, group_size: int, gap: int = 1) -> np.ndarray:
    """Images side by side in one row, enlarged ``zoom`` times (nearest: the pixels as
    sampled); a wider gap between groups."""
    n, h, w, _ = images.shape
    big = images.repeat(zoom, 1).repeat(zoom, 2)
    gaps = [0] + [gap * (3 if i % group_size == 0 else 1) for i in range(1, n)]
    row = np.full((h * zoom, n * w * zoom + sum(gaps), 3), 255, np.uint8)
    x = 0
    for i in range(n):
        x += gaps[i]
        row[:, x:x + w * zoom] = big[i]
        x += w * zoom
    return row


def comparison_figure(images: dict, summary: dict, zoom: int = 3) -> np.ndarray:
    """One row per digit (its class on the left), three panels on the same seeds: the
    GroupDiff-l model sampled in groups, the baseline, and (labelled as not the paper's
    comparison) the GroupDiff-l model one by one; each panel headed by how it was sampled
    and footed by what the classifier reads and its FID; the paired differences below."""
    s = summary["sampling"]
    per_row = SAMPLES_PER_CLASS
    sep = 16
    panels = []
    for name in SIDES:
        arr = images[name]
        size = s["group_size"] if name == "groupdiff_l" else 1
        rows = [_strip(arr[k:k + per_row], zoom, size if size > 1 else per_row) for k in range(0, len(arr), per_row)]
        gap = np.full((3, rows[0].shape[1], 3), 255, np.uint8)
        panels.append(np.concatenate([x for r in rows for x in (r, gap)][:-1], axis=0))
    width = sum(p.shape[1] for p in panels) + sep * (len(panels) - 1)
    label_w, head_h, foot_h = 20, 30, 78
    canvas = Image.new("RGB", (label_w + width + 4, head_h + panels[0].shape[0] + foot_h), "white")
    draw = ImageDraw.Draw(canvas)
    x = label_w
    heads = (f"GroupDiff-l, uncond. in groups of {s['group_size']}", "baseline, the same seeds",
             "GroupDiff-l, uncond. one by one")
    for name, panel, head in zip(SIDES, panels, heads):
        canvas.paste(Image.fromarray(panel), (x, head_h))
        draw.text((x + 2, 2), head, fill="black")
        if name == "groupdiff_l_one_by_one":
            draw.text((x + 2, 14), "(a path this model never trained)", fill="gray")
        v = summary[name]
        draw.text((x + 2, head_h + panel.shape[0] + 3), f"reads {v['read_as_asked']}/{summary['samples_per_side']}"
                  f" as asked; FID {v['fid']:.1f}", fill="black")
        x += panel.shape[1] + sep
    rows = len(images["baseline"]) // per_row
    row_h = (panels[0].shape[0] + 3) // rows
    for k in range(rows):
        name = CLASS_NAMES[summary["group_labels"][k * per_row // s["group_size"]] % len(CLASS_NAMES)]
        draw.text((6, head_h + k * row_h + row_h // 2 - 6), name, fill="black")
    y = head_h + panels[0].shape[0] + 20
    for key, text in DIFFERENCES.items():
        d = summary["fid_difference"][key]
        draw.text((label_w + 2, y), f"{text} = {d['value']:+.1f}, paired 95% interval [{d['ci95'][0]:+.1f}, "
                  f"{d['ci95'][1]:+.1f}]", fill="black")
        y += 14
    lo, hi = s["guidance_interval"]
    draw.text((label_w + 2, y), f"CFG {s['cfg_scale']} for {lo} <= t <= {hi}, {s['sampler']} {s['steps']} steps",
              fill="black")
    return np.asarray(canvas)
