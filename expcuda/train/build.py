"""What a run is made of, from its TrainConfig: data, model, optimizer, LR schedule, f's decay."""

from __future__ import annotations

import torch
from torch import nn

from expcuda import data, decay, models
from expcuda.train.config import TrainConfig, steps_until_zero


def load_data(cfg: TrainConfig) -> tuple[data.Bundle, models.ModelConfig]:
    """The data fitted to the model, and the model's config (classes and channels from the data)."""
    channels = data.native_channels(cfg.dataset)
    size = models.ModelConfig(arch=cfg.model).input_size
    bundle = data.load(cfg.dataset, cfg.data_dir, size=size, channels=channels, limit_train=cfg.limit_train,
                       limit_test=cfg.limit_test, seed=cfg.seed)
    return bundle, cfg.model_config(bundle.num_classes, channels)


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


def make_lr_scheduler(cfg: TrainConfig, optimizer) -> torch.optim.lr_scheduler.MultiStepLR:
    """Stepped once per epoch: lr times ``lr_factor`` at each milestone epoch."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.lr_milestones(), gamma=cfg.lr_factor)


def make_decay(cfg: TrainConfig, model: nn.Module, steps_per_epoch: int) -> decay.DecayScheduler | None:
    """f's schedule in iterations, stepped after every optimizer step; None unless EXP-Net.

    ``--async-decay`` gives the last len(list) expanded layers their own decay
    lengths (the paper's 30, 50, 80 epochs); the others use ``--decay-steps``.
    Raises unless f is exactly 0 by the last step, since the shipped network
    is the collapsed one.
    """
    if cfg.mode != "exp":
        return None

    def schedule(spec):
        b = max(1, round(cfg.decay_epochs(spec) * steps_per_epoch))
        if cfg.decay == "cosine":
            return decay.Cosine(b)
        return decay.Exponential(b, cfg.decay_rate, cfg.decay_threshold)

    per_layer = {}
    n_blocks = sum(1 for m in model.modules() if getattr(m, "expanded", False))
    specs = list(cfg.async_decay or [])
    if len(specs) > n_blocks:
        raise ValueError(f"--async-decay lists {len(specs)} decay steps but the model has {n_blocks} expanded layers")
    for i, spec in enumerate(specs):
        per_layer[n_blocks - len(specs) + i] = schedule(spec)
    main = schedule(cfg.decay_steps)
    total = cfg.epochs * steps_per_epoch
    for sched in [main, *per_layer.values()]:
        zero = steps_until_zero(cfg.decay, sched.decay_steps, cfg.decay_rate, cfg.decay_threshold)
        if zero > total:
            raise ValueError(f"the decay would not reach f = 0 by the end of training (f = 0 at step {zero}, "
                             f"training has {total} steps = {cfg.epochs} epochs x {steps_per_epoch}); "
                             f"shorten --decay-steps (or --async-decay) or train longer")
    return decay.DecayScheduler(model, main, per_layer or None)


def current_f(model: nn.Module) -> float:
    """The largest f over the expanded blocks (all equal when synchronous); 0 without any."""
    values = [float(m.f) for m in model.modules() if getattr(m, "expanded", False) and hasattr(m, "f")]
    return max(values) if values else 0.0
