"""The failures ``expcuda train`` and ``expcuda compare`` report as one line, and the exit code of each.

A foreseeable condition (a bad flag, bad data, a busy or unwritable run
folder, a full disk, a diverged run) is one ``error: ...`` line and its own
exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os

EXIT_USAGE = 2        # bad flags, data, checkpoint or run folder: fix the input and run again
EXIT_COLLAPSE = 3     # the collapsed network does not score what the expanded one did at f = 0
EXIT_DIVERGED = 4     # the loss went non-finite; the last good checkpoint is kept
EXIT_IO = 5           # a write failed (disk full, file system gone read-only); the previous files are intact
EXIT_BUSY = 6         # another process holds the run folder
EXIT_INTERRUPTED = 130  # SIGINT / SIGTERM: checkpoint saved, continue with --resume

EXIT_CODES_HELP = f"""exit codes:
  0    done
  {EXIT_USAGE}    bad flag, data, checkpoint or run folder (nothing was trained)
  {EXIT_COLLAPSE}    the collapsed network differs from the expanded one at f = 0
  {EXIT_DIVERGED}    the loss became non-finite (the last good checkpoint is kept; try a lower --lr)
  {EXIT_IO}    a write failed, e.g. disk full (the previous checkpoint is intact; free space, then --resume)
  {EXIT_BUSY}    another process is using the run folder (its PID is named)
  {EXIT_INTERRUPTED}  stopped by Ctrl-C or SIGTERM (checkpoint saved; continue with --resume)
  1    an unexpected error: a bug, shown with its traceback"""


class RunFolderError(ValueError):
    """--out cannot serve as a run folder (a file, not writable); found before any training."""


class FolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


class WriteError(RuntimeError):
    """Writing a file of the run folder failed; the file it would have replaced is unchanged."""

    def __init__(self, path: str, cause: BaseException, kept: str | None = None):
        self.path, self.cause = path, cause
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else f"{type(cause).__name__}: {cause}"
        free = free_bytes(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
        space = f", {free} bytes free there" if free is not None else ""
        if not isinstance(cause, OSError) and free is not None and free < 2**20:  # e.g. torch.save's own errors
            reason = f"No space left on device, it seems: {reason}"
        kept = kept or f"the previous {os.path.basename(path)}, if any, is unchanged"
        super().__init__(f"cannot write {path} ({reason}{space}); {kept}. Free some space (or fix the file "
                         f"system), then run again (with --resume if a checkpoint is there)")


class Diverged(RuntimeError):
    """The loss is not finite: training stopped before anything was saved from that step."""

    def __init__(self, what: str, epoch: int, step: int, checkpoint: str):
        self.epoch, self.step = epoch, step
        kept = (f"the last good checkpoint {checkpoint} is kept" if os.path.isfile(checkpoint)
                else "no checkpoint was written yet")
        super().__init__(f"training diverged: {what} at epoch {epoch}, step {step}; {kept}. "
                         f"Try a lower --lr (or another --optimizer)")


def free_bytes(folder: str) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def exit_code(exc: BaseException) -> int:
    """The exit code of a foreseeable failure (see ``EXIT_CODES_HELP``)."""
    from expcuda.train.export import CollapseMismatch

    if isinstance(exc, FolderBusy):
        return EXIT_BUSY
    if isinstance(exc, Diverged):
        return EXIT_DIVERGED
    if isinstance(exc, CollapseMismatch):
        return EXIT_COLLAPSE
    if isinstance(exc, (WriteError, OSError)):
        return EXIT_IO
    return EXIT_USAGE


def foreseeable() -> tuple:
    """The exception types the command line turns into one line and ``exit_code``."""
    from expcuda.data import DataError
    from expcuda.train.checkpoint import CheckpointError
    from expcuda.train.export import CollapseMismatch

    return (DataError, CheckpointError, ValueError, CollapseMismatch, Diverged, WriteError, FolderBusy, OSError)
