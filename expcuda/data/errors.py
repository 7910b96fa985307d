"""Errors for missing or malformed data: say what was expected, where, and how to get it."""

from __future__ import annotations


class DataError(RuntimeError):
    """The data set could not be read; the message names the file and the fix."""


def missing(what: str, where: str, how: str) -> DataError:
    return DataError(f"{what} not found in {where}.\n  How to get it: {how}")


def malformed(path: str, expected: str, got: str) -> DataError:
    return DataError(f"{path} is malformed: expected {expected}, got {got}")
