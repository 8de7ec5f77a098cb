"""Writing outputs without ever leaving a half-written file, and guarding output folders."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from pathlib import Path


class InputError(RuntimeError):
    """A user file found unreadable or corrupt while a job runs (after its options were
    accepted): the CLI shows it as one line with exit code 1.

    The rule for exit codes: what is refused before the job's work starts (a bad option,
    an input file that fails its check when first read, ``IntegrityError`` included) is a
    ``ValueError``, exit code 2, nothing written; what is found wrong once the work runs
    (a shard that turns out corrupt in the middle of an epoch) is an ``InputError``, exit
    code 1, with the work done so far kept. A cache that fails its check is neither: it is
    rebuilt, with a note."""


def _file_mode() -> int:
    """What a plain new file gets under the process's umask (0644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path`` (same suffix, so writers that pick the
    format by extension work); it replaces ``path`` only if the block completes. The
    file gets a plain file's permissions (some writers create private 0600 files), so
    others on a shared results folder can read it as they read the rest."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, FILE_MODE)
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
    elif out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):  # a stale lock is not work
        raise ValueError(f"{flag} {out}: not empty and not a groupdiff output; choose another {flag}")


def read_json_file(path: Path, flag: str) -> dict:
    """A JSON object from ``path``; ValueError naming the flag and the file otherwise."""
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{flag}: {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{flag}: {path} is not readable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{flag}: {path} is not a JSON object")
    return obj


LOCK_NAME = ".groupdiff.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class JobLock:
    """One job per output folder: ``FOLDER/.groupdiff.lock`` holds the owner's pid, host
    and scheduler job id. A lock whose owner is gone (same host, pid not running), or
    that an earlier run of the same SLURM job left (a requeue after preemption, maybe on
    other nodes), is taken over; a live owner, or one on another host, is refused with
    a line naming the lock file."""

    def __init__(self, folder, flag: str):
        self.folder, self.flag = Path(folder), flag
        self.path = self.folder / LOCK_NAME
        self.me = dict(pid=os.getpid(), host=socket.gethostname())
        if os.environ.get("SLURM_JOB_ID"):  # kept across requeues of the job
            self.me["job"] = os.environ["SLURM_JOB_ID"]
        self.held = False
        self.created: list[Path] = []  # folders this lock made: removed again if left empty

    def _owner(self) -> dict | None:
        if self.path.is_dir():
            raise ValueError(f"{self.flag} {self.folder}: {self.path} is a folder where the job lock file goes; "
                             f"remove it")
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written by a job killed while taking it: stale

    def problem(self) -> str | None:
        """Why this job may not take the lock now, or None."""
        owner = self._owner()
        if not owner or owner == self.me:
            return None
        pid = owner.get("pid")
        if not isinstance(pid, int) or pid <= 0:  # not written by a job: stale
            return None
        if owner.get("host") == self.me["host"] and not _alive(pid):
            return None
        if self.me.get("job") and owner.get("job") == self.me["job"]:  # this job, started again
            return None
        return (f"{self.flag} {self.folder}: another job (pid {owner.get('pid')} on {owner.get('host')}) is using it; "
                f"wait for it to end, or delete {self.path} if that job is gone")

    def acquire(self) -> None:
        why = self.problem()
        if why:
            raise ValueError(why)
        try:
            self.created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
            self.folder.mkdir(parents=True, exist_ok=True)
            if self._owner() is None:  # create it exclusively: of two jobs starting at once, one wins
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(self.me))
            else:  # a stale lock: take it over
                write_json_atomic(self.me, self.path)
        except FileExistsError:
            raise ValueError(self.problem() or f"{self.flag} {self.folder}: another job took it just now") from None
        except OSError as e:
            raise ValueError(f"{self.flag} {self.folder}: not writable ({e.strerror})") from None
        self.held = True

    def release(self) -> None:
        if self.held and self._owner() == self.me:
            self.path.unlink(missing_ok=True)
            for p in self.created:  # deepest first: a failed start leaves no empty folders
                if p.is_dir() and not any(p.iterdir()):
                    p.rmdir()
        self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def size_text(nbytes: float) -> str:
    """A size for a message: in GiB from 1 GiB up, else in MiB."""
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_free_space(folder, needed: int, flag: str, why: str = "") -> None:
    """Refuse to start when ``folder`` (or its nearest existing parent) has less free
    space than the outputs need (``why``: how that was counted), instead of failing
    after the expensive work."""
    p = Path(folder).resolve()
    while not p.exists():
        p = p.parent
    free = shutil.disk_usage(p).free
    if free < needed:
        what = f"this run needs about {size_text(needed)} ({needed:,} bytes; {why})" if why else \
            f"the first output needs about {size_text(needed)}"
        raise ValueError(f"{flag} {folder}: {size_text(free)} free, {what}")
