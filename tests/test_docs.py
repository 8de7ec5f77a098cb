"""The README and the detail pages name only what exists: files and folders of the
repository, `groupdiff` subcommands, and each subcommand's flags."""

import re
from pathlib import Path

import click
import pytest

from groupdiff_cli.cli import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("groupdiff_cli/", "tests/", "examples/", "docs/", "bench/", "study/", "tools/", ".ci/")
# flags of other programs that the pages show (accelerate, torchrun, pip, SLURM, docker)
FOREIGN = {"--multi_gpu", "--num_processes", "--num_machines", "--machine_rank", "--main_process_ip",
           "--main_process_port", "--mixed_precision", "--no-deps", "--signal", "--shm-size", "--signals-to-handle",
           "--requeue", "--debug", "--help", "--version"}


def code_spans(text: str) -> list[str]:
    """Inline `code` and the lines of fenced blocks (continuation lines joined)."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    lines = [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    return inline + lines


def options(command: click.Command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}


ALL_FLAGS = set().union(*(options(c) for c in main.commands.values()))


def missing_paths(text: str) -> list[str]:
    missing = []
    for span in code_spans(text):
        for token in re.findall(r"[\w.-]+(?:/[\w.*-]+)+/?|\b[\w-]+\.(?:py|sh|sbatch|md|toml)\b", span):
            if token.startswith(TOP) or token in {"README.md", "CHANGELOG.md", "Makefile", "pyproject.toml"}:
                pattern = token.rstrip("/")
                if not (list(ROOT.glob(pattern)) if "*" in pattern else (ROOT / pattern).exists()):
                    missing.append(token)
            elif "/" not in token and token.endswith((".py", ".sh", ".sbatch")):  # a script named alone
                if not list(ROOT.rglob(token)):
                    missing.append(token)
    return missing


def wrong_commands(text: str) -> list[str]:
    wrong = []
    for span in code_spans(text):
        for m in re.finditer(r"(?:\bgroupdiff|-m groupdiff_cli) ([a-z]+)\b(.*)", span):
            cmd, rest = m.group(1), m.group(2)
            if cmd not in main.commands:
                wrong.append(f"groupdiff {cmd}")
                continue
            rest = re.split(r"\bgroupdiff\b|[;|#]", rest)[0]  # this command's own arguments only
            wrong += [f"groupdiff {cmd} {f}" for f in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest)
                      if f not in options(main.commands[cmd]) and f not in FOREIGN]
        for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", span):
            if flag not in ALL_FLAGS and flag not in FOREIGN:
                wrong.append(flag)
    return sorted(set(wrong))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_named_file_folder_subcommand_and_flag_exists(page):
    text = page.read_text()
    assert not missing_paths(text) and not wrong_commands(text), (missing_paths(text), wrong_commands(text))


def test_the_check_catches_wrong_names():
    text = ("Run `groupdiff smaple --ckpt x`, then `groupdiff fid --no-such-flag a b` and `groupdiff fid --ckpt x`;"
            " see `study/nothing.py` and `bench/model_bench.py`.\n```bash\ngroupdiff train --data d \\\n"
            "    --lr 1 --no-such-option 2\n```\n")
    assert missing_paths(text) == ["study/nothing.py"]
    assert wrong_commands(text) == ["--no-such-flag", "--no-such-option", "groupdiff fid --ckpt",
                                    "groupdiff fid --no-such-flag", "groupdiff smaple",
                                    "groupdiff train --no-such-option"]
