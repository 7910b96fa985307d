"""ImageNet-style image folders: train/<class>/*.JPEG and val/<class>/*.JPEG, decoded with PIL.

Too big for memory, so images are decoded by DataLoader worker processes:
random-resized-crop 224 + flip for training, resize 256 + centre crop 224
for evaluation (the paper's single-crop protocol).
"""

from __future__ import annotations

import math
import os
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from expcuda.data.errors import DataError, malformed, missing

EXTENSIONS = (".jpeg", ".jpg", ".png", ".ppm", ".bmp", ".webp")
MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])
HOW = ("put the ILSVRC-2012 images in <data-dir>/train/<wnid>/*.JPEG and <data-dir>/val/<wnid>/*.JPEG "
       "(the validation images sorted into one folder per class, as the usual valprep.sh does)")


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("ImageNet folders need Pillow to decode images: pip install pillow") from None
    return Image


def scan(root: str, split: str, classes: list[str] | None = None):
    """(classes, [(path, label)]) of root/split; val must hold the same class folders as train."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise missing(f"the {split}/ folder", root, HOW)
    found = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not found:
        raise malformed(folder, "one sub-folder per class", "no sub-folders (unsorted validation images?)")
    if classes is not None and found != classes:
        extra, lost = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise malformed(folder, "the same class folders as train/",
                        f"{len(extra)} extra ({extra[:3]}), {len(lost)} missing ({lost[:3]})")
    samples = []
    for label, name in enumerate(found):
        for dirpath, _, files in sorted(os.walk(os.path.join(folder, name))):
            samples += [(os.path.join(dirpath, f), label) for f in sorted(files) if f.lower().endswith(EXTENSIONS)]
    if not samples:
        raise malformed(folder, f"image files ({', '.join(EXTENSIONS)})", "none")
    return found, samples


def random_resized_crop(img, size: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """A random box of 8-100% of the area and aspect 3/4-4/3, resized to size x size."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((size, size), box=(left, top, left + cw, top + ch), resample=_pil().BILINEAR)
    side = min(w, h)  # fallback: the central square
    left, top = (w - side) // 2, (h - side) // 2
    return img.resize((size, size), box=(left, top, left + side, top + side), resample=_pil().BILINEAR)


def center_crop(img, size: int, resize: int):
    """Shorter side to ``resize``, then the central size x size."""
    w, h = img.size
    s = resize / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), resample=_pil().BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


class ImageFolder(Dataset):
    """uint8 (3, size, size) tensors and labels, augmented when ``train``."""

    def __init__(self, samples, size: int, train: bool, seed: int = 0):
        self.samples, self.size, self.train, self.seed, self.epoch = samples, size, train, seed, 0

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            img = _pil().open(path).convert("RGB")
        except Exception as exc:  # PIL raises several types for unreadable files
            raise malformed(path, "a readable image", f"{type(exc).__name__}: {exc}") from None
        if self.train:
            rng = random.Random(hash((self.seed, self.epoch, i)))
            img = random_resized_crop(img, self.size, rng)
            if rng.random() < 0.5:
                img = img.transpose(_pil().FLIP_LEFT_RIGHT)
        else:
            img = center_crop(img, self.size, round(self.size * 256 / 224))
        array = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
        return torch.from_numpy(array), label


class FolderLoader:
    """The TensorLoader interface over an ImageFolder, decoding in worker processes."""

    def __init__(self, data: ImageFolder, batch_size: int, *, train: bool, seed: int = 0,
                 rank: int = 0, world: int = 1, workers: int = 2):
        self.data, self.batch_size, self.train, self.workers = data, batch_size, train, workers
        self.rank, self.world = rank, world
        self.sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=train, seed=seed,
                                          drop_last=False)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.data.epoch = epoch

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def iterate(self, start: int = 0):
        index = list(iter(self.sampler))
        if not self.train:  # evaluation: each sample once, no padding duplicates
            index = list(range(self.rank, len(self.data), self.world))
        stop = len(self) * self.batch_size if self.train else len(index)
        loader = DataLoader(self.data, batch_size=self.batch_size, sampler=index[start * self.batch_size:stop],
                            num_workers=self.workers, persistent_workers=False, pin_memory=False)
        for x, y in loader:
            x = x.float().div_(255.0).sub_(MEAN[:, None, None]).div_(STD[:, None, None])
            yield x, y

    def __iter__(self):
        return self.iterate(0)


def load_imagenet(root: str, size: int = 224, seed: int = 0, limit_train=None, limit_test=None):
    """(train ImageFolder, val ImageFolder, number of classes)."""
    if not root or not os.path.isdir(root):
        raise missing("the ImageNet folder", str(root), "pass --data-dir; " + HOW)
    classes, train = scan(root, "train")
    _, val = scan(root, "val", classes)
    if limit_train:
        train = random.Random(seed).sample(train, min(limit_train, len(train)))
    if limit_test:
        val = sorted(random.Random(seed + 1).sample(val, min(limit_test, len(val))))
    return ImageFolder(train, size, True, seed), ImageFolder(val, size, False, seed), len(classes)
