"""TrainConfig: one run's every knob (preset defaults overridden by flags), with validation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from expcuda import decay as decay_schedules
from expcuda import _checks
from expcuda.models import ModelConfig
from expcuda.models.config import FIXED_BITS, FIXED_BITS_WHY
from expcuda.train.presets import PRESETS

OPTIMIZERS = ("adam", "sgd")

# Fields that may differ between a run and its resumption: where things are, not what is trained.
NOT_IDENTITY = ("data_dir", "out", "resume", "progress", "threads", "workers", "bind_cores")
FLOAT32_MAX = 3.4028234663852886e38
SEED_MAX = 2**32 - 1  # numpy's and the data order's seeds are 32-bit; torch takes them as they are


def _flag(field: str) -> str:
    return field.replace("_", "-")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainConfig:
    """A training run. ``batch_size`` is global (split over DDP ranks); see ``decay_epochs``."""

    preset: str = "fmnist"
    dataset: str = "fmnist"
    data_dir: Optional[str] = None
    model: str = "svhn_net"
    width: float = 0.25
    mode: str = "exp"  # exp (EXP-Net), lp (the baseline), fp (full precision)
    w_quant: str = "dorefa"
    w_bits: int = 2
    a_quant: str = "dorefa"
    a_bits: int = 2
    scheme: int = 2
    combine: str = "add"
    fp_ratio: float = 1.0
    fp_activation: Optional[str] = None
    expand_layers: str = "all"
    decay: str = "cosine"
    decay_steps: str = "40%"
    decay_rate: float = 0.5
    decay_threshold: float = 0.001
    async_decay: Optional[list] = None
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    milestones: tuple = (0.5,)
    lr_factor: float = 0.2
    epochs: int = 4
    batch_size: int = 128
    seed: int = 0
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    out: str = "runs/train"
    resume: bool = False
    progress: bool = True
    threads: Optional[int] = None
    workers: int = 2
    sync_bn: bool = True  # DDP: BatchNorm statistics over the global batch (see expcuda.nn.sync_bn)
    bind_cores: bool = False  # DDP: each rank pinned to its own CPUs (expcuda.train.distributed.core_share)
    nesterov: bool = False  # SGD with Nesterov momentum (Zhuang et al.'s recipes)
    # Zhuang et al. (expcuda.methods; checked by expcuda.train.methods.check)
    progressive: Optional[str] = None  # "two-stage" or "bits:32,8,4,2"
    stage_epochs: str = "split"  # split | full | "2,4": each stage's epochs
    stage_lr: str = "restart"  # restart: a fresh optimizer and LR schedule per stage | continue
    stage_scales: str = "reinit"  # LSQ/SYQ scales at a stage change: reinit | carry
    stochastic_precision: Optional[float] = None  # P0, the quantized fraction at the start
    sp_unit: str = "layer"
    sp_weighting: str = "uniform"
    sp_reach: float = 0.5  # the fraction of training after which every unit is quantized
    distill: Optional[str] = None  # kl | mse: a full-precision twin trains alongside
    distill_t: float = 1.0
    distill_lt: float = 1.0
    distill_ls: float = 0.7
    distill_ltl: float = 0.5
    distill_lsl: float = 0.7
    twin: str = "relu"  # the twin's activation: relu (expcuda's FP network) | clip (the authors' [0, 1])
    twin_lr: Optional[float] = None  # None: lr
    teacher: Optional[str] = None  # a full-precision run folder: a frozen teacher instead of a twin
    init_from: Optional[str] = None  # full-precision weights (fp_model.safetensors or its run folder) to start from

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "TrainConfig":
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        values = {**PRESETS[preset], "preset": preset}
        values.update({k: v for k, v in overrides.items() if v is not None})
        for quant, bits in (("w_quant", "w_bits"), ("a_quant", "a_bits")):
            if overrides.get(bits) is None and values.get(quant) in FIXED_BITS:
                values[bits] = FIXED_BITS[values[quant]]  # the recipe's bit-width does not apply to it
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            _checks.positive_int(name, getattr(self, name))
        _checks.choice("optimizer", self.optimizer, OPTIMIZERS)
        _checks.choice("decay", self.decay, decay_schedules.SCHEDULES)
        for name in ("limit_train", "limit_test", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"--{_flag(name)} must be a positive int (or left out), got {value!r}")
        _checks.int_in("--workers", self.workers, 0)
        if not _finite(self.lr) or not 0 < self.lr <= FLOAT32_MAX:  # the optimizers scale float32 by it
            raise ValueError(f"--lr must be a finite number > 0 (at most {FLOAT32_MAX:.4g}), got {self.lr!r}")
        if not _finite(self.momentum) or not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum must be a number in [0, 1), got {self.momentum!r}")
        if not _finite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay!r}")
        _checks.int_in("--seed", self.seed, 0, SEED_MAX)
        for quant, bits, what in (("w_quant", "w_bits", "weights"), ("a_quant", "a_bits", "activations")):
            kind, value = getattr(self, quant), getattr(self, bits)
            if kind in FIXED_BITS and value != FIXED_BITS[kind]:
                raise ValueError(f"--{_flag(bits)} {value}: {kind} {what} have no bit-width to set "
                                 f"({FIXED_BITS_WHY[kind]}); leave --{_flag(bits)} out")
        if not 0 < self.decay_rate < 1:
            raise ValueError(f"decay_rate must be in (0, 1), got {self.decay_rate!r}")
        if not 0 < self.decay_threshold < 1:
            raise ValueError(f"decay_threshold must be in (0, 1), got {self.decay_threshold!r}")
        self.decay_epochs(self.decay_steps)
        for steps in self.async_decay or ():
            self.decay_epochs(steps)
        self.model_config(10, 1)  # model options are checked by ModelConfig
        from expcuda.train import methods
        methods.check(self)

    def decay_epochs(self, spec) -> float:
        """A decay length in epochs from "N" (epochs), "0.3" or "30%" (a fraction of training)."""
        text = str(spec).strip()
        try:
            if text.endswith("%"):
                value = float(text[:-1]) / 100 * self.epochs
            elif "." in text:
                value = float(text) * self.epochs
                if not 0 < float(text) <= 1:
                    raise ValueError
            else:
                value = float(int(text))
        except ValueError:
            raise ValueError(f"decay steps must be whole epochs ('30'), or a fraction of training "
                             f"('0.25' or '25%'), got {spec!r}") from None
        if not value > 0:
            raise ValueError(f"decay steps must be positive, got {spec!r}")
        return value

    def model_config(self, num_classes: int, in_channels: int) -> ModelConfig:
        return ModelConfig(arch=self.model, width=self.width, num_classes=num_classes, in_channels=in_channels,
                           mode=self.mode, expand_layers=self.expand_layers, w_quant=self.w_quant,
                           w_bits=self.w_bits, a_quant=self.a_quant, a_bits=self.a_bits, scheme=self.scheme,
                           combine=self.combine, fp_ratio=self.fp_ratio, fp_activation=self.fp_activation)

    def lr_milestones(self) -> list[int]:
        """Epochs at which the LR is multiplied by ``lr_factor``."""
        return sorted({max(1, round(m * self.epochs)) for m in self.milestones if round(m * self.epochs) < self.epochs})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(d["milestones"])
        return d

    def identity(self) -> dict:
        """What must match for ``--resume`` to continue the same run."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_IDENTITY}

    def replace(self, **changes) -> "TrainConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg


def steps_until_zero(kind: str, decay_steps: int, rate: float, threshold: float) -> int:
    """The first step at which the schedule's f is exactly 0."""
    if kind == "cosine":
        return decay_steps
    stairs = math.floor(math.log(threshold) / math.log(rate)) + 1  # first k with rate**k < threshold
    while rate ** stairs >= threshold:
        stairs += 1
    return stairs * decay_steps


__all__ = ["TrainConfig", "steps_until_zero"]
