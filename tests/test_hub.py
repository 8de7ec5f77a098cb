"""Checkpoints named by their hub file (hf://OWNER/REPO/FILE): read from huggingface_hub's
cache, offline here (a cache filled by hand, as `hf download` fills it)."""

import numpy as np
import pytest
import torch

from groupdiff_cli.plumbing.hub import parse_hub_name
from groupdiff_cli.science.models import SAMPLE_EMBED_KEY
from tests.helpers import cli, one_line, random_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_hub_names_are_parsed_as_huggingface_hub_spells_them():
    assert parse_hub_name("hf://Sichengmo/GroupDiff/gdiff-l-4-sit-xl-2-repa-resume.pth", "--ckpt") == (
        "Sichengmo/GroupDiff", None, "gdiff-l-4-sit-xl-2-repa-resume.pth")
    assert parse_hub_name("hf://a/b@v1.0/dir/x.pt", "--ckpt") == ("a/b", "v1.0", "dir/x.pt")
    for bad in ("hf://a/b", "hf://a//x.pt", "hf:///b/x.pt"):
        with pytest.raises(ValueError, match="a hub file is hf://OWNER/REPO/FILE"):
            parse_hub_name(bad, "--ckpt")


def _sample(ckpt, out):
    return cli("sample", "--ckpt", ckpt, "--out", out, "--vae", "pixel", "--class-labels", "1", "--steps", "2",
               "--cpu")


def test_a_hub_checkpoint_is_read_from_the_cache_offline_and_a_missing_one_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    model = random_model("DiT-Ti/2", input_size=8, in_channels=3, num_classes=10)
    local = tmp_path / "DiT-Ti-2.pt"
    torch.save({k: v for k, v in model.state_dict().items() if k != SAMPLE_EMBED_KEY}, local)
    # the cache's layout: refs/main names the snapshot that holds the file
    repo = tmp_path / "hub" / "models--someone--dit-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "snapshots" / COMMIT / "DiT-Ti-2.pt").write_bytes(local.read_bytes())
    # HF_HUB_OFFLINE and HF_HUB_CACHE as huggingface_hub read them at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    assert _sample("hf://someone/dit-tiny/DiT-Ti-2.pt", tmp_path / "a").exit_code == 0
    assert _sample(local, tmp_path / "b").exit_code == 0
    with np.load(tmp_path / "a" / "samples.npz") as a, np.load(tmp_path / "b" / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])

    one_line(_sample("hf://someone/dit-tiny/DiT-XL-2.pt", tmp_path / "c"), 2,
             "--ckpt hf://someone/dit-tiny/DiT-XL-2.pt: not in the hub cache", "HF_HUB_OFFLINE is set",
             "hf download someone/dit-tiny DiT-XL-2.pt")
    assert not (tmp_path / "c").exists()
