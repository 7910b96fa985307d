"""One entry point for every data set: load it fitted to the model, and make its loaders."""

from __future__ import annotations

from dataclasses import dataclass

from expcuda.data import adapt
from expcuda.data.augment import Augment
from expcuda.data.cifar import load_cifar
from expcuda.data.idx import load_fashion_mnist
from expcuda.data.imagenet import FolderLoader, ImageFolder, load_imagenet
from expcuda.data.memory import TensorData, TensorLoader, channel_stats
from expcuda.data.svhn import load_svhn

# name: (native channels, classes (None: counted from the folders), how to fit, training augmentation)
SPECS = {
    "fmnist": (1, 10, "pad", Augment(shift=4, flip=True)),
    "svhn": (3, 10, "resize", Augment()),
    "cifar10": (3, 10, "pad", Augment(shift=4, flip=True)),
    "cifar100": (3, 100, "pad", Augment(shift=4, flip=True)),
    "imagenet": (3, None, "resize", None),
}
NAMES = tuple(SPECS)


@dataclass
class Bundle:
    """A data set ready for training: train and test data fitted to the model's input."""

    name: str
    train: TensorData | ImageFolder
    test: TensorData | ImageFolder
    num_classes: int

    def loader(self, split: str, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1,
               workers: int = 2):
        data, train = (self.train, True) if split == "train" else (self.test, False)
        if isinstance(data, TensorData):
            return TensorLoader(data, batch_size, train=train, seed=seed, rank=rank, world=world)
        return FolderLoader(data, batch_size, train=train, seed=seed, rank=rank, world=world, workers=workers)


def native_channels(name: str) -> int:
    return spec(name)[0]


def spec(name: str):
    if name not in SPECS:
        raise ValueError(f"dataset must be one of {', '.join(NAMES)}, got {name!r}")
    return SPECS[name]


def read_arrays(name: str, data_dir: str | None):
    if name == "fmnist":
        return load_fashion_mnist(data_dir)
    if name == "svhn":
        return load_svhn(data_dir)
    return load_cifar(data_dir, 100 if name == "cifar100" else 10)


def load(name: str, data_dir: str | None = None, *, size: int, channels: int | None = None,
         limit_train: int | None = None, limit_test: int | None = None, seed: int = 0) -> Bundle:
    """``name`` from ``data_dir`` (Fashion-MNIST: Debian's copy when None), fitted to size x size."""
    native, classes, how, augment = spec(name)
    for flag, limit in (("limit_train", limit_train), ("limit_test", limit_test)):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
            raise ValueError(f"{flag} must be a positive int or None, got {limit!r}")  # not a slice bound
    channels = channels or native
    if name == "imagenet":
        if channels != 3:
            raise ValueError(f"ImageNet models take 3 input channels, got {channels}")
        train, test, classes = load_imagenet(data_dir, size, seed, limit_train, limit_test)
        return Bundle(name, train, test, classes)
    train_x, train_y, test_x, test_y = read_arrays(name, data_dir)
    train_x, train_y = train_x[:limit_train], train_y[:limit_train]
    test_x, test_y = test_x[:limit_test], test_y[:limit_test]
    mean, std = channel_stats(adapt.to_channels(train_x, channels))
    train = TensorData(adapt.fit(train_x, size, channels, how), train_y, mean, std, augment)
    test = TensorData(adapt.fit(test_x, size, channels, how), test_y, mean, std, Augment())
    return Bundle(name, train, test, classes)
