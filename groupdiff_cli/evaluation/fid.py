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
from groupdiff_cli.evaluation.images import NpzImages, npz_keys, npz_member, open_images, recorded_group_size
from groupdiff_cli.evaluation.inception import (POOL_DIM, SPATIAL_DIM, Features, InceptionFeatures, cache_dir,
                                                extract_features, images_sha256, load_pool_features,
                                                private_folder, save_pool_features)
from groupdiff_cli.evaluation.metrics import (PRC_K, FrechetDistance, bootstrap_fid, gaussian_stats, inception_score,
                                              kernel_inception_distance, paired_fid_difference, precision_recall,
                                              resampled_fids)
from groupdiff_cli.plumbing.defaults import MAX_BOOTSTRAP
from groupdiff_cli.plumbing.distributed import on_main, process_state
from groupdiff_cli.plumbing.integrity import DIGEST_KEY, IntegrityError, file_sha256, load_arrays, save_arrays
from groupdiff_cli.plumbing.layout import LABELS_FILE, POOL_FEATURES, SAMPLE_CONFIG
from groupdiff_cli.plumbing.seeds import Draw, evaluation_rng

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
    return np.sort(evaluation_rng(seed, Draw.PRC_SUBSET).choice(n, PRC_REFERENCE_COUNT, replace=False))


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
    evaluator = Evaluator(images_path, inception_weights, batch_size=batch_size, num_workers=num_workers, cpu=cpu,
                          save_ref_stats=out)
    return dict(count=evaluator.reference.count, out=str(out))


def is_stats_file(path: Path) -> bool:
    return path.is_file() and path.suffix == ".npz" and "mu" in npz_keys(path)


# --------------------------------------------------------------------------- #
#  The evaluator                                                               #
# --------------------------------------------------------------------------- #
class Evaluator:
    """The Inception network and one reference, each built once and on first use (so
    that bad input is refused before any network runs): the metrics of sample sets
    against the reference, and paired FID differences between sets drawn from the same
    seeds and labels. `fid`, `study` and `demo` all evaluate through one.

    ``reference``: statistics (ADM's reference batch, or ``save_reference``'s file) or
    images (npz or folder), whose statistics are then written to ``save_ref_stats`` when
    given. ``reference_features``: a pool-features file of the reference images
    (``save_pool_features``) to use instead of extracting them when it fits (the
    demo's shipped digits). ``extractor``: an already built ``InceptionFeatures`` (then
    ``inception_weights`` is not read). Features of a sample set and its bootstrap
    resamples are computed once per evaluator.
    """

    def __init__(self, reference, inception_weights=None, *, batch_size: int = 100, num_workers: int = 0,
                 cpu: bool = False, save_ref_stats=None, reference_features=None,
                 extractor: InceptionFeatures | None = None):
        self.ref_path = Path(reference)
        if not self.ref_path.exists():
            raise FileNotFoundError(f"{self.ref_path}: no such file or folder")
        if save_ref_stats and is_stats_file(self.ref_path):
            raise ValueError(f"--save-ref-stats: {self.ref_path} already holds statistics, not images")
        self.state = process_state(cpu)
        self.batch_size, self.num_workers = batch_size, num_workers
        self._weights, self._save, self._ref_features = inception_weights, save_ref_stats, reference_features
        self._extractor, self._reference = extractor, None
        self._features: dict[tuple[str, bool], Features] = {}
        self._resampled: dict[tuple, np.ndarray] = {}
        self._frechet: FrechetDistance | None = None  # holds the reference's matrix square root
        self.notes: list[str] = []  # what happened to caches on the way

    @property
    def extractor(self) -> InceptionFeatures:
        if self._extractor is None:
            self._extractor = InceptionFeatures(self._weights)
        return self._extractor

    @property
    def reference(self) -> Reference:
        if self._reference is None:
            self._reference = self._read_reference()
        return self._reference

    def _extract(self, images, desc: str) -> Features:
        return extract_features(images, extractor=self.extractor, batch_size=self.batch_size,
                                num_workers=self.num_workers, state=self.state, desc=desc)

    def _read_reference(self) -> Reference:
        """Read from a stats file, or computed from the images (and saved to ``save_ref_stats``).
        The statistics of images are kept in the user cache under the images' sha256 and the
        network's, so the next run against the same images skips the network."""
        if is_stats_file(self.ref_path):
            ref = load_reference_stats(self.ref_path)
            for name, arr, dim in (("mu", ref.mu, POOL_DIM), ("mu_s", ref.mu_s, SPATIAL_DIM)):
                if arr is not None and arr.shape != (dim,):
                    raise ValueError(f"feature dimensions differ: samples have {dim}, the reference {self.ref_path} "
                                     f"has {name} of shape {arr.shape}")
            return ref
        images = open_images(self.ref_path)
        if len(images) < 2:
            raise ValueError(f"{self.ref_path}: {len(images)} image(s); a reference needs at least 2")
        ref, cache = None, None
        if self._ref_features is None:  # (the demo passes the shipped features instead)
            key = images_sha256(images)
            cache = self._cache_file(f"{key[:16]}-{self.extractor.weights['sha256'][:16]}-stats.npz")
            ref = self._cached_reference(cache, key)
        if ref is None:
            feats = self.features(self.ref_path, images, pool_only=self._ref_features is not None,
                                  desc="reference", cache=self._ref_features)
            ref = reference_from_features(str(self.ref_path), feats)
            self._keep(ref, cache)
        if self._save and self.state.is_main_process:
            save_reference(ref, self._save)
        return ref

    def _cache_file(self, name: str) -> Path | None:
        """``name`` in the user cache's reference folder (private to the user), or None with
        a note when it cannot be made."""
        try:
            return private_folder(private_folder(cache_dir()) / "references") / name
        except OSError as e:
            self.notes.append(f"reference features are not cached ({e.strerror or e}): set XDG_CACHE_HOME to a "
                              f"writable folder to keep them")
            return None

    def _cached_reference(self, cache: Path | None, key: str) -> Reference | None:
        if cache is None or not cache.is_file():
            return None
        try:
            ref = load_reference_stats(cache)
        except (IntegrityError, ValueError) as e:
            self.notes.append(f"{e}: recomputed")
            return None
        ref.source, ref.sha256 = str(self.ref_path), key
        return ref

    def _keep(self, ref: Reference, cache: Path | None) -> None:
        if cache is not None and self.state.is_main_process:
            try:
                save_reference(ref, cache)
            except OSError as e:
                self.notes.append(f"reference statistics not kept in {cache} ({e.strerror or e}); the metrics are "
                                  f"unaffected")

    def _reference_pool(self, ref: Reference) -> np.ndarray:
        """The pool features of a reference batch's images (ADM's batches store none, and
        precision/recall need them): extracted once, then kept in the user cache under the
        file's sha256 and the network's, checksummed."""
        cache = self._cache_file(f"{ref.sha256[:16]}-{self.extractor.weights['sha256'][:16]}.npz")
        return self.features(self.ref_path, ref.images, desc="reference images", cache=cache, keep=True).pool

    def features(self, path, images=None, pool_only: bool = True, desc: str = "samples", cache=None,
                 keep: bool = False) -> Features:
        """The features of the image set at ``path``: kept from an earlier call, else the
        pool features saved in ``cache`` (default: a `groupdiff sample` folder's
        ``POOL_FEATURES``) when those are all that is needed and they were made from the
        same pixels by the same network, else extracted (and kept in a sample folder, so
        that evaluating it again skips the network; ``keep``: kept in ``cache`` too). A
        corrupt cache is recomputed and one that cannot be written is skipped, each with a
        note."""
        name = str(Path(path).resolve())
        for kept in ((name, False), (name, True)) if pool_only else ((name, False),):  # all features serve pool_only
            if kept in self._features:
                return self._features[kept]
        folder = Path(path)
        images = images if images is not None else open_images(path)
        cache = Path(cache) if cache is not None else (folder / POOL_FEATURES if folder.is_dir() else None)
        feats = None
        if pool_only and cache is not None:
            try:
                feats = load_pool_features(cache, images, self.extractor)
            except IntegrityError as e:
                self.notes.append(f"{e}: recomputed")
        if feats is None:
            feats = self._extract(images, desc)
            if cache is not None and (keep or (folder / SAMPLE_CONFIG).is_file()) and self.state.is_main_process:
                try:
                    save_pool_features(feats, cache, self.extractor)
                except OSError as e:
                    self.notes.append(f"pool features not kept in {cache} ({e.strerror or e}); the metrics are "
                                      f"unaffected")
        self._features[name, pool_only] = feats
        return feats

    @property
    def frechet(self) -> FrechetDistance:
        """FID against the reference; built once (a 2,048-d eigen-decomposition)."""
        if self._frechet is None:
            self._frechet = FrechetDistance(self.reference.mu, self.reference.sigma)
        return self._frechet

    def fid(self, samples) -> float:
        """FID of a sample set (computed on the main process, known to all)."""
        _, pool = self.reference, self.features(samples).pool  # every process extracts its share
        return on_main(self.state, lambda: self.frechet.of_features(pool))

    def resampled_fids(self, samples, rounds: int, block: int, seed: int) -> np.ndarray:
        """``metrics.resampled_fids`` of a sample set, computed once per (rounds, block, seed)
        (on the main process: call it there)."""
        key = (str(Path(samples).resolve()), rounds, block, seed)
        if key not in self._resampled:
            self._resampled[key] = resampled_fids(self.features(samples).pool, self.frechet, rounds, block, seed,
                                                  self.state.device)
        return self._resampled[key]

    def paired_difference(self, samples, other, rounds: int, block: int, seed: int = 0) -> dict:
        """FID(samples) - FID(other) for two sets whose image i came from the same seed and
        label, with the paired bootstrap interval (``metrics.paired_fid_difference``);
        also ``fid`` and ``other_fid``. Computed on the main process, known to all."""
        _, mine, theirs = self.reference, self.features(samples).pool, self.features(other).pool

        def compute():
            fd = self.frechet
            fid_a, fid_b = fd.of_features(mine), fd.of_features(theirs)
            out = paired_fid_difference(mine, theirs, fd, rounds, block, seed,
                                        base_values=self.resampled_fids(other, rounds, block, seed),
                                        values=self.resampled_fids(samples, rounds, block, seed),
                                        estimate=fid_a - fid_b)
            return dict(out, fid=fid_a, other_fid=fid_b)

        return on_main(self.state, compute)

    def evaluate(self, samples, metrics=DEFAULT_METRICS, *, bootstrap: int = 0, bootstrap_block: int | None = None,
                 seed: int = 0, explicit_metrics: bool = True, paired_with=None) -> tuple[dict, Features]:
        """Compute ``metrics`` of the SAMPLES images against the reference; returns every
        number and the provenance (counts, hashes, feature extractor and weights) as a
        dict, and the samples' features. ``bootstrap_block``: samples resampled together
        [default: the group size that `groupdiff sample` recorded, else 1].
        ``paired_with``: a second sample set whose image i came from the same seed and
        label; adds FID(samples) - FID(paired_with) with a paired bootstrap interval. With
        ``explicit_metrics=False`` (the default metric set) a metric the reference cannot
        support (e.g. sFID against statistics without mu_s) is skipped with a note
        instead of being an error."""
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"--metrics: unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
        images = open_images(samples)
        if len(images) < 2:
            raise ValueError(f"{samples}: {len(images)} image(s); metrics need at least 2")
        block, other_images = _checked_resampling(samples, len(images), metrics, bootstrap, bootstrap_block,
                                                  paired_with)
        ref = self.reference
        chosen, notes = _supported_metrics(metrics, ref, self.ref_path, len(images), self.extractor.has_logits,
                                           explicit_metrics)
        if ref.pool is None and ref.images is not None and ({"prc", "kid"} & set(chosen)):
            ref.pool = self._reference_pool(ref)
        feats = self.features(samples, images, set(chosen) <= POOL_METRICS)
        other = None if paired_with is None else self.features(paired_with, other_images, desc="paired samples")
        # lazy: torch-fidelity adds ~2.5 s to start-up; only computing features or metrics needs it
        import torch_fidelity

        report = dict(  # the metrics on the main process alone: every process gets them
            metrics=on_main(self.state, lambda: _metrics(chosen, feats, ref, self.frechet if "fid" in chosen else None,
                                                         bootstrap, block, seed, other, self.state.device)),
            notes=[*self.extractor.notes, *self.notes, *notes],  # what happened to the caches, if anything
            samples=dict(path=str(samples), count=len(feats), sha256=feats.sha256),
            reference=dict(path=str(self.ref_path), count=ref.count, sha256=ref.sha256,
                           prc_images=None if ref.pool is None else len(ref.pool)),
            feature_extractor=dict(**self.extractor.weights, torch_fidelity=torch_fidelity.__version__),
            processes=self.state.num_processes,
            groupdiff=__version__,
        )
        if other is not None:
            report["paired_with"] = dict(path=str(paired_with), count=len(other), sha256=other.sha256)
        return report, feats


def evaluate(samples, reference, metrics=DEFAULT_METRICS, *, inception_weights=None, batch_size: int = 100,
             num_workers: int = 0, save_ref_stats=None, cpu: bool = False, extractor=None, **options) -> dict:
    """The `groupdiff fid` job: ``Evaluator(reference, ...).evaluate(samples, metrics, **options)``'s report."""
    evaluator = Evaluator(reference, inception_weights, batch_size=batch_size, num_workers=num_workers, cpu=cpu,
                          save_ref_stats=save_ref_stats, extractor=extractor)
    return evaluator.evaluate(samples, metrics, **options)[0]


POOL_METRICS = frozenset({"fid", "prc", "kid"})  # the metrics that pool features alone support


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


def _metrics(chosen, feats, ref, fd: FrechetDistance | None, bootstrap: int, bootstrap_block: int, seed: int,
             other: Features | None = None, device=None) -> dict:
    """The chosen metrics; ``fd``: FID against the reference (when "fid" is chosen);
    ``device``: where the bootstrap and precision/recall run."""
    results: dict = {}
    if "fid" in chosen:
        results["fid"] = fd.of_features(feats.pool)
        if bootstrap:  # one set of resamples for the interval and the paired difference
            values = resampled_fids(feats.pool, fd, bootstrap, bootstrap_block, seed, device)
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
        results["precision"], results["recall"] = precision_recall(feats.pool, ref.pool, device=device)
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
