"""Shared by the tests/test_robust_*.py files: a tiny Fashion-MNIST folder, tiny runs, a mounted tmpfs."""

from __future__ import annotations

import contextlib
import os
import subprocess

import numpy as np
import pytest

from expcuda.data.idx import FILES
from expcuda.train import TrainConfig

N_TRAIN, N_TEST = 64, 32


def write_idx(path, array: np.ndarray) -> None:
    """``array`` (uint8) as an uncompressed IDX file."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def fmnist_folder(folder, train_labels=None, test_labels=None):
    """A Fashion-MNIST folder of N_TRAIN / N_TEST random images; labels random unless given."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n, labels in (("train", N_TRAIN, train_labels), ("test", N_TEST, test_labels)):
        write_idx(os.path.join(folder, FILES[f"{split}_images"]), rng.integers(0, 256, (n, 28, 28)))
        write_idx(os.path.join(folder, FILES[f"{split}_labels"]),
                  np.asarray(labels) if labels is not None else rng.integers(0, 10, n))
    return str(folder)


def tiny_flags(data_dir, out, *extra) -> list[str]:
    """``expcuda train`` flags of a run of 2 steps per epoch, 1 epoch unless ``extra`` says otherwise."""
    return ["--data-dir", str(data_dir), "--out", str(out), "--width", "0.125", "--batch-size", "32",
            "--epochs", "1", "--threads", "1", "--no-progress", *extra]


def tiny_config(data_dir, out, **changes) -> TrainConfig:
    values = dict(data_dir=str(data_dir), out=str(out), width=0.125, batch_size=32, epochs=1, threads=1,
                  progress=False)
    return TrainConfig.from_preset("fmnist", **{**values, **changes})


@contextlib.contextmanager
def tmpfs(folder, options: str):
    """A tmpfs mounted at ``folder`` (e.g. options "size=4m" or "ro,size=1m"); skips where mounting fails."""
    os.makedirs(folder, exist_ok=True)
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                         text=True)
    if got.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {got.stderr.strip() or got.returncode}")
    try:
        yield str(folder)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def error_line(stderr: str) -> str:
    """The one ``error: ...`` line a foreseeable failure prints, asserting there is no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]
