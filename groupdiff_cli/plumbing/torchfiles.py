"""Reading PyTorch files that others wrote, without ever running their code.

A ``.pt`` / ``.pth`` file is a pickle, and unpickling can call any function the file
names. Every such file groupdiff reads goes through ``load_torch_bytes``: the bytes are
read once, their format is told from their first bytes, and they are unpickled with
``weights_only=True`` from those bytes (never from the path a second time, which another
process could have swapped in between). A refused file is one line that names what it
is: the function a pickle tried to import (read off its opcodes with ``pickletools``,
which executes nothing, so the wording does not depend on the torch version), or the
format it looks like (safetensors, numpy, TorchScript, random bytes, ...).
"""

from __future__ import annotations

import io
import pickletools
import struct
import zipfile
from pathlib import Path

import torch

# globals that weights_only unpickling allows in a plain checkpoint (others are named)
_TORCH_ALLOWS = ("torch.", "collections.OrderedDict", "_codecs.encode")
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def read_bytes(path, flag: str | None = None) -> bytes:
    """A file's bytes, or a ValueError naming the flag and the file."""
    label = f"{flag} {path}" if flag else str(path)
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{label}: a folder, not a file") from None
    except OSError as e:
        raise ValueError(f"{label}: cannot read it ({e.strerror or e})") from None


def _open(source):
    """A binary file object over bytes or a path."""
    return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")


def _zip_names(source) -> list[str]:
    try:
        with _open(source) as f, zipfile.ZipFile(f) as z:
            return z.namelist()
    except (zipfile.BadZipFile, ValueError, OSError):
        return []


def looks_like(source) -> str:
    """What the bytes (or the file at a path) look like, in words: 'a PyTorch checkpoint',
    'a safetensors file', 'a TorchScript archive', 'a numpy .npz archive', ..., or 'none
    of the known formats'."""
    with _open(source) as f:
        data = f.read(16)
        size = f.seek(0, io.SEEK_END)
    if data[:4] == b"PK\x03\x04":
        names = _zip_names(source)
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "a TorchScript archive (torch.jit.save), not a state dict"
        if any(n.endswith("data.pkl") for n in names):
            return "a PyTorch checkpoint"
        if names and all(n.endswith(".npy") for n in names):
            return "a numpy .npz archive"
        return "a zip archive that is not a PyTorch checkpoint" if names else "a damaged zip archive"
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return "a PyTorch checkpoint in the legacy (pre-1.6) format"
    if len(data) > 9:
        (header,) = struct.unpack("<Q", data[:8])
        if data[8:9] == b"{" and 8 + header <= size:
            return "a safetensors file"
    for magic, what in ((b"\x93NUMPY", "a numpy .npy array"), (b"\x89HDF", "an HDF5 file (Keras?)"),
                        (b"\x1f\x8b", "a gzip archive"), (b"GGUF", "a GGUF file"), (b"{", "a JSON or text file")):
        if data.startswith(magic):
            return what
    return "none of the known formats (random bytes, or a truncated download?)"


def _pickle_of(source) -> bytes | None:
    """The pickle inside a torch file: the zip's data.pkl, or the legacy file itself."""
    try:
        with _open(source) as f:
            if f.read(4) != b"PK\x03\x04":
                return f.seek(0) or f.read()
            with zipfile.ZipFile(f) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                return z.read(name) if name else None
    except (zipfile.BadZipFile, ValueError, OSError, KeyError):
        return None


def pickle_globals(source) -> list[str]:
    """Every ``module.name`` a pickle (or a torch file's pickle) imports, read off its
    opcodes without executing any. Legacy torch files are several pickles in a row: the
    scan goes on past each STOP."""
    found: list[str] = []
    blob = _pickle_of(source)
    if blob is None:
        return found
    stream = io.BytesIO(blob)
    while stream.tell() < len(blob):
        pushed: list = []  # the values pushed, strings where known (STACK_GLOBAL takes the last two)
        memo: dict = {}
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in _STRING_OPS:
                    pushed.append(arg if isinstance(arg, str) else str(arg))
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    pushed.append(memo.get(int(arg)))
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[int(arg)] = pushed[-1] if pushed else None
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(pushed) >= 2 and None not in pushed[-2:]:
                    found.append(f"{pushed[-2]}.{pushed[-1]}")
                elif op.stack_after:  # another value pushed: not a string we know
                    pushed.append(None)
        except Exception:  # the legacy format's raw tensor bytes follow its pickles
            break
    return list(dict.fromkeys(found))


def load_torch(source, label: str, safe_globals: list | None = None):
    """``torch.load(weights_only=True)`` of bytes already read, or of a path read once
    (a checkpoint too large to hold twice in memory); ``label`` names the file (and flag)
    in the one-line ValueError for anything else."""
    try:
        with torch.serialization.safe_globals(safe_globals or []):
            return torch.load(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source),
                              map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(refusal(source, label, e, safe_globals)) from None


def refusal(source, label: str, error: Exception, safe_globals: list | None = None) -> str:
    """The one line that says why a torch file was not loaded."""
    try:
        what = looks_like(source)
    except OSError as e:
        return f"{label}: cannot read it ({e.strerror or e})"
    if not what.startswith("a PyTorch checkpoint"):
        return f"{label}: not a PyTorch checkpoint: it looks like {what}"
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in safe_globals or []}
    unsafe = [g for g in pickle_globals(source) if not g.startswith(_TORCH_ALLOWS) and g not in allowed]
    if unsafe:
        return (f"{label}: refused: its pickle imports {', '.join(unsafe[:3])}, which torch.load(weights_only=True) "
                f"does not allow (unpickling it could run code); nothing was run")
    reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    return f"{label}: {what} that torch.load(weights_only=True) cannot read ({type(error).__name__}: {reason})"
