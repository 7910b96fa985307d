"""Decay of the factor ``f`` that fades out the full-precision branches (METHODS.md).

``cosine`` and ``exponential`` are the paper's two functions of the global
step ``a`` (an iteration or an epoch, whichever the scheduler is stepped by)
and the decay step ``b``.  ``DecayScheduler`` sets ``f`` on every expanded
block like an LR scheduler: one schedule for all (synchronous, the paper's
default) or a decay step per layer (asynchronous).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional, Union

from torch import nn

from expcuda import _checks

__all__ = ["cosine", "exponential", "Cosine", "Exponential", "DecayScheduler", "SCHEDULES"]

SCHEDULES = ("cosine", "exponential")  # the decay functions by name (the CLI's --decay)


def _check_steps(step, decay_steps) -> None:
    _checks.int_in("step", step, 0)
    _checks.positive_int("decay_steps", decay_steps)


def cosine(step: int, decay_steps: int) -> float:
    """``0.5 + 0.5*cos(pi*min(a, b)/b)``: 1 at the start, exactly 0 from ``b`` on."""
    _check_steps(step, decay_steps)
    if step >= decay_steps:
        return 0.0
    return 0.5 + 0.5 * math.cos(math.pi * step / decay_steps)


def exponential(step: int, decay_steps: int, rate: float = 0.5, threshold: float = 0.001) -> float:
    """``rate ** (a // b)``, set to 0 once it falls below ``threshold`` (the authors: 0.5, 0.001)."""
    _check_steps(step, decay_steps)
    _checks.number("rate", rate, 0.0, 1.0, lo_open=True, hi_open=True)
    _checks.number("threshold", threshold, 0.0, 1.0, lo_open=True)
    value = rate ** (step // decay_steps)
    return 0.0 if value < threshold else value


@dataclass(frozen=True)
class Cosine:
    """The cosine schedule as an object, so a scheduler can vary its decay step per layer."""
    decay_steps: int

    def __call__(self, step: int) -> float:
        return cosine(step, self.decay_steps)


@dataclass(frozen=True)
class Exponential:
    decay_steps: int
    rate: float = 0.5
    threshold: float = 0.001

    def __call__(self, step: int) -> float:
        return exponential(step, self.decay_steps, self.rate, self.threshold)


Schedule = Callable[[int], float]


def _expanded_blocks(model: nn.Module) -> dict[str, nn.Module]:
    from expcuda.nn.block import ExpandedConv2d
    return {name: m for name, m in model.named_modules()
            if isinstance(m, ExpandedConv2d) and m.expanded}


class DecayScheduler:
    """Sets ``f`` on the model's expanded blocks; call ``step()`` once per iteration or per epoch.

    ``schedule`` maps the step count to f (``Cosine(b)``, ``Exponential(b)``
    or any callable).  ``per_layer`` makes it asynchronous: block name (as in
    ``named_modules``) or index among the expanded blocks, mapped to a
    schedule, or to a decay step that replaces ``schedule``'s own.
    """

    def __init__(self, model: nn.Module, schedule: Schedule,
                 per_layer: Optional[Mapping[Union[str, int], Union[Schedule, int]]] = None):
        if not callable(schedule):
            raise ValueError(f"schedule must be callable (e.g. expcuda.decay.Cosine(50)), got {schedule!r}")
        self.blocks = _expanded_blocks(model)
        if not self.blocks:
            raise ValueError("model has no expanded blocks (ExpandedConv2d with expand=True)")
        names = list(self.blocks)
        self.schedules: dict[str, Schedule] = {name: schedule for name in names}
        for key, value in (per_layer or {}).items():
            name = names[key] if isinstance(key, int) and 0 <= key < len(names) else key
            if name not in self.blocks:
                raise ValueError(f"per_layer key {key!r} is not an expanded block; they are "
                                 f"{names} (or indices 0..{len(names) - 1})")
            if isinstance(value, int) and not isinstance(value, bool):
                if not isinstance(schedule, (Cosine, Exponential)):
                    raise ValueError("per_layer decay steps need schedule to be Cosine or Exponential")
                value = replace(schedule, decay_steps=value)
            elif not callable(value):
                raise ValueError(f"per_layer[{key!r}] must be a schedule or a decay step, got {value!r}")
            self.schedules[name] = value
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        for name, block in self.blocks.items():
            block.set_f(self.schedules[name](self.last_step))

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def values(self) -> dict[str, float]:
        """Each block's current f."""
        return {name: float(block.f) for name, block in self.blocks.items()}

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply()
