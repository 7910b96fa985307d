"""Fashion-MNIST (and MNIST) in the IDX format, gzip-compressed or not."""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch

from expcuda.data.errors import check_labels, malformed, missing

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
HOW = ("install Debian's package (apt-get install dataset-fashion-mnist, files in "
       f"{DEBIAN_DIR}) or pass --data-dir with a folder holding the four IDX files "
       "(from https://github.com/zalandoresearch/fashion-mnist, gzip-compressed or not)")
CLASSES = 10
# IDX type codes we accept: 0x08 is unsigned byte, the only one image/label files use.
UBYTE = 0x08


def find(folder: str, stem: str) -> str:
    """The path of ``stem`` or ``stem.gz`` in folder; a DataError naming both if neither."""
    for name in (stem, stem + ".gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise missing(f"{stem} (or {stem}.gz)", folder, HOW)


def read_idx(path: str) -> np.ndarray:
    """One IDX file as a uint8 array of the shape its header declares."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise malformed(path, "a readable IDX file (gzip or raw)", f"{type(exc).__name__}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise malformed(path, "an IDX header (two zero bytes, a type byte, a rank byte)",
                        f"first bytes {data[:4].hex() or 'none'}")
    if data[2] != UBYTE:
        raise malformed(path, "unsigned-byte data (type code 0x08)", f"type code {data[2]:#04x}")
    rank = data[3]
    header = 4 + 4 * rank
    if len(data) < header:
        raise malformed(path, f"{rank} dimension sizes after the magic number", f"{len(data)} bytes in all")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    count = int(np.prod(shape)) if shape else 1
    if len(data) - header != count:
        raise malformed(path, f"{count} data bytes for shape {shape}", f"{len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(folder: str | None = None):
    """(train_x, train_y, test_x, test_y): images uint8 (N, 1, 28, 28), labels int64."""
    folder = folder or DEBIAN_DIR
    if not os.path.isdir(folder):
        raise missing("the Fashion-MNIST folder", folder, HOW)
    paths = {key: find(folder, stem) for key, stem in FILES.items()}
    arrays = {key: read_idx(path) for key, path in paths.items()}
    out = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3:
            raise malformed(FILES[f"{split}_images"], "a rank-3 image file (N, rows, cols)", f"shape {images.shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise malformed(FILES[f"{split}_labels"], f"{images.shape[0]} labels (one per image)",
                            f"shape {labels.shape}")
        check_labels(paths[f"{split}_labels"], labels, CLASSES)
        out.append(torch.from_numpy(images.copy()).unsqueeze(1))
        out.append(torch.from_numpy(labels.astype(np.int64)))
    return tuple(out)
