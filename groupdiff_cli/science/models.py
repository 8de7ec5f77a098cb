"""The group-attention diffusion transformer (GroupDiff over DiT/SiT) and its registry.

One backbone serves DiT and SiT: they share the architecture and the parameter
names of the official checkpoints; they differ only in the objective the model is
trained with (DiT: DDPM epsilon + learned variance, SiT: flow matching), which the
registry records as ``family``.

Group attention (method.md §2): the batch is a flat list of images in which
consecutive runs form groups. Everything is per image except self-attention: before
it, the (B*N, L, D) tokens of a group are *viewed* as (B, N*L, D) so that one
``scaled_dot_product_attention`` call attends over the whole group; afterwards they
are viewed back. Group size is an argument of ``forward``: an int for the whole
batch, or one entry per group, so that e.g. the conditional half of a CFG batch can
run at size 1 and the unconditional half at size 16 in the same call.

Each image of a group also gets a distinct row of a learnable sample-embedding
table (``s_embedder``) added to its conditioning vector, c = t_emb + y_emb + s_emb.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp, PatchEmbed
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from groupdiff_cli.plumbing.defaults import MAX_GROUP_SIZE

# name of the one tensor that official DiT/SiT checkpoints lack
SAMPLE_EMBED_KEY = "s_embedder.weight"

GroupSize = int | Sequence[int]


# --------------------------------------------------------------------------- #
#  Embeddings                                                                  #
# --------------------------------------------------------------------------- #
def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding, (grid*grid, dim), row-major.

    Same layout as DiT/MAE: the first half of the channels encodes the column (x)
    coordinate, the second half the row (y); each half is [sin | cos].
    """
    assert dim % 4 == 0, "positional embedding needs a hidden size divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid, dtype=torch.float64)
    y, x = torch.meshgrid(coords, coords, indexing="ij")

    def embed_1d(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed_1d(x), embed_1d(y)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (B,) -> (B, D): sinusoidal features, then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, D). Row ``num_classes`` is the null (unconditional) class.

    Label dropout for classifier-free guidance is the trainer's job (it writes the
    null label); the model only embeds what it is given.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


# --------------------------------------------------------------------------- #
#  Group layout                                                                #
# --------------------------------------------------------------------------- #
def group_runs(group_size: GroupSize, batch: int, max_group_size: int) -> tuple[tuple[int, int], ...]:
    """Validate a group size and compress it to runs of (num_images, group_size).

    ``group_size`` is an int (every group of the batch has that size) or one int per
    group, in batch order. Consecutive groups of equal size are merged into one run so
    that each run is a single attention call.
    """
    if isinstance(group_size, int):
        if group_size < 1 or group_size > max_group_size:
            raise ValueError(f"group size {group_size} is outside [1, max_group_size={max_group_size}]")
        if batch % group_size:
            raise ValueError(f"batch of {batch} images is not divisible by group size {group_size}")
        return ((batch, group_size),)
    sizes = [int(n) for n in group_size]
    bad = [n for n in sizes if n < 1 or n > max_group_size]
    if bad:
        raise ValueError(f"group size {bad[0]} is outside [1, max_group_size={max_group_size}]")
    if sum(sizes) != batch:
        raise ValueError(f"group sizes add up to {sum(sizes)} images but the batch has {batch}")
    runs: list[list[int]] = []
    for n in sizes:
        if runs and runs[-1][1] == n:
            runs[-1][0] += n
        else:
            runs.append([n, n])
    return tuple((count, n) for count, n in runs)


# --------------------------------------------------------------------------- #
#  Transformer blocks                                                          #
# --------------------------------------------------------------------------- #
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class GroupAttention(nn.Module):
    """Multi-head self-attention over all tokens of a group of images.

    x: (B*N, L, D) -> (B*N, L, D). For each run of groups of size N, the tokens are
    viewed as (B, N*L, D) (a view: no copy), attended with one SDPA call, and viewed
    back. With N = 1 this is exactly per-image attention.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0, "hidden size must be divisible by the number of heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.probe = None  # `groupdiff attention` sets a callable(q, k, n) to measure; never in training

    def qkv_heads(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B*N, L, D) tokens of a run -> q, k, v each (B, heads, N*L, head_dim)."""
        # a group's N images are one sequence: a view of the batch, no copy
        return rearrange(self.qkv(x), "(b n) l (three h d) -> three b h (n l) d", n=n, three=3,
                         h=self.num_heads).unbind(0)

    def forward(self, x: torch.Tensor, runs: tuple[tuple[int, int], ...]) -> torch.Tensor:
        outs = []
        start = 0
        for count, n in runs:
            q, k, v = self.qkv_heads(x[start : start + count], n)
            if self.probe is not None and n > 1:
                self.probe(q, k, n)
            o = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N*L, head_dim)
            outs.append(rearrange(o, "b h (n l) d -> (b n) l (h d)", n=n))
            start += count
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        return self.proj(out)


class GroupDiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning (per image) and group attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = GroupAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, runs: tuple[tuple[int, int], ...]) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), runs)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------- #
#  The model                                                                   #
# --------------------------------------------------------------------------- #
class GroupDiT(nn.Module):
    """DiT/SiT backbone whose images attend to each other within groups.

    forward(x, t, y, group_size=1, sample_ids=None)
        x: (B*N, C, H, W) latents, consecutive runs of N images form a group
        t: (B*N,) timesteps (DDPM step index, or flow time), one per image
        y: (B*N,) class labels in [0, num_classes]; num_classes is the null class
        -> (B*N, out_channels, H, W); out_channels = 2C with learn_sigma
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        max_group_size: int = MAX_GROUP_SIZE,
    ):
        super().__init__()
        if max_group_size < 1:
            raise ValueError(f"max_group_size must be >= 1, got {max_group_size}")
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.max_group_size = max_group_size
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.s_embedder = nn.Embedding(max_group_size, hidden_size)
        num_patches = self.x_embedder.num_patches
        # fixed, but stored in the state dict under the official name
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(GroupDiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self, sample_embed_std: float = 0.02) -> None:
        """DiT's initialisation: xavier linears, adaLN-Zero, zero output layer."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        grid = int(self.x_embedder.num_patches**0.5)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid).unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if sample_embed_std > 0:
            nn.init.normal_(self.s_embedder.weight, std=sample_embed_std)
        else:
            nn.init.zeros_(self.s_embedder.weight)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W)."""
        p = self.patch_size
        h = int(x.shape[1] ** 0.5)
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, p=p, q=p)

    def draw_sample_ids(self, runs: tuple[tuple[int, int], ...], device, generator: torch.Generator | None = None):
        """Distinct sample-embedding rows per group: the first N entries of a fresh
        random permutation of the ``max_group_size`` rows, one permutation per group."""
        ids = []
        # torch.rand's overload with a generator argument takes no symbolic sizes, which
        # torch.compile uses once it has seen a second group layout: pass it only when given
        seeded = {} if generator is None else dict(generator=generator)
        for count, n in runs:
            perm = torch.rand(count // n, self.max_group_size, device=device, **seeded).argsort(dim=1)
            ids.append(perm[:, :n].reshape(-1))
        return ids[0] if len(ids) == 1 else torch.cat(ids)

    def check_labels(self, y: torch.Tensor) -> None:
        # Only on CPU tensors: on a GPU the check would force a host sync every step;
        # there the data pipeline and the sampler validate labels on the host.
        if y.device.type == "cpu" and y.numel() and not torch.compiler.is_compiling():
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi > self.num_classes:
                bad = lo if lo < 0 else hi
                raise ValueError(f"label {bad} is outside [0, {self.num_classes}] ({self.num_classes} is the null class)")

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        group_size: GroupSize = 1,
        sample_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        runs = group_runs(group_size, x.shape[0], self.max_group_size)
        self.check_labels(y)
        if sample_ids is None:
            sample_ids = self.draw_sample_ids(runs, x.device, generator)
        x = self.x_embedder(x) + self.pos_embed  # (B*N, L, D)
        c = self.t_embedder(t) + self.y_embedder(y) + self.s_embedder(sample_ids)  # (B*N, D)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, runs, use_reentrant=False)
            else:
                x = block(x, c, runs)
        x = self.final_layer(x, c)  # (B*N, L, p*p*out)
        return self.unpatchify(x)


# --------------------------------------------------------------------------- #
#  Registry                                                                    #
# --------------------------------------------------------------------------- #
# depth, hidden size, heads (DiT paper, Table 1). "Ti" (DeiT-Tiny's widths) and "Mi"
# are ours, for CPU work: Ti for tests and experiments, Mi (a quarter of Ti's cost per
# token) for the CPU demo. The paper has neither.
SIZES = {
    "Ti": dict(depth=12, hidden_size=192, num_heads=3),
    "Mi": dict(depth=6, hidden_size=128, num_heads=4),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
FAMILIES = {"DiT": "ddpm", "SiT": "flow"}  # family -> default objective

# name -> architecture; every entry defaults to 256px images through the SD-VAE
# (32x32x4 latents), 1000 classes, learn_sigma (as the official checkpoints). Patch 1
# only for the CPU sizes: one token per pixel of a small pixel-space image (the demo's
# 8x8 digits).
MODELS: dict[str, dict] = {
    f"{family}-{size}/{patch}": dict(family=family, patch_size=patch, **dims)
    for family in FAMILIES
    for size, dims in SIZES.items()
    for patch in ((1, 2, 4, 8) if size in ("Ti", "Mi") else (2, 4, 8))
}

DEFAULTS = dict(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, max_group_size=MAX_GROUP_SIZE,
                mlp_ratio=4.0)


def model_config(name: str, **overrides) -> dict:
    """The full constructor config of a registry entry, with overrides applied.

    The returned dict is what runs store in config.json: ``name`` and ``family``
    plus every ``GroupDiT`` argument.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    arch = dict(MODELS[name])
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown model option(s) {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
    return dict(name=name, **arch, **{**DEFAULTS, **overrides})


def create_model(name: str, **overrides) -> GroupDiT:
    """Build a registry model, e.g. ``create_model("SiT-XL/2", max_group_size=16)``."""
    cfg = model_config(name, **overrides)
    model = GroupDiT(**{k: v for k, v in cfg.items() if k not in ("name", "family")})
    model.config = cfg
    return model


def model_from_config(cfg: dict) -> GroupDiT:
    """Rebuild a model from the dict ``model_config`` returned (as saved in config.json)."""
    keys = set(DEFAULTS)
    return create_model(cfg["name"], **{k: v for k, v in cfg.items() if k in keys})


def count_params(model: nn.Module) -> int:
    """Every parameter, trainable or not (as DiT counts: pos_embed included)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(name: str, group_size: int = 1, **overrides) -> float:
    """Forward FLOPs per image, counted on the meta device (no weights allocated).

    Counted in the DiT paper's convention: one multiply-add is one FLOP (half of what
    torch's FlopCounterMode reports). Attention is counted over N*L keys, so the
    figure grows with the group size.
    """
    with torch.device("meta"):
        model = create_model(name, **overrides)
        size, ch = model.input_size, model.in_channels
        x = torch.zeros(group_size, ch, size, size)
        t = torch.zeros(group_size)
        y = torch.zeros(group_size, dtype=torch.long)
        ids = torch.arange(group_size)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, t, y, group_size=group_size, sample_ids=ids)
    return counter.get_total_flops() / 2 / group_size


def describe_models(names: Sequence[str] | None = None, group_size: int = 1) -> list[dict]:
    """One row per registry entry: its config, objective, parameter count and GFLOPs
    per image at its default resolution (what `groupdiff models` prints)."""
    rows, counted = [], {}
    for name in names or MODELS:
        cfg = model_config(name)  # raises on an unknown name, listing the valid ones
        if group_size > cfg["max_group_size"]:
            raise ValueError(f"group size {group_size} is outside [1, max_group_size={cfg['max_group_size']}]")
        arch = tuple(v for k, v in cfg.items() if k not in ("name", "family"))  # DiT and SiT share it
        if arch not in counted:
            with torch.device("meta"):
                params = count_params(create_model(name))
            counted[arch] = params, count_flops(name, group_size) / 1e9
        params, gflops = counted[arch]
        rows.append(dict(cfg, objective=FAMILIES[cfg["family"]], params=params, gflops=gflops))
    return rows
