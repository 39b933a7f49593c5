"""Atomic file writes: a reader never sees a half-written model, checkpoint or plot."""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path

PARTIAL = ".partial-"  # marks a temporary file that atomic_path has not yet moved into place


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{PARTIAL}",
                               suffix=target.suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should be readable as usual
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def remove_partial_files(directory: str | os.PathLike) -> list[Path]:
    """Delete temporaries that a killed process (SIGKILL, power loss) left in ``directory``."""
    stale = list(Path(directory).glob(f".*{PARTIAL}*"))
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stale


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def load_error_reason(exc: Exception) -> str:
    """One line saying why a ``torch.load(..., weights_only=True)`` of a model file failed."""
    if isinstance(exc, pickle.UnpicklingError):  # torch's text advises weights_only=False
        return "not a tensor-only torch file; pickled objects are never loaded"
    return first_line(exc)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters: a server's error page
    can be one long line), or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
