"""The group-attention model: equivalences, isolation, equivariance, checkpoint layout."""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from groupdiff_cli.science import models
from groupdiff_cli.science.models import SAMPLE_EMBED_KEY, GroupDiT, create_model
from groupdiff_cli.science.official import load_pretrained

# parameter names/shapes of the official DiT checkpoints (a copy of shared/reference/)
REFERENCE = Path(__file__).resolve().parent / "data" / "dit_reference_keys.json"


def tiny_model(**kw) -> GroupDiT:
    """A small model with every weight random (adaLN-Zero would hide the attention)."""
    torch.manual_seed(0)
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                num_classes=10, max_group_size=8)
    model = GroupDiT(**{**args, **kw})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.1)
    return model.eval()


def inputs(model, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    y = torch.randint(0, model.num_classes + 1, (batch,), generator=g)
    return x, t, y


def reference_forward(model, x, t, y, sizes, sample_ids):
    """Group attention written out independently: explicit concatenation of each
    group's tokens and a hand-written softmax attention (no SDPA, no views)."""
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y) + model.s_embedder(sample_ids)
    heads = model.num_heads
    for blk in model.blocks:
        mod = blk.adaLN_modulation(c)
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
        a = blk.norm1(h) * (1 + sc1[:, None]) + sh1[:, None]
        out, start = [], 0
        for n in sizes:
            tokens = torch.cat([a[start + i] for i in range(n)], dim=0)  # (n*L, D)
            qkv = blk.attn.qkv(tokens)
            q, k, v = qkv.chunk(3, dim=-1)
            d = q.shape[-1] // heads
            res = []
            for hd in range(heads):
                qh, kh, vh = (z[:, hd * d:(hd + 1) * d] for z in (q, k, v))
                w = torch.softmax(qh @ kh.T / math.sqrt(d), dim=-1)
                res.append(w @ vh)
            o = blk.attn.proj(torch.cat(res, dim=-1))
            out.extend(o.split(a.shape[1], dim=0))
            start += n
        h = h + g1[:, None] * torch.stack(out)
        m = blk.norm2(h) * (1 + sc2[:, None]) + sh2[:, None]
        h = h + g2[:, None] * blk.mlp(m)
    return model.unpatchify(model.final_layer(h, c))


@pytest.mark.parametrize("sizes", [[1] * 6, [3, 3], [6], [1, 1, 4], [2, 1, 1, 2]])
def test_group_attention_matches_explicit_concatenation(sizes):
    model = tiny_model()
    x, t, y = inputs(model, sum(sizes))
    ids = torch.cat([torch.randperm(model.max_group_size)[:n] for n in sizes])
    group_size = sizes[0] if len(set(sizes)) == 1 else sizes
    with torch.no_grad():
        ours = model(x, t, y, group_size=group_size, sample_ids=ids)
        ref = reference_forward(model, x, t, y, sizes, ids)
    assert ours.shape == (sum(sizes), 8, 8, 8)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_group_size_one_is_per_image_model():
    """N = 1 over a batch equals running every image on its own."""
    model = tiny_model()
    x, t, y = inputs(model, 4)
    ids = torch.tensor([3, 0, 7, 1])
    with torch.no_grad():
        batched = model(x, t, y, group_size=1, sample_ids=ids)
        alone = torch.cat([model(x[i:i + 1], t[i:i + 1], y[i:i + 1], sample_ids=ids[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_groups_are_isolated_and_members_interact():
    model = tiny_model()
    n = 4
    x, t, y = inputs(model, 3 * n)
    ids = torch.cat([torch.randperm(model.max_group_size)[:n] for _ in range(3)])
    x2 = x.clone()
    x2[n + 1] += 1.0  # one member of the middle group
    with torch.no_grad():
        a = model(x, t, y, group_size=n, sample_ids=ids)
        b = model(x2, t, y, group_size=n, sample_ids=ids)
    assert torch.equal(a[:n], b[:n]) and torch.equal(a[2 * n:], b[2 * n:])
    for i in range(n, 2 * n):
        assert not torch.allclose(a[i], b[i], atol=1e-6), f"member {i} did not see the change"


def test_permuting_a_group_permutes_outputs():
    model = tiny_model()
    n = 5
    x, t, y = inputs(model, 2 * n)
    ids = torch.cat([torch.randperm(model.max_group_size)[:n] for _ in range(2)])
    perm = torch.cat([torch.tensor([3, 0, 4, 1, 2]), n + torch.tensor([1, 2, 3, 4, 0])])
    with torch.no_grad():
        out = model(x, t, y, group_size=n, sample_ids=ids)
        out_p = model(x[perm], t[perm], y[perm], group_size=n, sample_ids=ids[perm])
    torch.testing.assert_close(out_p, out[perm], atol=1e-5, rtol=1e-5)


def test_one_sdpa_call_per_run_over_the_whole_group(monkeypatch):
    model = tiny_model(depth=1)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        calls.append(tuple(q.shape))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    x, t, y = inputs(model, 12)
    with torch.no_grad():
        model(x, t, y, group_size=[1] * 4 + [4, 4])
    # 4 single images in one call, then 2 groups of 4 images x 16 tokens in another
    assert calls == [(4, 4, 16, 16), (2, 4, 64, 16)]


def test_sample_ids_distinct_per_group_and_seeded():
    model = tiny_model()
    runs = models.group_runs([8, 8, 2, 2, 2], 22, model.max_group_size)
    ids = model.draw_sample_ids(runs, "cpu", torch.Generator().manual_seed(0))
    for group in ids.split([8, 8, 2, 2, 2]):
        assert len(set(group.tolist())) == len(group) and group.max() < model.max_group_size
    again = model.draw_sample_ids(runs, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)
    other = model.draw_sample_ids(runs, "cpu", torch.Generator().manual_seed(1))
    assert not torch.equal(ids, other)


def test_bad_input_names_the_numbers():
    model = tiny_model()
    x, t, y = inputs(model, 6)
    with pytest.raises(ValueError, match=r"group size 9 is outside \[1, max_group_size=8\]"):
        model(x[:9], t, y, group_size=9)
    with pytest.raises(ValueError, match="batch of 6 images is not divisible by group size 4"):
        model(x, t, y, group_size=4)
    with pytest.raises(ValueError, match="group sizes add up to 5 images but the batch has 6"):
        model(x, t, y, group_size=[2, 3])
    with pytest.raises(ValueError, match=r"label 11 is outside \[0, 10\]"):
        model(x, t, torch.tensor([0, 1, 2, 3, 11, 10]), group_size=2)
    with pytest.raises(ValueError, match=r"label -1 is outside"):
        model(x, t, torch.tensor([0, 1, 2, -1, 1, 10]), group_size=2)
    with pytest.raises(ValueError, match="unknown model 'DiT-XXL/2'; valid models: DiT-Ti/1, DiT-Ti/2"):
        create_model("DiT-XXL/2")


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model().train()
    x, t, y = inputs(model, 8)
    ids = torch.arange(8) % 4

    def grads():
        model.zero_grad()
        model(x, t, y, group_size=4, sample_ids=ids).square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain = grads()
    model.gradient_checkpointing = True
    ckpt = grads()
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_and_compile():
    model = tiny_model()
    x, t, y = inputs(model, 8)
    ids = torch.arange(8) % 4
    with torch.no_grad():
        ref = model(x, t, y, group_size=[1, 1, 1, 1, 4], sample_ids=ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, y, group_size=[1, 1, 1, 1, 4], sample_ids=ids)
        # aot_eager traces the model through dynamo and AOTAutograd without needing a
        # C++ toolchain; fullgraph=True fails on any graph break.
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        comp = compiled(x, t, y, group_size=[1, 1, 1, 1, 4], sample_ids=ids)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()
    torch.testing.assert_close(comp, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- official layout
@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-B/2", "DiT-XL/2"])
def test_parameter_names_shapes_and_count_match_official(name):
    ref = json.loads(REFERENCE.read_text())[name]
    with torch.device("meta"):
        model = create_model(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours.pop(SAMPLE_EMBED_KEY) == [16, model.pos_embed.shape[-1]]
    assert ours == ref["keys"]
    assert models.count_params(model) - model.s_embedder.weight.numel() == ref["params"]


def test_flop_count_matches_dit_paper():
    assert models.count_flops("DiT-XL/2") / 1e9 == pytest.approx(118.6, abs=0.1)
    assert models.count_flops("DiT-S/2") / 1e9 == pytest.approx(6.06, abs=0.01)
    # attention over N*L keys: the per-image cost grows with the group size
    assert models.count_flops("DiT-S/2", group_size=4) > 1.25 * models.count_flops("DiT-S/2")


def official_state_dict(name="DiT-S/2", **kw):
    model = create_model(name, input_size=8, **kw)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n != "pos_embed":
                p.normal_(0, 0.02)
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != SAMPLE_EMBED_KEY}
    return model, sd


@pytest.mark.parametrize("wrap", ["bare", "ema", "dit-training"])
def test_official_checkpoint_round_trips(tmp_path, wrap):
    model, sd = official_state_dict("DiT-S/2")
    path = tmp_path / "DiT-S-2-64x64.pt"
    if wrap == "bare":
        torch.save(sd, path)
    elif wrap == "ema":
        torch.save({"ema": sd}, path)
    else:  # DiT's train.py checkpoint: model, ema, opt and the argparse args
        torch.save({"model": sd, "ema": sd, "args": argparse.Namespace(model="DiT-S/2")}, path)
    loaded, desc = load_pretrained(path)
    assert desc["new_tensors"] == [SAMPLE_EMBED_KEY] and desc["layout"] == "dit-sit" and not desc["converted"]
    assert loaded.config["name"] == "DiT-S/2" and loaded.input_size == 8 and loaded.learn_sigma
    assert torch.count_nonzero(loaded.s_embedder.weight) == 0
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # with a zero sample embedding, any sample ids give the pretrained model
    x, t, y = inputs(loaded, 2)
    with torch.no_grad():
        a = loaded(x, t, y, sample_ids=torch.tensor([0, 1]))
        b = loaded(x, t, y, sample_ids=torch.tensor([5, 9]))
    assert torch.equal(a, b)


def test_sit_checkpoint_family_and_learn_sigma(tmp_path):
    _, sd = official_state_dict("SiT-S/2")
    path = tmp_path / "SiT-S-2-64x64.pt"
    torch.save(sd, path)
    loaded, _ = load_pretrained(path)
    assert loaded.config["name"] == "SiT-S/2" and loaded.config["family"] == "SiT"
    assert loaded.out_channels == 8
    _, sd4 = official_state_dict("SiT-S/2", learn_sigma=False)
    torch.save(sd4, path)
    assert load_pretrained(path)[0].out_channels == 4


def test_checkpoint_mismatch_lists_keys(tmp_path):
    _, sd = official_state_dict()
    path = tmp_path / "bad.pt"
    extra = dict(sd, **{"blocks.0.attn.q_norm.weight": torch.ones(64)})
    del extra["blocks.3.mlp.fc2.bias"]
    torch.save(extra, path)
    with pytest.raises(ValueError, match=r"missing keys \['blocks.3.mlp.fc2.bias'\], unexpected keys "
                                         r"\['blocks.0.attn.q_norm.weight'\]"):
        load_pretrained(path)
    bad = dict(sd, **{"t_embedder.mlp.0.weight": torch.zeros(384, 128)})
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"shape mismatch \['t_embedder.mlp.0.weight \(384, 128\) vs \(384, 256\)'\]"):
        load_pretrained(path)


def test_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "thing": Path("/")}, path)
    with pytest.raises(ValueError, match=r"evil.pt: refused: its pickle imports pathlib.PosixPath, .*nothing was run"):
        load_pretrained(path)


def test_a_compiled_model_runs_new_group_layouts_without_sample_ids():
    """torch.compile turns the group size symbolic once it has seen a second layout; the
    sample-embedding draw must still compile (training passes ids, sampling may not)."""
    model = create_model("SiT-Mi/2", input_size=8, in_channels=3, num_classes=10, max_group_size=8).eval()
    # aot_eager traces as the default backend does (where the failure was) without
    # compiling C++ kernels: 16 s instead of 70 on two cores
    compiled = torch.compile(model, backend="aot_eager")
    x, t, y = torch.randn(8, 3, 8, 8), torch.rand(8), torch.randint(0, 10, (8,))
    for sizes in (4, 2):  # the second layout is the one that made the size symbolic
        torch.manual_seed(0)
        out = compiled(x, t, y, group_size=sizes)
        torch.manual_seed(0)
        np.testing.assert_allclose(out.detach().numpy(), model(x, t, y, group_size=sizes).detach().numpy(),
                                   rtol=1e-4, atol=1e-5)
