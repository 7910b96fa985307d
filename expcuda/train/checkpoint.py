"""Checkpoints: everything needed to continue a run exactly, written atomically, checked on load."""

from __future__ import annotations

import os

import torch

from expcuda.train.atomic import atomic_path

FORMAT = "expcuda-checkpoint"
VERSION = 1
NAME = "checkpoint.pt"
#: what ``Run._restore`` reads: a checkpoint lacking one is refused by name, not with a KeyError
KEYS = ("train_config", "model_config", "world", "epoch", "batch", "global_step", "partial", "history",
        "step_loss", "model", "optimizer", "lr_scheduler", "decay", "torch_rng")


class CheckpointError(RuntimeError):
    """The checkpoint is missing, corrupt, or from a different run; nothing was overwritten."""


def save(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` via a temp file, fsync and rename."""
    with atomic_path(path, write_errors=(RuntimeError,)) as tmp:  # torch.save: RuntimeError on a full disk
        torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)


def load(path: str) -> dict:
    """The checkpoint at ``path``, or a CheckpointError saying what is wrong with it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume: no checkpoint at {path}; start without --resume, or point --out "
                              f"at the folder of the run to continue")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for damaged files
        raise CheckpointError(f"{path} is corrupt or not a checkpoint ({type(exc).__name__}: {exc}); "
                              f"nothing was overwritten. Delete it to start over, or restore a copy") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an expcuda checkpoint; nothing was overwritten")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}, this expcuda reads "
                              f"{VERSION}; nothing was overwritten")
    lacking = [k for k in KEYS if k not in state]
    if lacking:
        raise CheckpointError(f"{path} lacks {', '.join(map(repr, lacking))} (damaged or hand-edited?); "
                              f"nothing was overwritten. Delete it to start over, or restore a copy")
    return state


def check_same_run(path: str, saved: dict, current: dict) -> None:
    """Raise unless the checkpoint's run identity equals this run's, naming each difference."""
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys
             if _norm(saved.get(k)) != _norm(current.get(k))]
    if diffs:
        raise CheckpointError(f"{path} was written by a different run; nothing was overwritten. Differences:\n  "
                              + "\n  ".join(diffs) + "\nResume with the same flags, or pick a new --out.")


def _norm(v):
    return list(v) if isinstance(v, tuple) else v
