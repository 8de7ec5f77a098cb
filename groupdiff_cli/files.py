"""Writing outputs without ever leaving a half-written file, and guarding output folders."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path`` (same suffix, so writers that pick the
    format by extension work); it replaces ``path`` only if the block completes."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json_atomic(obj, path) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def check_output_dir(out: Path, config_file: Path, record: dict, flag: str, what: str) -> None:
    """Refuse an output folder that holds another configuration's work, or anything
    that is not ours; an empty or missing folder, or our own with the same config, is fine."""
    if config_file.exists():
        if json.loads(config_file.read_text()) != record:
            raise ValueError(f"{flag} {out}: holds {what} of a different configuration (see {config_file}); "
                             f"choose another {flag} or delete it")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{flag} {out}: not empty and not a groupdiff output; choose another {flag}")
