"""Checks before the first training step, so a run that cannot finish fails at once, not an epoch in.

The run folder must be a folder this process can write (probed with a real
file); it is then locked for this run and cleared of temp files an
interrupted atomic write left. ``--expand-layers`` must name layers the
model has.
"""

from __future__ import annotations

import errno
import os
import tempfile

from torch import nn

from expcuda.train import atomic
from expcuda.train.errors import RunFolderError, WriteError
from expcuda.train.lock import FolderLock


def writable_folder(folder: str, flag: str = "--out") -> None:
    """Create ``folder`` if needed and write a probe file in it; RunFolderError saying why not."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise RunFolderError(f"{flag} {folder} is a file, not a folder; pick a folder path")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"{flag} {folder}: cannot create the folder ({exc.strerror or exc})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=atomic.SUFFIX, dir=folder)  # a leftover is cleaned
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the folder is fine, the disk is full: an I/O fault
            raise WriteError(folder, exc, kept="nothing was trained or changed") from None
        raise RunFolderError(f"{flag} {folder} is not writable ({exc.strerror or exc})") from None


def open_run_folder(folder: str, what: str, flag: str = "--out") -> FolderLock:
    """The folder checked, locked for this process (release it when done) and cleared of temp leftovers."""
    writable_folder(folder, flag)
    held = FolderLock(folder, what).acquire()
    try:
        atomic.clean_leftovers(folder)
    except BaseException:
        held.release()
        raise
    return held


def lp_layer_count(model: nn.Module) -> int:
    """The low-precision layers of a built model (what ``--expand-layers`` numbers from 1)."""
    from expcuda.nn import LowPrecisionConv2d
    return sum(1 for m in model.modules() if isinstance(m, LowPrecisionConv2d))


def check_expand_layers(model_cfg, model: nn.Module) -> None:
    """Every layer ``--expand-layers`` names exists in ``model`` (EXP-Net only: the others ignore it)."""
    if model_cfg.mode != "exp":
        return
    chosen = model_cfg.expanded_set()
    n = lp_layer_count(model)
    if chosen is None:
        return
    if not chosen:
        raise ValueError(f"--expand-layers {model_cfg.expand_layers!r} expands no layer, so there is nothing for "
                         f"EXP-Net to train; name some of {model_cfg.arch}'s LP layers 1..{n}, or pass --baseline")
    unknown = sorted(i for i in chosen if i > n)
    spec = model_cfg.expand_layers.strip()
    digits = (f" ('{spec}' is read one digit per layer: use a comma list such as '1,{spec[1:]}' for "
              f"numbers above 9)" if spec.isdigit() and len(spec) > 1 else "")
    if unknown:
        raise ValueError(f"--expand-layers {model_cfg.expand_layers!r}: {model_cfg.arch} has LP layers 1..{n} "
                         f"(the first conv and the last FC stay full precision), so "
                         f"{', '.join(map(str, unknown))} {'does' if len(unknown) == 1 else 'do'} not exist{digits}")
