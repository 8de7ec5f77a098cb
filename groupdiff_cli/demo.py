"""`groupdiff demo`: real handwritten digits, every class sampled as a group of 16 next to
the same seeds sampled one by one, judged by a digit classifier and by FID.

The data are the UCI handwritten digits shipped in the package (``digits.py``). The
compared model is the one shipped in the package (``pretrained/digits-sit-mi1-l4``, its
README says how it was trained) or, with ``from_scratch``, one trained here. Both halves
of the figure come from the same seeds and labels, so their difference is the effect of
sampling jointly. The demo also runs the real chain from scratch at a small size
(encode -> train -> sample -> FID) to show that it works on this machine.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from groupdiff_cli import fid
from groupdiff_cli.checkpoints import checkpoint_dirs, checkpoint_step, load_model
from groupdiff_cli.defaults import (DEMO_BOOTSTRAP, DEMO_CFG_SCALE, DEMO_CHAIN_BATCH, DEMO_CHAIN_STEPS,
                                    DEMO_SAMPLE_STEPS, DEMO_SAMPLER, PRESETS)
from groupdiff_cli.digits import HERE, classify, load_classifier, load_digits, write_digits
from groupdiff_cli.encode import EncodeConfig, encode
from groupdiff_cli.files import atomic_path, write_json_atomic
from groupdiff_cli.images import SAMPLES_FILE, open_images
from groupdiff_cli.inception import InceptionFeatures, extract_features, load_pool_features
from groupdiff_cli.integrity import IntegrityError
from groupdiff_cli.sampling import build_job, run_sampling
from groupdiff_cli.train import TrainOptions, train

DEMO_RECIPE = "digits-l4"  # the training recipe of the shipped weights and of --from-scratch
DEMO_MODEL = PRESETS[DEMO_RECIPE]["model"]
PRETRAINED = HERE / "digits-sit-mi1-l4"
# the real digits' pool features under the offline TF Inception (the default), stored in
# fp16 so that the demo skips that Inception pass (~3 min on 2 CPU cores); recomputed for
# other --inception-weights
REFERENCE_FEATURES = HERE / "digits-fid-reference" / "pool_features.npz"
CLASS_NAMES = [str(d) for d in range(10)]


def digits_reference(out: Path, extractor, log) -> Path:
    """FID statistics of the 1,797 real digits (from the shipped features when they fit)."""
    stats = out / f"digits_fid_stats_{extractor.weights['sha256'][:12]}.npz"
    if stats.exists():
        return stats
    real = out / "digits_rgb.npz"
    if not real.exists():
        with atomic_path(real) as tmp:
            np.savez(tmp, arr_0=np.repeat(load_digits()[0][..., None], 3, -1))
    try:
        feats = load_pool_features(REFERENCE_FEATURES, open_images(real), extractor)
    except IntegrityError as e:
        log(f"note: {e}: recomputed")
        feats = None
    if feats is None:
        feats = extract_features(open_images(real), extractor, desc="real digits")
    fid.save_reference(fid.reference_from_features(str(real), feats), stats)
    return stats


def _encode(digits: Path, data: Path) -> None:
    if not (data / "dataset.json").exists():
        encode(digits, data, EncodeConfig(src=str(digits), image_size=8, vae="pixel", embedder="none", flip=False,
                                          shard_size=1000), batch_size=256, num_workers=0, cpu=True,
               log=lambda m: None)


def _train(data: Path, runs: Path, name: str, steps: int, batch: int) -> Path:
    """The demo's recipe (the digits-l4 preset); resumes what an earlier run left."""
    run = runs / name
    done = [checkpoint_step(p) for p in checkpoint_dirs(run)]
    if not any(s >= steps for s in done):
        recipe = dict(PRESETS[DEMO_RECIPE], global_batch_size=batch)
        opts = TrainOptions(data=str(data), results_dir=str(runs), run_name=name, group_buffer=1797, max_steps=steps,
                            ckpt_every=max(1, steps // 4), log_every=50, cpu=True, **recipe)
        train(opts, resume=bool(done), log=lambda m: None)
    return run


def _sample(loaded, run: Path, out: Path, group_size: int, labels: list[int], cfg_scale: float,
            steps: int) -> np.ndarray:
    job, model = build_job(run, group_size=group_size, class_labels=labels, cfg_scale=cfg_scale, sampler=DEMO_SAMPLER,
                           steps=steps, seed=0, loaded=loaded, warn=lambda m: None)
    run_sampling(job, model, out, batch_size=256, cpu=True)
    with np.load(out / SAMPLES_FILE) as f:
        return f["arr_0"]


def compare(run, out: Path, ref_dir: Path, group_size: int, groups_per_class: int, cfg_scale: float, steps: int,
            inception_weights, bootstrap: int, log) -> dict:
    """Every class in groups of ``group_size`` and the same seeds one by one: what the
    classifier reads and the FID of each side, with the paired interval of the difference."""
    loaded = load_model(run)
    groups = [c for c in range(len(CLASS_NAMES)) for _ in range(groups_per_class)]
    joint = _sample(loaded, run, out / f"N{group_size}", group_size, groups, cfg_scale, steps)
    single = _sample(loaded, run, out / "N1", 1, [c for c in groups for _ in range(group_size)], cfg_scale, steps)
    asked = np.repeat(groups, group_size)
    clf, clf_info = load_classifier()
    sides = {}
    for name, images in (("jointly", joint), ("one_by_one", single)):
        read = int((classify(clf, images) == asked).sum())
        sides[name] = dict(read_as_asked=read, accuracy=read / len(asked))
    extractor = InceptionFeatures(inception_weights)
    rep = fid.evaluate(out / f"N{group_size}", digits_reference(ref_dir, extractor, log), ("fid",), extractor=extractor,
                       bootstrap=bootstrap, paired_with=out / "N1", cpu=True)
    paired = rep["metrics"]["fid_paired"]
    sides["jointly"]["fid"], sides["one_by_one"]["fid"] = rep["metrics"]["fid"], paired["other_fid"]
    return dict(run=str(run), group_size=group_size, group_labels=groups, samples_per_side=len(asked),
                cfg_scale=cfg_scale,
                sampler=DEMO_SAMPLER, sample_steps=steps,
                classifier=dict(heldout_accuracy=clf_info["heldout_accuracy"],
                                heldout_images=clf_info["heldout_images"]),
                **sides, fid_difference=dict(value=paired["difference"], ci95=paired["ci95"],
                                             resamples=paired["rounds"], block=paired["block"]),
                fid_reference=f"the {len(load_digits()[1])} real digits", images=(joint, single))


def run_demo(out, *, from_scratch: int | None = None, group_size: int = 16, groups_per_class: int = 1,
             cfg_scale: float = DEMO_CFG_SCALE, sample_steps: int = DEMO_SAMPLE_STEPS,
             chain_steps: int = DEMO_CHAIN_STEPS, bootstrap: int = DEMO_BOOTSTRAP, inception_weights=None,
             log=print) -> dict:
    """The comparison (shipped weights, or a model trained here for ``from_scratch``
    steps) and the small chain from scratch; writes OUT/groups_vs_single.png and
    OUT/summary.json and returns the summary. Every stage resumes when rerun."""
    t0 = time.perf_counter()
    out = Path(out)

    def say(msg):
        log(f"[{time.perf_counter() - t0:5.0f}s] {msg}")

    digits = write_digits(out / "digits")
    _encode(digits, out / "data")
    say(f"encoded the {len(load_digits()[1])} real digits at 8x8: {out / 'data'}")
    chain = _train(out / "data", out / "runs", "chain", chain_steps, DEMO_CHAIN_BATCH)
    _sample(load_model(chain), chain, out / "chain_samples", group_size, [0], cfg_scale, sample_steps)
    say(f"trained {DEMO_MODEL} for {chain_steps} steps from scratch and sampled a group of {group_size} from it "
        f"(the chain runs here; too short to draw digits): {out / 'chain_samples'}")
    if from_scratch:
        run = _train(out / "data", out / "runs", "demo", from_scratch, PRESETS[DEMO_RECIPE]["global_batch_size"])
        say(f"trained {DEMO_MODEL} for {from_scratch} steps: {run}")
    else:
        run = PRETRAINED
        say(f"the shipped weights: {run} (its README says how they were trained)")
    where = out / ("samples" if not from_scratch else f"samples_from_scratch_{from_scratch}")
    summary = compare(run, where, out, group_size, groups_per_class, cfg_scale, sample_steps, inception_weights,
                      bootstrap, log)
    joint, single = summary.pop("images")
    figure = out / "groups_vs_single.png"
    Image.fromarray(comparison_figure(joint, single, group_size, summary)).save(figure)
    summary.update(figure=str(figure), wall_time_s=round(time.perf_counter() - t0, 1))
    write_json_atomic(summary, out / "summary.json")
    for side in ("jointly", "one_by_one"):
        s = summary[side]
        say(f"{side.replace('_', ' ')}: the classifier reads {s['read_as_asked']}/{summary['samples_per_side']} "
            f"as asked, FID {s['fid']:.2f}")
    d = summary["fid_difference"]
    say(f"FID(jointly) - FID(one by one) = {d['value']:+.2f}, paired 95% interval [{d['ci95'][0]:+.2f}, "
        f"{d['ci95'][1]:+.2f}]; {figure}, {out / 'summary.json'}")
    return summary


def _strip(images: np.ndarray, zoom: int, gap: int = 1) -> np.ndarray:
    """Images side by side in one row, enlarged ``zoom`` times (nearest: the pixels as sampled)."""
    n, h, w, _ = images.shape
    big = images.repeat(zoom, 1).repeat(zoom, 2)
    row = np.full((h * zoom, n * w * zoom + (n - 1) * gap, 3), 255, np.uint8)
    for i in range(n):
        row[:, i * (w * zoom + gap):i * (w * zoom + gap) + w * zoom] = big[i]
    return row


def comparison_figure(grouped: np.ndarray, single: np.ndarray, group_size: int, summary: dict | None = None,
                      zoom: int = 4, class_names=CLASS_NAMES) -> np.ndarray:
    """One row per group (its class on the left): the jointly sampled group, then the same
    seeds sampled one by one; each half headed by how it was sampled and footed by what
    the classifier reads and its FID; the paired FID difference at the bottom."""
    sep = np.full((grouped.shape[1] * zoom, 12, 3), 255, np.uint8)
    rows = [np.concatenate([_strip(grouped[k:k + group_size], zoom), sep, _strip(single[k:k + group_size], zoom)],
                           axis=1) for k in range(0, len(grouped), group_size)]
    gap = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    body = np.concatenate([x for r in rows for x in (r, gap)][:-1], axis=0)
    label_w, head_h, foot_h = 24, 18, 40 if summary else 4
    canvas = Image.new("RGB", (label_w + body.shape[1] + 4, head_h + body.shape[0] + foot_h), "white")
    canvas.paste(Image.fromarray(body), (label_w, head_h))
    draw = ImageDraw.Draw(canvas)
    half = (body.shape[1] - 12) // 2
    row_h = rows[0].shape[0] + 4
    labels = summary["group_labels"] if summary else list(range(len(rows)))
    for k in range(len(rows)):
        name = class_names[labels[k] % len(class_names)]
        draw.text((6, head_h + k * row_h + row_h // 2 - 8), name, fill="black")
    for i, (title, key) in enumerate(((f"jointly, in groups of {group_size}", "jointly"),
                                      ("the same seeds one by one", "one_by_one"))):
        x = label_w + i * (half + 12)
        draw.text((x + 2, 3), title, fill="black")
        if summary:
            s = summary[key]
            draw.text((x + 2, head_h + body.shape[0] + 3), f"classifier reads {s['read_as_asked']}/"
                      f"{summary['samples_per_side']} as asked; FID {s['fid']:.1f}", fill="black")
    if summary:
        d = summary["fid_difference"]
        draw.text((label_w + 2, head_h + body.shape[0] + 20), f"FID(jointly) - FID(one by one) = {d['value']:+.1f}, "
                  f"paired 95% interval [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]; CFG {summary['cfg_scale']}, "
                  f"{summary['sampler']} {summary['sample_steps']} steps", fill="black")
    return np.asarray(canvas)
