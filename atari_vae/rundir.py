"""A training run's hold on its output directory: one live run at a time, one run's files."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from atari_vae.errors import AtariVaeError, ConfigError
from atari_vae.files import atomic_write_text

RUN_TOKEN_FILE = "run_token.txt"  # the run that owns the directory; its checkpoints carry it
LOCK_FILE = ".train.lock"  # held (flock) for a whole run, released by the OS if it is killed
MODEL_FILES = ("checkpoint_epoch_*.pt", "best_model.pt", "final_model.pt")


def check_output_dir(path: str) -> Path:
    """Create ``path`` if needed; a ConfigError if it is a file or not writable."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {path} is a file; give a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--output_dir {path} cannot be created: {exc.strerror}") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--output_dir {path} is not writable")
    return out


def earlier_models(out: Path) -> list[str]:
    """Names of model files that a training run left in ``out``, sorted."""
    return sorted({p.name for pattern in MODEL_FILES for p in out.glob(pattern)})


def check_fresh(out: Path) -> None:
    """A ConfigError when ``out`` already holds another training run's models."""
    found = earlier_models(out)
    if found:
        listed = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise ConfigError(f"--output_dir {out} already holds a training run ({listed}); "
                          f"continue it with --resume, or give another --output_dir")


def recorded_token(out: Path) -> str:
    """The token of the run that owns ``out``; "" for directories older than tokens."""
    path = out / RUN_TOKEN_FILE
    return path.read_text().strip() if path.is_file() else ""


def check_free(out: Path) -> None:
    """An AtariVaeError when a live run holds ``out``; creates no file."""
    if (out / LOCK_FILE).exists():
        with _held(out):
            pass


@contextlib.contextmanager
def claimed(out: Path, resume: bool) -> Iterator[str]:
    """Hold ``out`` for one run, refusing a directory in use or (unless resuming) taken.

    Yields the run's token: a new one for a fresh run, the recorded one for ``--resume``.
    """
    with _held(out):
        if resume:
            yield recorded_token(out)
            return
        check_fresh(out)  # again: a run may have finished here since the first look
        token = uuid.uuid4().hex
        atomic_write_text(out / RUN_TOKEN_FILE, token)
        yield token


@contextlib.contextmanager
def _held(out: Path) -> Iterator[None]:
    from filelock import FileLock, Timeout

    lock = FileLock(str(out / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise AtariVaeError(f"--output_dir {out} is in use by another training run; wait for "
                            f"it to end, or give another --output_dir") from None
    try:
        yield
    finally:
        lock.release()
