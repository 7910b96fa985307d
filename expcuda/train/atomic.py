"""Atomic file writes: a temp file beside the target, fsync, rename, so a crash never leaves half a file.

A failed write (disk full, read-only file system) raises ``WriteError``
naming the file and leaves the file it would have replaced as it was; the
temp file a killed process leaves behind (``.<name>.<random>.tmp``) is
removed by ``clean_leftovers`` when the next run takes the folder. Files
get the usual ``0666 & ~umask`` mode, not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile

from expcuda.train.errors import WriteError

SUFFIX = ".tmp"


def umask() -> int:
    """The process's umask (reading it means setting it: restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str, write_errors: tuple = ()):
    """Yield a temp path in ``path``'s folder; on success it replaces ``path`` atomically.

    An OSError (or one of ``write_errors``: what the writer raises for a
    failed write) becomes a WriteError naming ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=SUFFIX, dir=folder)
        os.close(fd)
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())  # after: a writer may have replaced tmp by its own 0600 file
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, *write_errors) as exc:
        raise WriteError(path, exc) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)


def clean_leftovers(folder: str) -> list[str]:
    """Remove the temp files of interrupted atomic writes in ``folder`` (call it holding the folder's lock)."""
    removed = []
    here = glob.escape(folder)
    # ours, and safetensors' own (``.tmpXXXXXX``, renamed onto ours when it completes)
    for tmp in glob.glob(os.path.join(here, f".*{SUFFIX}")) + glob.glob(os.path.join(here, ".tmp*")):
        if os.path.isfile(tmp) and not os.path.islink(tmp):
            os.remove(tmp)
            removed.append(tmp)
    return removed
