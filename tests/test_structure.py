"""Rules of the code base that a change could break: short functions, objective
knowledge inside objectives.py, one home for defaults, shared options defined once,
options resolved into a new value, one stream per kind of draw."""

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from groupdiff_cli.cli import main
from groupdiff_cli.jobs.train import resolved
from groupdiff_cli.plumbing.defaults import PRESETS, TRAIN_DEFAULTS, TrainOptions
from groupdiff_cli.plumbing.seeds import Draw, evaluation_rng

PACKAGE = Path(__file__).resolve().parents[1] / "groupdiff_cli"


def functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.name, node


def test_no_function_in_the_package_is_over_60_lines():
    long = [(f, n.name, n.end_lineno - n.lineno + 1) for f, n in functions() if n.end_lineno - n.lineno + 1 > 60]
    assert not long


def test_only_objectives_py_tells_the_objectives_apart():
    """No isinstance on DDPM/Flow, and no objective named as a string in a branch,
    outside objectives.py and the sampler registry."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in ("objectives.py", "samplers.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                names = {getattr(n, "id", None) for n in ast.walk(node.args[1])}
                if names & {"DDPM", "Flow"}:
                    found.append((path.name, node.lineno))
            if isinstance(node, ast.Compare) and any(
                    isinstance(c, ast.Constant) and c.value in ("ddpm", "flow") for c in node.comparators):
                found.append((path.name, node.lineno))
    assert not found


def test_every_train_option_defaults_to_train_options():
    params = {p.name: p for p in main.commands["train"].params}
    shared = set(params) & set(TRAIN_DEFAULTS)
    # flags named otherwise (--no-flip, --compile) and the options only Python sets
    assert set(TRAIN_DEFAULTS) - shared == {"flip", "compile", "objective", "beta1", "beta2", "label_dropout"}
    for name in shared:
        assert params[name].default == TRAIN_DEFAULTS[name], name
    out = CliRunner().invoke(main, ["train", "--help"], terminal_width=400).output
    assert f"[default: {TRAIN_DEFAULTS['lr']};" in next(ln for ln in out.splitlines() if "--lr " in ln)


def test_presets_name_only_training_options():
    options = set(TrainOptions.__dataclass_fields__)
    for name, values in PRESETS.items():
        assert set(values) <= options, name


SHARED = ("ckpt", "cfg_scale", "guidance_interval", "sampler", "steps", "seed", "batch_size", "vae", "cpu")


def test_options_shared_by_sample_attention_and_study_read_the_same():
    def described(command, name):
        p = next(p for p in main.commands[command].params if p.name == name)
        return p.opts, p.default, p.required, repr(p.type), p.help, p.show_default, type(p)

    for name in SHARED:
        assert described("sample", name) == described("attention", name) == described("study", name), name


def test_train_options_are_resolved_into_a_new_frozen_value():
    given = TrainOptions(data="d", model="SiT-Ti/2")
    info = dict(embedder_dim=0)
    done = resolved(given, info, log=lambda m: None)
    assert (done.grouping, done.objective, done.run_name) == ("random", "flow", "SiT-Ti-2-l4")
    assert (given.grouping, given.objective, given.run_name) == (None, None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        given.max_steps = 1


def test_each_kind_of_evaluation_draw_has_its_own_stream():
    draws = {d: evaluation_rng(0, d).integers(0, 2**31, 8).tolist() for d in Draw}
    assert len({tuple(v) for v in draws.values()}) == len(Draw)
    # the bootstrap's stream is the one the published intervals were drawn with
    assert draws[Draw.BOOTSTRAP] == np.random.default_rng(0).integers(0, 2**31, 8).tolist()


def imported_packages(path: Path) -> set[str]:
    """What of groupdiff_cli a module imports: its folders, its top-level modules by name,
    "__init__" for the package itself (its version)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "groupdiff_cli":
                found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


def test_no_part_of_the_package_imports_upwards():
    """plumbing < science, data, evaluation < jobs < the command line."""
    allowed = {"plumbing": {"plumbing"}, "science": {"plumbing", "science"},
               "data": {"plumbing", "science", "data", "evaluation"},
               "evaluation": {"plumbing", "science", "data", "evaluation"},
               "jobs": {"plumbing", "science", "data", "evaluation", "jobs"}}
    upward = [(str(path.relative_to(PACKAGE)), sorted(imported_packages(path) - allowed[path.parent.name]
                                                      - {"__init__"}))
              for path in sorted(PACKAGE.rglob("*.py")) if path.parent.name in allowed]
    assert [(f, bad) for f, bad in upward if bad] == []

