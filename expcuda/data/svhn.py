"""SVHN's cropped-digit .mat files (train_32x32.mat, test_32x32.mat, extra_32x32.mat)."""

from __future__ import annotations

import os

import numpy as np
import torch

from expcuda.data.errors import malformed, missing

HOW = ("download train_32x32.mat and test_32x32.mat (and optionally extra_32x32.mat) from "
       "http://ufldl.stanford.edu/housenumbers/ into that folder")


def read_mat(path: str):
    """(images uint8 (N, 3, 32, 32), labels int64 in 0..9) from one SVHN .mat file."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError... for bad files
        raise malformed(path, "a MATLAB .mat file (SVHN format 2)", f"{type(exc).__name__}: {exc}") from None
    if "X" not in mat or "y" not in mat:
        raise malformed(path, "variables X and y", f"variables {sorted(k for k in mat if not k.startswith('__'))}")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.shape[0]:
        raise malformed(path, f"X of shape (32, 32, 3, N) with N = len(y) = {y.shape[0]}", f"X of shape {x.shape}")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise malformed(path, "labels 1..10 (10 stands for digit 0)", f"labels in {y.min()}..{y.max()}")
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8))
    labels = torch.from_numpy((y % 10).astype(np.int64))
    return images, labels


def load_svhn(folder: str, extra: bool = True):
    """(train_x, train_y, test_x, test_y); the extra set joins training when present and wanted."""
    if not folder or not os.path.isdir(folder):
        raise missing("the SVHN folder", str(folder), "pass --data-dir; " + HOW)
    paths = {name: os.path.join(folder, f"{name}_32x32.mat") for name in ("train", "test", "extra")}
    for name in ("train", "test"):
        if not os.path.isfile(paths[name]):
            raise missing(f"{name}_32x32.mat", folder, HOW)
    train_x, train_y = read_mat(paths["train"])
    if extra and os.path.isfile(paths["extra"]):
        extra_x, extra_y = read_mat(paths["extra"])
        train_x, train_y = torch.cat([train_x, extra_x]), torch.cat([train_y, extra_y])
    test_x, test_y = read_mat(paths["test"])
    return train_x, train_y, test_x, test_y
