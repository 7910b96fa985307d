"""Errors for missing or malformed data: say what was expected, where, and how to get it."""

from __future__ import annotations

import numpy as np


class DataError(RuntimeError):
    """The data set could not be read; the message names the file and the fix."""


def missing(what: str, where: str, how: str) -> DataError:
    return DataError(f"{what} not found in {where}.\n  How to get it: {how}")


def malformed(path: str, expected: str, got: str) -> DataError:
    return DataError(f"{path} is malformed: expected {expected}, got {got}")


def check_labels(path: str, labels, classes: int) -> None:
    """Raise unless every label (a numpy array) is in 0..classes-1: caught at load, not an epoch later."""
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        more = f" (and {bad.size - 1} more out of range)" if bad.size > 1 else ""
        raise malformed(path, f"labels in 0..{classes - 1} (the {classes} classes)",
                        f"label {labels[bad[0]]} at index {bad[0]}{more}")
