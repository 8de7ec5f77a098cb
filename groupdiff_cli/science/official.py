"""Checkpoints released by others, read into our layout and time convention.

Three layouts are recognised from the file itself (``read_checkpoint``):

=========  ==========================================  ==============================  =======================
layout     files                                       tensors                         convention
=========  ==========================================  ==============================  =======================
dit-sit    DiT's and SiT's ``*-XL-2-256x256.pt``, or   our names (ours follow theirs)  ours
           DiT's training saves (model, ema, opt,
           args)
repa       REPA's SiT saves (model, ema, opt, args,    ours plus ``projectors.*``      t = 1 noise, predicts
           steps) and its released ``last.pt``         (REPA's alignment heads)        eps - x0
groupdiff  the GroupDiff authors' ``gdiff-*.pth``      ``denoiser.*``, the sample      SiT: as REPA;
           (model, model_ema, optimizer, epoch)        table ``sample_embedder.        DiT: DDPM, as ours
                                                       embedding_table.weight``
=========  ==========================================  ==============================  =======================

Our network convention is vanilla SiT's (fed 1 - t, predicting the data-ward velocity
x0 - eps; ``objectives.Flow`` serves it). A network in REPA's convention is converted
exactly when it is read (``flip_flow_convention``): its output layer is negated and
t -> 1 - t is folded into the first layer of the timestep MLP, since the sinusoidal
features of 1 - t are a fixed linear map (a reflection) of those of t. After that the
rest of groupdiff (objectives, samplers, guidance, fine-tuning) needs no second
convention, and the converted weights fine-tune exactly as any SiT.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field

import torch

from groupdiff_cli.plumbing.defaults import MAX_GROUP_SIZE
from groupdiff_cli.plumbing.integrity import load_safetensors
from groupdiff_cli.plumbing.torchfiles import load_torch, looks_like
from groupdiff_cli.science.models import SAMPLE_EMBED_KEY, SIZES, GroupDiT, create_model

EMA_ENTRIES = ("ema", "model_ema")  # DiT/REPA, the GroupDiff release
MODEL_ENTRIES = ("model", "state_dict")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "denoiser.")  # DDP, torch.compile, the GroupDiff release
RELEASE_SAMPLE_TABLE = "sample_embedder.embedding_table.weight"
REPA_HEADS = "projectors."
TIME_MLP_IN, OUTPUT_WEIGHT, OUTPUT_BIAS = "t_embedder.mlp.0.weight", "final_layer.linear.weight", "final_layer.linear.bias"


@dataclass
class ForeignCheckpoint:
    """A checkpoint read into our names and our convention."""

    state_dict: dict[str, torch.Tensor]
    layout: str  # "dit-sit" | "repa" | "groupdiff"
    family: str | None  # "DiT" / "SiT" when the file says so; None: only its name can tell
    entry: str | None  # the dict entry read ("ema", "model_ema", "model"); None for a bare state dict
    converted: bool  # the time/sign convention was flipped to ours
    group_size: int | None  # the release's training group size (rows of its sample table)
    notes: list[str] = field(default_factory=list)


def _torch_load(path) -> object:
    # DiT's and REPA's training saves also pickle the argparse.Namespace of the run
    return load_torch(path, str(path), safe_globals=[argparse.Namespace])


def _pick_entry(obj, weights: str, path) -> tuple[dict, str | None, list[str]]:
    """The state dict of ``weights`` ("ema" or "model") in a loaded file."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None, []
    if isinstance(obj, dict):
        ema = next((k for k in EMA_ENTRIES if isinstance(obj.get(k), dict) and obj[k]), None)
        raw = next((k for k in MODEL_ENTRIES if isinstance(obj.get(k), dict) and obj[k]), None)
        if weights == "ema" and ema:
            return obj[ema], ema, []
        if weights == "ema" and raw:
            return obj[raw], raw, [f"note: {path} has no EMA weights; read its '{raw}' entry"]
        if weights == "model" and raw:
            return obj[raw], raw, []
        if weights == "model" and ema:
            raise ValueError(f"--weights model: {path} holds only EMA weights ('{ema}'); use --weights ema")
    raise ValueError(f"{path}: not a state dict (nor a dict with {', '.join(map(repr, EMA_ENTRIES + MODEL_ENTRIES))})")


def time_flip_matrix(dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """M (float64, dim x dim) with features(1 - t) = M @ features(t) for the sinusoidal
    timestep features [cos(t f), sin(t f)] of ``TimestepEmbedder``: per frequency f,
    cos(f - tf) = cos f cos tf + sin f sin tf and sin(f - tf) = sin f cos tf - cos f sin tf.
    M is a reflection (M @ M = I), so the conversion is its own inverse."""
    half = dim // 2
    # the frequencies exactly as the network rounds them (float32), the rest in float64
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).double()
    cos, sin = torch.diag(freqs.cos()), torch.diag(freqs.sin())
    return torch.cat([torch.cat([cos, sin], 1), torch.cat([sin, -cos], 1)], 0)


def flip_flow_convention(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A flow network in REPA's convention (fed t with t = 1 noise, predicting eps - x0)
    as one in vanilla SiT's (fed 1 - t, predicting x0 - eps), exactly: net'(x, s) =
    -net(x, 1 - s). Applied twice it gives the input back (up to float rounding)."""
    out = dict(sd)
    w = sd[TIME_MLP_IN]
    out[TIME_MLP_IN] = (w.double() @ time_flip_matrix(w.shape[1])).to(w.dtype)
    # the output rows are (patch row, patch column, channel) with the channel fastest;
    # only the velocity channels flip (learned-variance channels, if any, do not)
    c = sd["x_embedder.proj.weight"].shape[1]
    p = sd["x_embedder.proj.weight"].shape[2]
    rows = sd[OUTPUT_WEIGHT].shape[0]
    sign = torch.where(torch.arange(rows) % (rows // (p * p)) < c, -1.0, 1.0)
    out[OUTPUT_WEIGHT] = sd[OUTPUT_WEIGHT] * sign[:, None].to(sd[OUTPUT_WEIGHT].dtype)
    out[OUTPUT_BIAS] = sd[OUTPUT_BIAS] * sign.to(sd[OUTPUT_BIAS].dtype)
    return out


def _learns_sigma(sd: dict[str, torch.Tensor]) -> bool:
    c, p = sd["x_embedder.proj.weight"].shape[1], sd["x_embedder.proj.weight"].shape[2]
    return sd[OUTPUT_WEIGHT].shape[0] == 2 * c * p * p


def read_checkpoint(path, weights: str = "ema") -> ForeignCheckpoint:
    """Read a DiT/SiT, REPA or GroupDiff-release file (``.pt``/``.pth`` with
    ``weights_only=True``, or ``.safetensors``) into our names and convention."""
    if str(path).endswith(".safetensors"):
        sd, entry, notes = load_safetensors(path), None, []
    elif looks_like(path) == "a safetensors file":
        sd, entry, notes = load_safetensors(path), None, [f"note: {path} is a safetensors file; read as one"]
    else:
        sd, entry, notes = _pick_entry(_torch_load(path), weights, path)
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: its '{entry}' entry is not a state dict of tensors")
    release = False
    for prefix in WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
            release |= prefix == "denoiser."
    if RELEASE_SAMPLE_TABLE in sd:
        sd = {(SAMPLE_EMBED_KEY if k == RELEASE_SAMPLE_TABLE else k): v for k, v in sd.items()}
        release = True
    heads = sorted(k for k in sd if k.startswith(REPA_HEADS))
    for key in ("x_embedder.proj.weight", TIME_MLP_IN, OUTPUT_WEIGHT, OUTPUT_BIAS):
        if key not in sd:
            raise ValueError(f"{path}: not a DiT/SiT checkpoint (no tensor {key})")
    if release:
        family = "DiT" if _learns_sigma(sd) else "SiT"
        layout = "groupdiff"
    elif heads:
        family, layout = "SiT", "repa"
        sd = {k: v for k, v in sd.items() if not k.startswith(REPA_HEADS)}
        notes.append(f"note: dropped REPA's {len(heads)} projector tensors ({heads[0]}, ...): they serve its "
                     f"representation-alignment loss only")
    else:
        family, layout = None, "dit-sit"
    converted = layout != "dit-sit" and family == "SiT"
    if converted:
        sd = flip_flow_convention(sd)
    group_size = int(sd[SAMPLE_EMBED_KEY].shape[0]) if release and SAMPLE_EMBED_KEY in sd else None
    return ForeignCheckpoint(sd, layout, family, entry, converted, group_size, notes)


def infer_architecture(sd: dict[str, torch.Tensor]) -> dict:
    """Read the size, patch, input size, channels and classes off a DiT/SiT state dict."""
    try:
        hidden, in_ch, patch, _ = sd["x_embedder.proj.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        num_patches = sd["pos_embed"].shape[1]
        out_ch = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
        num_classes = sd["y_embedder.embedding_table.weight"].shape[0] - 1
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a DiT/SiT state dict (cannot read {e})") from None
    sizes = [s for s, d in SIZES.items() if d["depth"] == depth and d["hidden_size"] == hidden]
    if not sizes:
        raise ValueError(f"no registry size has depth {depth} and hidden size {hidden}")
    return dict(size=sizes[0], patch_size=patch, input_size=int(round(num_patches**0.5)) * patch, in_channels=in_ch,
                learn_sigma=out_ch == 2 * in_ch, num_classes=num_classes)


def family_by_name(path) -> str | None:
    """DiT or SiT as an official file's name says (``DiT-XL-2-256x256.pt``), or None."""
    base = os.path.basename(str(path)).lower()
    return "SiT" if base.startswith("sit") else "DiT" if base.startswith("dit") else None


def load_pretrained(path, name: str | None = None, max_group_size: int = MAX_GROUP_SIZE,
                    weights: str = "ema") -> tuple[GroupDiT, dict]:
    """A GroupDiT holding a foreign checkpoint (see ``read_checkpoint``).

    ``name``: the registry name; when omitted, read off the tensor shapes, the family
    from the file (REPA and the release say it) or else from its name (official files
    are called ``SiT-XL-2-256x256.pt`` / ``DiT-XL-2-256x256.pt``; DiT otherwise). A sample
    embedding the file lacks is zero-initialised, so the loaded model at any group size
    1 equals the pretrained one. Returns the model and a description: ``layout``,
    ``entry``, ``family``, ``converted``, ``group_size``, ``new_tensors`` and ``notes``.
    Any other missing or unexpected tensor, or a shape mismatch, is a ValueError naming
    the file and the tensors.
    """
    ck = read_checkpoint(path, weights)
    sd = ck.state_dict
    arch = infer_architecture(sd)
    named = family_by_name(path)
    if name is None:
        family = ck.family or named or "DiT"
        name = f"{family}-{arch['size']}/{arch['patch_size']}"
    elif ck.family and not name.startswith(ck.family):
        raise ValueError(f"--model {name}: {path} holds a {ck.family} ({'with' if arch['learn_sigma'] else 'without'} "
                         f"learned variance, {ck.layout} layout)")
    elif not ck.family and named and not name.startswith(named):
        # DiT's and SiT's official files hold the same tensors: only the name tells a DDPM
        # network from a flow one, and starting one objective from the other's weights is
        # no conversion but a new training
        objective = {"DiT": "DDPM, eps and learned variance", "SiT": "flow matching, velocity"}
        raise ValueError(f"--model {name}: {path} is a {named} checkpoint by its name ({objective[named]}); use "
                         f"--model {named}-{arch['size']}/{arch['patch_size']}, or rename the file if its name is "
                         f"wrong (a SiT's starts with 'SiT')")
    model = create_model(name, input_size=arch["input_size"], in_channels=arch["in_channels"],
                         learn_sigma=arch["learn_sigma"], num_classes=arch["num_classes"],
                         max_group_size=sd[SAMPLE_EMBED_KEY].shape[0] if SAMPLE_EMBED_KEY in sd else max_group_size)
    own = model.state_dict()
    new = [SAMPLE_EMBED_KEY] if SAMPLE_EMBED_KEY not in sd else []
    missing = sorted(set(own) - set(sd) - set(new))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit {name}: missing keys {missing}, unexpected keys {unexpected}")
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{path}: checkpoint does not fit {name}: shape mismatch {wrong}")
    if new:
        sd = {**sd, SAMPLE_EMBED_KEY: torch.zeros_like(own[SAMPLE_EMBED_KEY])}
    model.load_state_dict(sd, strict=True)
    return model, dict(layout=ck.layout, entry=ck.entry, family=name.split("-")[0], converted=ck.converted,
                       group_size=ck.group_size, new_tensors=new, notes=ck.notes)


def describe(info: dict) -> str:
    """One line saying what was read from a foreign file (for logs)."""
    parts = [f"{info['layout']} layout", f"entry '{info['entry']}'" if info["entry"] else "bare state dict"]
    if info["converted"]:
        parts.append("time and sign converted to ours (exact)")
    if info["group_size"]:
        parts.append(f"trained in groups of {info['group_size']}")
    return ", ".join(parts)

