"""Checkpoints named by their hub file (hf://OWNER/REPO/FILE): read from huggingface_hub's
cache, offline here (a cache filled by hand, as `hf download` fills it)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from groupdiff_cli.plumbing.hub import parse_hub_name
from groupdiff_cli.science.models import SAMPLE_EMBED_KEY
from tests.helpers import random_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_hub_names_are_parsed_as_huggingface_hub_spells_them():
    assert parse_hub_name("hf://Sichengmo/GroupDiff/gdiff-l-4-sit-xl-2-repa-resume.pth", "--ckpt") == (
        "Sichengmo/GroupDiff", None, "gdiff-l-4-sit-xl-2-repa-resume.pth")
    assert parse_hub_name("hf://a/b@v1.0/dir/x.pt", "--ckpt") == ("a/b", "v1.0", "dir/x.pt")
    for bad in ("hf://a/b", "hf://a//x.pt", "hf:///b/x.pt"):
        with pytest.raises(ValueError, match="a hub file is hf://OWNER/REPO/FILE"):
            parse_hub_name(bad, "--ckpt")


def _sample(tmp_path, ckpt, out, env):
    return subprocess.run([sys.executable, "-m", "groupdiff_cli", "sample", "--ckpt", ckpt, "--out", out, "--vae",
                           "pixel", "--class-labels", "1", "--steps", "2", "--cpu"],
                          capture_output=True, text=True, env=env, timeout=300)


def test_a_hub_checkpoint_is_read_from_the_cache_offline_and_a_missing_one_is_one_line(tmp_path):
    model = random_model("DiT-Ti/2", input_size=8, in_channels=3, num_classes=10)
    local = tmp_path / "DiT-Ti-2.pt"
    torch.save({k: v for k, v in model.state_dict().items() if k != SAMPLE_EMBED_KEY}, local)
    # the cache's layout: refs/main names the snapshot that holds the file
    repo = tmp_path / "hub" / "models--someone--dit-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "snapshots" / COMMIT / "DiT-Ti-2.pt").write_bytes(local.read_bytes())
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")

    from_hub = _sample(tmp_path, "hf://someone/dit-tiny/DiT-Ti-2.pt", tmp_path / "a", env)
    assert from_hub.returncode == 0, from_hub.stderr[-2000:]
    from_path = _sample(tmp_path, local, tmp_path / "b", env)
    assert from_path.returncode == 0, from_path.stderr[-2000:]
    with np.load(tmp_path / "a" / "samples.npz") as a, np.load(tmp_path / "b" / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])

    missing = _sample(tmp_path, "hf://someone/dit-tiny/DiT-XL-2.pt", tmp_path / "c", env)
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 2 and len(lines) == 1, missing.stderr[-2000:]
    assert lines[0].startswith("Error: --ckpt hf://someone/dit-tiny/DiT-XL-2.pt: not in the hub cache")
    assert "HF_HUB_OFFLINE is set" in lines[0] and "hf download someone/dit-tiny DiT-XL-2.pt" in lines[0]
    assert not (tmp_path / "c").exists()
