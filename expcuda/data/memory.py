"""A data set held in memory as uint8 tensors, and the batch loader that feeds training.

Small sets (Fashion-MNIST, SVHN, CIFAR) fit in RAM many times over, so the
whole pipeline is a gather, one uint8->float conversion and batched
augmentation per step: no worker processes, which on 2 cores would only
compete with the training threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data.distributed import DistributedSampler

from expcuda.data import augment as aug_mod
from expcuda.data.augment import Augment


@dataclass
class TensorData:
    """uint8 images (N, C, H, W) fitted to the model, int64 labels, per-channel mean/std in [0, 1]."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    augment: Augment = field(default_factory=Augment)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, limit: int | None) -> "TensorData":
        """The first ``limit`` samples (all when None): deterministic, cheap."""
        if limit is None or limit >= len(self):
            return self
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        return TensorData(self.images[:limit], self.labels[:limit], self.mean, self.std, self.augment)

    def batch(self, index: torch.Tensor, offsets=None, flips=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float images and labels for ``index``, augmented when draws are given."""
        x = self.images[index]
        if offsets is not None:
            x = aug_mod.apply(x, offsets[index], flips[index], self.augment.shift)
        x = x.float().div_(255.0).sub_(self.mean[:, None, None]).div_(self.std[:, None, None])
        return x, self.labels[index]


def channel_stats(images: torch.Tensor, sample: int = 10_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std in [0, 1] from (up to) the first ``sample`` images."""
    x = images[:sample].float().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return mean, std


class TensorLoader:
    """Batches of a TensorData: shuffled and augmented for training, in order for evaluation.

    Training order comes from a ``DistributedSampler`` (one replica when not
    distributed), so a rank's share of each global batch is exactly the part
    a single process would have put in that batch.
    """

    def __init__(self, data: TensorData, batch_size: int, *, train: bool, seed: int = 0,
                 rank: int = 0, world: int = 1):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.data, self.batch_size, self.train, self.seed = data, batch_size, train, seed
        self.rank, self.world, self.epoch = rank, world, 0
        self.sampler = (DistributedSampler(range(len(data)), num_replicas=world, rank=rank, shuffle=True,
                                           seed=seed, drop_last=False) if train else None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def indices(self) -> torch.Tensor:
        if self.sampler is None:
            return torch.arange(self.rank, len(self.data), self.world)
        return torch.tensor(list(iter(self.sampler)), dtype=torch.long)

    def __len__(self) -> int:
        if self.train:  # the last partial batch is dropped: BatchNorm needs > 1 sample at 1x1
            return len(self.sampler) // self.batch_size
        return -(-len(range(self.rank, len(self.data), self.world)) // self.batch_size)

    def iterate(self, start: int = 0):
        """Yield (x, y) batches from batch number ``start`` on (resuming mid-epoch)."""
        index = self.indices()
        draws = (None, None)
        if self.train and self.data.augment.active:
            draws = aug_mod.draw(self.data.augment, len(self.data), self.seed, self.epoch)
        for b in range(start, len(self)):
            yield self.data.batch(index[b * self.batch_size:(b + 1) * self.batch_size], *draws)

    def __iter__(self):
        return self.iterate(0)
