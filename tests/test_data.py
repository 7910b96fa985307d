"""Data loading: tiny files in each real format, fitting, augmentation, sharding, clear errors."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from expcuda import data
from expcuda.data import adapt, augment
from expcuda.data.idx import DEBIAN_DIR


def write_idx(path, array, gz):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as fh:
        fh.write(blob)


def make_fmnist(folder, n_train=12, n_test=5, gz=True):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        arrays[split] = (rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n))
        suffix = ".gz" if gz else ""
        write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte{suffix}"), arrays[split][0], gz)
        write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte{suffix}"), arrays[split][1], gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip_and_padding(tmp_path, gz):
    arrays = make_fmnist(tmp_path, gz=gz)
    bundle = data.load("fmnist", str(tmp_path), size=40)
    assert bundle.num_classes == 10
    assert bundle.train.images.shape == (12, 1, 40, 40)
    inner = bundle.train.images[:, 0, 6:34, 6:34]
    assert torch.equal(inner, torch.from_numpy(arrays["train"][0].astype(np.uint8)))
    assert bundle.train.images[:, :, :6].sum() == 0 and bundle.train.images[:, :, 34:].sum() == 0
    assert torch.equal(bundle.test.labels, torch.from_numpy(arrays["t10k"][1].astype(np.int64)))


def test_idx_errors(tmp_path):
    with pytest.raises(data.DataError, match="(?s)train-images-idx3-ubyte.*How to get it"):
        data.load("fmnist", str(tmp_path), size=28)
    make_fmnist(tmp_path)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(b"\x01\x02\x08\x01garbage")
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz is malformed: expected an IDX header"):
        data.load("fmnist", str(tmp_path), size=28)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3), True)  # 3 labels for 5 images
    with pytest.raises(data.DataError, match="5 labels"):
        data.load("fmnist", str(tmp_path), size=28)
    with pytest.raises(data.DataError, match="the Fashion-MNIST folder not found in /no/such"):
        data.load("fmnist", "/no/such", size=28)


@pytest.mark.skipif(not os.path.isdir(DEBIAN_DIR), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_is_the_default():
    bundle = data.load("fmnist", size=40, limit_train=100, limit_test=50)
    assert bundle.train.images.shape == (100, 1, 40, 40) and bundle.test.images.shape == (50, 1, 40, 40)
    assert set(bundle.train.labels.tolist()) <= set(range(10))


def test_svhn_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(1)
    for name, n in (("train", 6), ("test", 4)):
        x = rng.integers(0, 256, (32, 32, 3, n)).astype(np.uint8)
        y = np.array([10, 1, 2, 3, 9, 5][:n], dtype=np.uint8).reshape(n, 1)
        scipy_io.savemat(tmp_path / f"{name}_32x32.mat", {"X": x, "y": y})
    bundle = data.load("svhn", str(tmp_path), size=40)
    assert bundle.train.images.shape == (6, 3, 40, 40)
    assert bundle.train.labels.tolist() == [0, 1, 2, 3, 9, 5]
    raw = data.load("svhn", str(tmp_path), size=32).test.images
    assert torch.equal(raw[2].permute(1, 2, 0), torch.from_numpy(
        scipy_io.loadmat(tmp_path / "test_32x32.mat")["X"][:, :, :, 2]))
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8),
                                                   "y": np.array([[0], [11]], np.uint8)})
    with pytest.raises(data.DataError, match=r"labels 1\.\.10"):
        data.load("svhn", str(tmp_path), size=40)
    os.remove(tmp_path / "test_32x32.mat")
    with pytest.raises(data.DataError, match="(?s)test_32x32.mat not found.*ufldl"):
        data.load("svhn", str(tmp_path), size=40)


def write_cifar(folder, classes):
    rng = np.random.default_rng(2)
    if classes == 10:
        root, names, key = folder / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
    else:
        root, names, key = folder / "cifar-100-python", ["train", "test"], b"fine_labels"
    root.mkdir()
    for name in names:
        batch = {b"data": rng.integers(0, 256, (3, 3072)).astype(np.uint8),
                 key: [int(v) for v in rng.integers(0, classes, 3)], b"batch_label": b"x"}
        with open(root / name, "wb") as fh:
            pickle.dump(batch, fh)
    return root


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_pickles(tmp_path, classes):
    root = write_cifar(tmp_path, classes)
    name = f"cifar{classes}"
    for where in (tmp_path, root):  # the parent folder or the unpacked folder itself
        bundle = data.load(name, str(where), size=32)
        assert bundle.num_classes == classes
        assert bundle.train.images.shape == ((15 if classes == 10 else 3), 3, 32, 32)
    with open(root / ("test_batch" if classes == 10 else "test"), "rb") as fh:
        first = pickle.load(fh, encoding="bytes")[b"data"][0]
    assert torch.equal(bundle.test.images[0].reshape(-1), torch.from_numpy(first))
    with open(root / ("test_batch" if classes == 10 else "test"), "wb") as fh:
        fh.write(b"not a pickle")
    with pytest.raises(data.DataError, match="malformed: expected a CIFAR python pickle batch"):
        data.load(name, str(tmp_path), size=32)


def test_imagenet_folders(tmp_path):
    image = pytest.importorskip("PIL.Image")
    for split, count in (("train", 3), ("val", 2)):
        for cls in ("n01", "n02"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = np.full((50 + 10 * i, 70, 3), 40 * i, np.uint8)
                image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.JPEG", format="JPEG")
    bundle = data.load("imagenet", str(tmp_path), size=64)
    assert bundle.num_classes == 2 and len(bundle.train) == 6 and len(bundle.test) == 4
    loader = bundle.loader("train", 2, workers=0)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 3 and batches[0][0].shape == (2, 3, 64, 64)
    evals = list(bundle.loader("test", 3, workers=0))
    assert [x.shape[0] for x, _ in evals] == [3, 1]
    assert sorted(torch.cat([y for _, y in evals]).tolist()) == [0, 0, 1, 1]
    (tmp_path / "val" / "n03").mkdir()
    with pytest.raises(data.DataError, match="same class folders as train"):
        data.load("imagenet", str(tmp_path), size=64)


def test_fit_channels_and_resize():
    gray = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    rgb = adapt.fit(gray, 40, 3)
    assert rgb.shape == (2, 3, 40, 40) and torch.equal(rgb[:, 0], rgb[:, 2])
    big = adapt.fit(torch.full((1, 3, 32, 32), 200, dtype=torch.uint8), 40, 3, how="resize")
    assert big.shape == (1, 3, 40, 40) and bool((big == 200).all())
    with pytest.raises(ValueError, match="cannot turn 2-channel"):
        adapt.to_channels(torch.zeros(1, 2, 4, 4, dtype=torch.uint8), 3)


def test_shift_and_flip_match_a_manual_crop():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    offsets, flips = torch.tensor([[0, 4], [2, 1]]), torch.tensor([False, True])
    out = augment.apply(x, offsets, flips, shift=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    assert torch.equal(out[0], padded[0, :, 0:5, 4:9])
    assert torch.equal(out[1], padded[1, :, 2:7, 1:6].flip(2))


def test_ddp_shards_make_up_the_global_batch():
    n = 64
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)
    td = data.TensorData(images, torch.arange(n), torch.zeros(1), torch.ones(1), data.Augment(shift=2, flip=True))
    single = data.TensorLoader(td, 16, train=True, seed=3)
    shards = [data.TensorLoader(td, 8, train=True, seed=3, rank=r, world=2) for r in range(2)]
    for loader in (single, *shards):
        loader.set_epoch(1)
    for (x, y), (x0, y0), (x1, y1) in zip(single, *shards):
        order = torch.argsort(y)
        both_y, both_x = torch.cat([y0, y1]), torch.cat([x0, x1])
        assert torch.equal(y[order], both_y.sort().values)
        assert torch.equal(x[order], both_x[torch.argsort(both_y)])
    assert len(single) == 4 and len(shards[0]) == 4
    first, again = list(single.iterate(2)), list(single)[2:]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
