"""Data sets for training: Fashion-MNIST (embedded default), SVHN, CIFAR-10/100, ImageNet folders."""

from expcuda.data.augment import Augment
from expcuda.data.errors import DataError
from expcuda.data.memory import TensorData, TensorLoader
from expcuda.data.registry import NAMES, Bundle, load, native_channels

__all__ = ["load", "Bundle", "NAMES", "native_channels", "DataError", "TensorData", "TensorLoader", "Augment"]
