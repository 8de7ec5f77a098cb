"""`groupdiff attention`: the cross-sample score and its measurement."""

import json

import pytest
import torch
from click.testing import CliRunner

from groupdiff_cli.cli import main
from groupdiff_cli.jobs import attention as att
from groupdiff_cli.jobs.sampling import Guidance, sample_groups
from groupdiff_cli.science.objectives import Flow
from tests.helpers import random_model, write_run


def dense_cross_sample_mass(q: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
    """P from the whole attention matrix at once: the reference for the chunked one."""
    b, h, s, d = q.shape
    length = s // n
    probs = torch.softmax((q @ k.transpose(-1, -2)).double() * d**-0.5, dim=-1)  # (B, h, S, S)
    return probs.view(b, h, n, length, n, length).sum(-1).mean(3).mean(1)


def test_chunked_mass_equals_the_dense_reference():
    torch.manual_seed(0)
    q, k = torch.randn(3, 2, 4 * 6, 8), torch.randn(3, 2, 4 * 6, 8)
    chunked = att.cross_sample_mass(q, k, 4, chunk=5)  # chunks that cut across images
    dense = dense_cross_sample_mass(q, k, 4)
    torch.testing.assert_close(chunked, dense, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked.sum(-1), torch.ones(3, 4, dtype=torch.float64))


def test_two_images_give_zero_exactly():
    torch.manual_seed(1)
    p = att.cross_sample_mass(torch.randn(5, 2, 2 * 9, 4), torch.randn(5, 2, 2 * 9, 4), 2)
    assert torch.equal(att.s_cross(p), torch.zeros(5, 2, dtype=torch.float64))


def test_uniform_attention_gives_one_over_n_and_zero_score():
    q = torch.zeros(2, 3, 4 * 5, 8)  # all logits equal: every query attends uniformly
    k = torch.randn(2, 3, 4 * 5, 8)
    p = att.cross_sample_mass(q, k, 4)
    torch.testing.assert_close(p, torch.full((2, 4, 4), 0.25, dtype=torch.float64))
    assert torch.allclose(att.s_cross(p), torch.zeros(2, 4, dtype=torch.float64))


def test_dominant_keys_show_in_the_matrix():
    n, length, d = 4, 5, 8
    q = torch.ones(1, 1, n * length, d)
    k = torch.zeros(1, 1, n * length, d)
    k[:, :, :length] = 3.0  # image 0's keys align with every query
    p = att.cross_sample_mass(q, k, n)[0]
    assert (p[:, 0] > 0.9).all()  # every image draws mostly on image 0
    s = att.s_cross(p[None])[0]
    assert (s[1:] > 60).all()  # images 1..3: one group-mate (image 0) dominates the others
    assert s[0] == pytest.approx(0.0, abs=1e-9)  # for image 0 the others are alike


def test_measuring_does_not_change_the_samples_and_finds_every_block():
    model = random_model("SiT-Ti/2", input_size=8, in_channels=3, num_classes=10, max_group_size=8)
    labels = torch.tensor([1] * 4 + [2] * 4)
    g = Guidance(2.0, None, (0.0, 1.0), 1, 4)
    plain = sample_groups(model, Flow(), labels, 0, 4, g, 0, "ode", 3)
    p, first, measured = att.measure(model, Flow(), 4, 2, g, 0, "ode", 3, None, batch_groups=2)
    assert measured == [0, 1, 2]
    assert set(p) == {(e, b) for e in range(3) for b in range(12)}
    assert all(v.shape == (2, 4, 4) for v in p.values())
    again = sample_groups(model, Flow(), labels, 0, 4, g, 0, "ode", 3)
    torch.testing.assert_close(again, plain, atol=0, rtol=0)  # the probes are gone afterwards
    # labels differ (class-balanced) from `labels` above, so compare the first group's own rerun
    ref = sample_groups(model, Flow(), torch.tensor([0] * 4 + [1] * 4), 0, 4, g, 0, "ode", 3)
    torch.testing.assert_close(first, ref[:4], atol=0, rtol=0)
    summary = att.summarize(p)
    assert 0 <= summary["s_cross"] <= 100 and len(summary["s_cross_per_block"]) == 12


def test_command_writes_table_json_and_figures(tmp_path):
    run = write_run(tmp_path / "run", name="SiT-Ti/2")
    res = CliRunner().invoke(main, ["attention", "--ckpt", str(run), "--group-size", "2,4", "--num-groups", "2",
                                    "--steps", "3", "--out", str(tmp_path / "att"), "--cfg-scale", "2"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "att" / "attention.json").read_text())
    assert set(report["group_sizes"]) == {"2", "4"}
    assert report["group_sizes"]["2"]["s_cross"] == 0.0
    assert len(report["group_sizes"]["4"]["example_matrix"]) == 4
    for name in ("s_cross_vs_block.png", "s_cross_vs_step.png", "example_group_N2.png", "example_group_N4.png"):
        assert (tmp_path / "att" / name).stat().st_size > 1000
    assert res.output.splitlines()[0].split()[:2] == ["N", "S_cross"]
    bad = CliRunner().invoke(main, ["attention", "--ckpt", str(run), "--group-size", "4", "--cfg-scale", "1"])
    assert bad.exit_code == 2 and "runs no group attention" in bad.output
    adaptive = CliRunner().invoke(main, ["attention", "--ckpt", str(run), "--group-size", "4", "--sampler", "dopri5"])
    assert adaptive.exit_code == 2 and "--sampler dopri5 chooses its steps as it goes" in adaptive.output
