"""CIFAR-10 and CIFAR-100 in their python pickle batches."""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from expcuda.data.errors import check_labels, malformed, missing

LAYOUT = {
    10: dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
             test=["test_batch"], label=b"labels",
             url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    100: dict(folder="cifar-100-python", train=["train"], test=["test"], label=b"fine_labels",
              url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


def how(classes: int) -> str:
    spec = LAYOUT[classes]
    return (f"download {spec['url']} and unpack it; pass --data-dir as the unpacked "
            f"{spec['folder']}/ folder or the folder that holds it")


def read_batch(path: str, label_key: bytes, classes: int):
    try:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except Exception as exc:  # pickle raises many types for a bad file
        raise malformed(path, "a CIFAR python pickle batch", f"{type(exc).__name__}: {exc}") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise malformed(path, f"a dict with keys b'data' and {label_key!r}", f"{keys}")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise malformed(path, f"data of shape (N, 3072) with N = {labels.shape[0]} labels", f"shape {data.shape}")
    check_labels(path, labels, classes)
    images = torch.from_numpy(data.astype(np.uint8).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(labels)


def resolve(folder: str, classes: int) -> str:
    spec = LAYOUT[classes]
    if not folder or not os.path.isdir(folder):
        raise missing(f"the CIFAR-{classes} folder", str(folder), "pass --data-dir; " + how(classes))
    inner = os.path.join(folder, spec["folder"])
    return inner if os.path.isdir(inner) else folder


def load_cifar(folder: str, classes: int = 10):
    """(train_x, train_y, test_x, test_y) with images uint8 (N, 3, 32, 32)."""
    if classes not in LAYOUT:
        raise ValueError(f"classes must be 10 or 100, got {classes!r}")
    spec = LAYOUT[classes]
    root = resolve(folder, classes)
    out = []
    for split in ("train", "test"):
        parts = []
        for name in spec[split]:
            path = os.path.join(root, name)
            if not os.path.isfile(path):
                raise missing(name, root, how(classes))
            parts.append(read_batch(path, spec["label"], classes))
        out += [torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])]
    return tuple(out)
