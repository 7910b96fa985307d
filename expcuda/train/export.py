"""The end of a run: collapse EXP-Net, check it against the expanded model at f = 0, export it."""

from __future__ import annotations

import copy
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import expcuda
from expcuda import models
from expcuda.train.atomic import atomic_path, write_text
from expcuda.train.evaluate import evaluate, f_zero


class CollapseMismatch(RuntimeError):
    """The collapsed network does not score what the expanded one scored at f = 0."""


def collapse_checked(model: nn.Module, loader, d) -> tuple[nn.Module, dict]:
    """The collapsed copy of ``model`` and its test metrics; raises unless they equal the expanded
    model's at f = 0 (same loss and accuracy, to the last bit of the sums)."""
    with f_zero(model):
        reference = evaluate(model, loader, d)
    lp = expcuda.collapse(copy.deepcopy(model))
    got = evaluate(lp, loader, d)
    if got["acc"] != reference["acc"] or got["loss"] != reference["loss"]:
        raise CollapseMismatch(f"the collapsed network scores {got['acc']:.4f}% (loss {got['loss']!r}) but the "
                               f"expanded model at f = 0 scores {reference['acc']:.4f}% (loss "
                               f"{reference['loss']!r}): collapse is broken, the exported model would differ")
    return lp, got


def export(model: nn.Module, cfg: models.ModelConfig, folder: str, stem: str) -> tuple[str, str]:
    """``stem.safetensors`` (weights and buffers) and ``stem.json`` (the config that rebuilds it),
    reloaded into a fresh model as a check."""
    weights, config = os.path.join(folder, f"{stem}.safetensors"), os.path.join(folder, f"{stem}.json")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(weights, write_errors=(SafetensorError,)) as tmp:  # its I/O errors, a full disk too
        save_file(state, tmp, metadata={"config": cfg.to_json(), "format": "expcuda-model"})
    write_text(config, cfg.to_json() + "\n")
    rebuilt = load(weights, config)
    for key, value in rebuilt.state_dict().items():
        if not torch.equal(value, state[key]):
            raise RuntimeError(f"export check failed: {key} differs after reloading {weights}")
    return weights, config


def load(weights: str, config: str) -> nn.Module:
    """The model saved by :func:`export`, in eval mode."""
    with open(config) as fh:
        cfg = models.ModelConfig.from_json(fh.read())
    model = models.build(cfg)
    model.load_state_dict(load_file(weights))
    return model.eval()
