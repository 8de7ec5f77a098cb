"""The `groupdiff` command line through click's runner and as a real subprocess."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from groupdiff_cli.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_models_table_counts_dit_xl():
    res = run("models", "DiT-XL/2", "SiT-B/4")
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0].split()[:2] == ["model", "objective"] and len(lines) == 3
    xl = lines[1].split()
    assert xl[0] == "DiT-XL/2" and xl[1] == "ddpm" and xl[6] == "675.1M" and xl[7] == "118.62"
    assert lines[2].split()[:2] == ["SiT-B/4", "flow"]


def test_models_lists_every_registry_entry():
    res = run("models", "--group-size", "4")
    assert res.exit_code == 0, res.output
    names = [line.split()[0] for line in res.output.strip().splitlines()[1:]]
    assert len(names) == 40 and "SiT-XL/2" in names and "DiT-S/8" in names and "SiT-Mi/1" in names
    assert "GFLOPs/img (N=4)" in res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["models", "DiT-XXL/2"], "Error: unknown model 'DiT-XXL/2'; valid models: DiT-Ti/1, DiT-Ti/2"),
        (["models", "--group-size", "17", "DiT-S/2"], "Error: group size 17 is outside [1, max_group_size=16]"),
        (["train", "--data", "nowhere"], "Error: --data nowhere: no such directory"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(args, message):
    res = run(*args)
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [res.output.strip()]  # one line
    assert res.output.startswith(message)


def test_help_lists_the_subcommands():
    res = run("--help")
    assert res.exit_code == 0
    for cmd in ("encode", "train", "sample", "fid", "models"):
        assert f"\n  {cmd} " in res.output


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "groupdiff_cli", "models", "DiT-S/2"],
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[1].split()[0] == "DiT-S/2"
    bad = subprocess.run([sys.executable, "-m", "groupdiff_cli", "models", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Usage:" not in bad.stderr and "unknown model 'nope'" in bad.stderr
