"""`groupdiff fid`: FID, sFID, Inception Score, precision/recall and KID of a sample set
against a reference, as the ADM evaluator computes them (features: ``inception``;
the metrics and their intervals: ``metrics``; image sets: ``images``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from groupdiff_cli import __version__
from groupdiff_cli.defaults import MAX_BOOTSTRAP
from groupdiff_cli.distributed import process_state
from groupdiff_cli.images import (LABELS_FILE, POOL_FEATURES, SAMPLE_CONFIG, NpzImages, npz_keys, npz_member,
                                  open_images, recorded_group_size)
from groupdiff_cli.inception import (POOL_DIM, SPATIAL_DIM, Features, InceptionFeatures, extract_features,
                                     load_pool_features, save_pool_features)
from groupdiff_cli.integrity import DIGEST_KEY, IntegrityError, file_sha256, load_arrays, save_arrays
from groupdiff_cli.metrics import (PRC_K, FrechetDistance, bootstrap_fid, gaussian_stats, inception_score,
                                   kernel_inception_distance, paired_fid_difference, precision_recall, resampled_fids)
from groupdiff_cli.seeds import evaluation_rng

METRICS = ("fid", "sfid", "isc", "prc", "kid")
DEFAULT_METRICS = ("fid", "sfid", "isc", "prc")
PRC_REFERENCE_COUNT = 10_000  # ADM's reference batches hold 10k images for precision/recall


# --------------------------------------------------------------------------- #
#  References                                                                  #
# --------------------------------------------------------------------------- #
@dataclass
class Reference:
    """What a metric needs of the reference: Gaussian statistics (pool and spatial)
    and, for precision/recall and KID, pool features of reference images."""

    source: str
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    pool: np.ndarray | None = None  # features of (at most 10k) reference images
    images: torch.utils.data.Dataset | None = None  # images to get `pool` from, on demand
    count: int | None = None  # images behind the statistics, when known
    sha256: str | None = None

    def has(self, metric: str) -> bool:
        return {
            "fid": self.mu is not None,
            "sfid": self.mu_s is not None,
            "isc": True,
            "prc": self.pool is not None or self.images is not None,
            "kid": self.pool is not None or self.images is not None,
        }[metric]


def _subset_for_prc(n: int, seed: int = 0) -> np.ndarray:
    if n <= PRC_REFERENCE_COUNT:
        return np.arange(n)
    return np.sort(evaluation_rng(seed).choice(n, PRC_REFERENCE_COUNT, replace=False))


def reference_from_features(source: str, feats: Features) -> Reference:
    mu, sigma = gaussian_stats(feats.pool)
    # saved pool features (load_pool_features) have no spatial ones: no sFID statistics then
    mu_s, sigma_s = gaussian_stats(feats.spatial) if feats.spatial.shape[1] else (None, None)
    return Reference(source=source, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s,
                     pool=feats.pool[_subset_for_prc(len(feats))], count=len(feats), sha256=feats.sha256)


def load_reference_stats(path: Path) -> Reference:
    """An ADM reference batch (mu, sigma, mu_s, sigma_s, arr_0) or a file written by
    ``save_reference``: (mu, sigma, mu_s, sigma_s, pool)."""
    keys = npz_keys(path)
    if DIGEST_KEY in keys:  # ours (``save_reference``): checked
        load_arrays(path)
    ref = Reference(source=str(path), sha256=file_sha256(path))
    for k in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
        if k in keys:
            setattr(ref, k, np.array(npz_member(path, f"{k}.npy")))
    if "count" in keys:
        ref.count = int(np.array(npz_member(path, "count.npy")))
    if ref.pool is None and "arr_0" in keys:
        ref.images = NpzImages(path)
    if ref.sigma is None or ref.mu is None:
        raise ValueError(f"{path}: statistics file without both mu and sigma")
    return ref


def save_reference(ref: Reference, path) -> None:
    """Write reference statistics (and the pool features for P/R) atomically."""
    path = Path(path)
    arrays = {k: getattr(ref, k) for k in ("mu", "sigma", "mu_s", "sigma_s", "pool") if getattr(ref, k) is not None}
    save_arrays(path, count=np.int64(ref.count or 0), **arrays)  # with its digest, checked when read


def compute_reference_stats(images_path, out, inception_weights=None, batch_size: int = 100, num_workers: int = 0,
                            cpu: bool = False) -> dict:
    """Statistics of an image set (npz or folder) saved to ``out`` for use as REF."""
    state = process_state(cpu)
    images = open_images(images_path)
    if len(images) < 2:
        raise ValueError(f"{images_path}: {len(images)} image(s); a reference needs at least 2")
    feats = extract_features(images, InceptionFeatures(inception_weights), batch_size, num_workers, state, "reference")
    ref = reference_from_features(str(images_path), feats)
    if state.is_main_process:
        save_reference(ref, out)
    return dict(count=len(feats), out=str(out))


def is_stats_file(path: Path) -> bool:
    return path.is_file() and path.suffix == ".npz" and "mu" in npz_keys(path)


# --------------------------------------------------------------------------- #
#  The whole evaluation                                                        #
# --------------------------------------------------------------------------- #
def evaluate(samples, reference, metrics=DEFAULT_METRICS, **options) -> dict:
    """Compute ``metrics`` of the SAMPLES images against REF; returns every number and
    the provenance (counts, hashes, feature extractor and weights) as a dict. The
    options are ``evaluate_with_features``'s."""
    return evaluate_with_features(samples, reference, metrics, **options)[0]


def evaluate_with_features(samples, reference, metrics=DEFAULT_METRICS, inception_weights=None,
                           batch_size: int = 100, num_workers: int = 0, bootstrap: int = 0,
                           bootstrap_block: int | None = None, save_ref_stats=None, seed: int = 0, cpu: bool = False,
                           explicit_metrics: bool = True, extractor: InceptionFeatures | None = None,
                           paired_with=None) -> tuple[dict, Features]:
    """``evaluate``, returning the samples' features too.

    ``extractor`` reuses a built ``InceptionFeatures`` across calls (then
    ``inception_weights`` is not read). A `groupdiff sample` folder keeps its pool
    features (``POOL_FEATURES``), reused when only pool features are needed (FID, P/R,
    KID). ``bootstrap_block``: samples resampled together [default: the group size that
    `groupdiff sample` recorded, else 1]. ``paired_with``: a second sample set whose image i
    came from the same seed and label; adds FID(samples) - FID(paired_with) with a paired
    bootstrap interval. With ``explicit_metrics=False`` (the default metric set) a metric
    the reference cannot support (e.g. sFID against statistics without mu_s) is skipped
    with a note instead of being an error.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"--metrics: unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    state = process_state(cpu)
    images = open_images(samples)
    if len(images) < 2:
        raise ValueError(f"{samples}: {len(images)} image(s); metrics need at least 2")
    ref_path = Path(reference)
    if not ref_path.exists():
        raise FileNotFoundError(f"{ref_path}: no such file or folder")
    if save_ref_stats and is_stats_file(ref_path):
        raise ValueError(f"--save-ref-stats: {ref_path} already holds statistics, not images")
    block, other_images = _checked_resampling(samples, len(images), metrics, bootstrap, bootstrap_block, paired_with)

    extractor = extractor or InceptionFeatures(inception_weights)
    read = dict(extractor=extractor, batch_size=batch_size, num_workers=num_workers, state=state)
    ref = _reference(ref_path, save_ref_stats, read)
    chosen, notes = _supported_metrics(metrics, ref, ref_path, len(images), extractor.has_logits, explicit_metrics)
    notes = [*extractor.notes, *notes]  # what happened to the Inception cache, if anything
    if ref.pool is None and ref.images is not None and ({"prc", "kid"} & set(chosen)):
        ref.pool = extract_features(ref.images, desc="reference images", **read).pool
    feats = _features(samples, images, set(chosen) <= POOL_METRICS, "samples", read, notes)
    other = None if paired_with is None else _features(paired_with, other_images, True, "paired samples", read, notes)
    # lazy: torch-fidelity adds ~2.5 s to start-up; only computing features or metrics needs it
    import torch_fidelity

    report = dict(
        metrics=_metrics(chosen, feats, ref, bootstrap, block, seed, other),
        notes=notes,
        samples=dict(path=str(samples), count=len(feats), sha256=feats.sha256),
        reference=dict(path=str(ref_path), count=ref.count, sha256=ref.sha256,
                       prc_images=None if ref.pool is None else len(ref.pool)),
        feature_extractor=dict(**extractor.weights, torch_fidelity=torch_fidelity.__version__),
        processes=state.num_processes,
        groupdiff=__version__,
    )
    if other is not None:
        report["paired_with"] = dict(path=str(paired_with), count=len(other), sha256=other.sha256)
    return report, feats


POOL_METRICS = frozenset({"fid", "prc", "kid"})  # the metrics that pool features alone support


def _features(path, images, pool_only: bool, desc: str, read: dict, notes: list[str]) -> Features:
    """The features of ``images`` (read from ``path``): the folder's saved pool features
    when those are all that is needed and they fit, else extracted. A `groupdiff sample`
    folder keeps the pool features extracted from it, so that evaluating it again (a
    study's rerun, another --paired-with) skips the network. The cache is optional: a
    corrupt one is recomputed and one that cannot be written is skipped, each with a note."""
    folder = Path(path)
    cache = folder / POOL_FEATURES
    if pool_only and folder.is_dir():
        try:
            saved = load_pool_features(cache, images, read["extractor"])
        except IntegrityError as e:
            saved = None
            notes.append(f"{e}: recomputed")
        if saved is not None:
            return saved
    feats = extract_features(images, desc=desc, **read)
    if (folder / SAMPLE_CONFIG).is_file() and read["state"].is_main_process:
        try:
            save_pool_features(feats, cache, read["extractor"])
        except OSError as e:
            notes.append(f"pool features not kept in {cache} ({e.strerror or e}); the metrics are unaffected")
    return feats


def _checked_resampling(samples, count: int, metrics, bootstrap: int, block: int | None, path):
    """Check the bootstrap options and return the block size and the images of the
    ``--paired-with`` set ``path`` (None without one), once it is clear that they pair
    with SAMPLES image by image: all before any network runs."""
    if bootstrap == 1 or bootstrap > MAX_BOOTSTRAP:
        raise ValueError(f"--bootstrap {bootstrap}: use 0 (no interval) or 2 to {MAX_BOOTSTRAP} resamples")
    sizes = {p: recorded_group_size(p) for p in (samples, path) if p is not None}
    recorded = math.lcm(*(n or 1 for n in sizes.values()))
    block = block or recorded
    for p, n in sizes.items():
        if n and block % n:
            raise ValueError(f"--bootstrap-block {block} splits the groups of {n} images in {p}: use a multiple "
                             f"of {n}, since group-mates are correlated")
    if bootstrap and count % block:
        raise ValueError(f"--bootstrap-block {block} does not divide the {count} samples")
    if bootstrap and count // block < 2:
        raise ValueError(f"--bootstrap-block {block}: the {count} samples make {count // block} block; resampling "
                         f"needs at least 2 (an interval worth reading, 20 or more)")
    if path is None:
        return block, None
    if "fid" not in metrics or bootstrap < 2:
        raise ValueError("--paired-with: needs FID among the metrics and --bootstrap (at least 2 resamples)")
    images = open_images(path)
    if len(images) != count:
        raise ValueError(f"--paired-with {path}: {len(images)} images, SAMPLES has {count}; a pair needs the same "
                         f"seeds and labels, image by image")
    mine, theirs = Path(samples) / LABELS_FILE, Path(path) / LABELS_FILE
    if mine.is_file() and theirs.is_file() and not np.array_equal(np.load(mine), np.load(theirs)):
        raise ValueError(f"--paired-with {path}: its {LABELS_FILE} differs from SAMPLES' (image i of both must share "
                         f"its seed and label; `sample --align-labels` lines them up)")
    return block, images


def _reference(ref_path: Path, save_ref_stats, read: dict):
    """The reference's statistics: read from a stats file, or computed from its images
    (and saved to ``save_ref_stats``)."""
    if is_stats_file(ref_path):
        ref = load_reference_stats(ref_path)
        for name, arr, dim in (("mu", ref.mu, POOL_DIM), ("mu_s", ref.mu_s, SPATIAL_DIM)):
            if arr is not None and arr.shape != (dim,):
                raise ValueError(f"feature dimensions differ: samples have {dim}, the reference {ref_path} "
                                 f"has {name} of shape {arr.shape}")
        return ref
    ref_images = open_images(ref_path)
    if len(ref_images) < 2:
        raise ValueError(f"{ref_path}: {len(ref_images)} image(s); a reference needs at least 2")
    ref = reference_from_features(str(ref_path), extract_features(ref_images, desc="reference", **read))
    if save_ref_stats and read["state"].is_main_process:
        save_reference(ref, save_ref_stats)
    return ref


def _supported_metrics(metrics, ref, ref_path: Path, num_samples: int, has_logits: bool,
                       explicit: bool) -> tuple[list[str], list[str]]:
    """The metrics that can be computed, and a note for each one skipped (an error
    instead when the metric was asked for by name)."""
    chosen, notes = [], []
    no_is = "the Inception weights in use (the TF FID graph) have no fc layer; pass --inception-weights PATH " \
            "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth) for the Inception Score"
    for m in metrics:
        if m == "isc" and not has_logits:
            if explicit:
                raise ValueError(f"--metrics isc: {no_is}")
            notes.append(f"isc skipped: {no_is}")
        elif ref.has(m):
            chosen.append(m)
        elif explicit:
            raise ValueError(f"--metrics {m}: the reference {ref_path} lacks what it needs "
                             f"({'mu_s/sigma_s' if m == 'sfid' else 'images or pool features'})")
        else:
            notes.append(f"{m} skipped: the reference lacks {'mu_s/sigma_s' if m == 'sfid' else 'images'}")
    if "prc" in chosen:  # k-NN radii need more than k images on each side
        few = min(num_samples, ref.count or len(ref.images or ()) or PRC_REFERENCE_COUNT)
        if few <= PRC_K:
            why = f"precision/recall needs more than k = {PRC_K} images on each side ({few} given)"
            if explicit:
                raise ValueError(f"--metrics prc: {why}")
            notes.append(f"prc skipped: {why}")
            chosen.remove("prc")
    if num_samples <= POOL_DIM and {"fid", "sfid"} & set(chosen):
        notes.append(f"{num_samples} samples for {POOL_DIM}-d features: the covariance is singular and FID is "
                     f"biased upwards; compare only with FIDs of the same sample count (papers use 50,000)")
    return chosen, notes


def _metrics(chosen, feats, ref, bootstrap: int, bootstrap_block: int, seed: int,
             other: Features | None = None) -> dict:
    results: dict = {}
    fd = FrechetDistance(ref.mu, ref.sigma)
    if "fid" in chosen:
        results["fid"] = fd.of_features(feats.pool)
        if bootstrap:  # one set of resamples for the interval and the paired difference
            values = resampled_fids(feats.pool, fd, bootstrap, bootstrap_block, seed)
            results["fid_bootstrap"] = bootstrap_fid(feats.pool, fd, bootstrap, bootstrap_block, seed,
                                                     estimate=results["fid"], values=values)
            if other is not None:
                other_fid = fd.of_features(other.pool)
                results["fid_paired"] = dict(
                    paired_fid_difference(feats.pool, other.pool, fd, bootstrap, bootstrap_block, seed,
                                          values=values, estimate=results["fid"] - other_fid), other_fid=other_fid)
    if "sfid" in chosen:
        results["sfid"] = FrechetDistance(ref.mu_s, ref.sigma_s).of_features(feats.spatial)
    if "isc" in chosen:
        results["isc"], results["isc_std"] = inception_score(feats.logits)
    if "prc" in chosen:
        results["precision"], results["recall"] = precision_recall(feats.pool, ref.pool)
    if "kid" in chosen:
        results["kid"], results["kid_std"] = kernel_inception_distance(feats.pool, ref.pool, seed)
    return results


def format_table(report: dict) -> str:
    m = report["metrics"]
    rows = []
    if "fid" in m:
        rows.append(("FID", f"{m['fid']:.4f}"))
    if "fid_bootstrap" in m:
        b = m["fid_bootstrap"]
        rows.append((f"FID 95% CI ({b['rounds']} resamples, block {b['block']}, bias-corrected)",
                     f"[{b['ci95'][0]:.4f}, {b['ci95'][1]:.4f}]  std {b['std']:.4f}  bias {b['bias']:+.4f}"))
    if "fid_paired" in m:
        p = m["fid_paired"]
        rows.append(("FID of --paired-with", f"{p['other_fid']:.4f}"))
        rows.append((f"FID - FID(--paired-with), paired 95% CI (block {p['block']})",
                     f"{p['difference']:+.4f}  [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]"))
    if "sfid" in m:
        rows.append(("sFID", f"{m['sfid']:.4f}"))
    if "isc" in m:
        rows.append(("Inception Score", f"{m['isc']:.4f} +- {m['isc_std']:.4f}"))
    if "precision" in m:
        rows.append(("Precision", f"{m['precision']:.4f}"))
        rows.append(("Recall", f"{m['recall']:.4f}"))
    if "kid" in m:
        rows.append(("KID", f"{m['kid']:.6f} +- {m['kid_std']:.6f}"))
    s, r = report["samples"], report["reference"]
    rows.append(("samples", f"{s['count']} images  sha256 {s['sha256'][:16]}"))
    rows.append(("reference", f"{r['path']}" + (f"  ({r['count']} images)" if r["count"] else "")))
    w = max(len(k) for k, _ in rows)
    return "\n".join([f"{k.ljust(w)}  {v}" for k, v in rows] + [f"note: {n}" for n in report["notes"]])
