"""Stochastic precision (Zhuang et al.): each training step quantizes a random subset of the units.

The rest run in full precision (weights and activations), in training mode
only: evaluation, and the model that ships, are always fully quantized. The
quantized fraction grows linearly from ``p0`` to 1, which it reaches after
``reach`` of the training steps, so the last part of training is the plain
fully quantized network. Stepped like an LR scheduler, after each optimizer
step; the draws come from the controller's own seeded generator, which its
``state_dict`` carries, so a resumed run draws what an uninterrupted one would.

Sampling: ``uniform`` (the default; the paper does not say) picks
``round(fraction * units)`` units uniformly without replacement;
``error`` picks them with probability proportional to 1 / (relative
quantization error of the unit's weights), as in Dong et al.'s stochastic
quantization (BMVC 2017): units that quantize well are quantized first.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from expcuda.methods.units import units as find_units

WEIGHTINGS = ("uniform", "error")


def check_options(p0, reach, weighting) -> None:
    if isinstance(p0, bool) or not isinstance(p0, (int, float)) or not 0.0 <= p0 <= 1.0:
        raise ValueError(f"--stochastic-precision P0 must be a number in [0, 1], got {p0!r}")
    if isinstance(reach, bool) or not isinstance(reach, (int, float)) or not 0.0 < reach < 1.0:
        raise ValueError(f"--sp-reach must be in (0, 1): the fraction of training after which every unit is "
                         f"quantized (it must reach 1 before the end), got {reach!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"--sp-weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")


class StochasticPrecision:
    """Which units are quantized at each step; ``step()`` after every optimizer step."""

    def __init__(self, model: nn.Module, p0: float, total_steps: int, *, reach: float = 0.5,
                 unit: str = "layer", weighting: str = "uniform", seed: int = 0):
        check_options(p0, reach, weighting)
        if not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        self.p0, self.reach, self.weighting = float(p0), float(reach), weighting
        self.total_steps = total_steps
        self.reach_steps = max(1, math.ceil(reach * total_steps))
        if self.reach_steps >= total_steps and p0 < 1:
            raise ValueError(f"--sp-reach {reach}: with {total_steps} training steps the quantized fraction "
                             f"would reach 1 only at the end; lower --sp-reach or train longer")
        self.units = find_units(model, unit)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.step_count = 0
        self.mask = self._draw()
        self._apply()

    def fraction(self, step: int | None = None) -> float:
        """The quantized fraction at ``step`` (default: now): p0 -> 1 linearly, 1 from reach_steps on."""
        t = self.step_count if step is None else step
        return min(1.0, self.p0 + (1.0 - self.p0) * t / self.reach_steps)

    def _draw(self) -> list[bool]:
        n = len(self.units)
        k = n if self.fraction() >= 1.0 else min(n, round(self.fraction() * n))
        if k in (0, n):  # nothing to choose: no draw, so p0 = 1 is exactly the baseline
            return [k == n] * n
        if self.weighting == "uniform":
            chosen = torch.randperm(n, generator=self.generator)[:k]
        else:
            chosen = torch.multinomial(self._error_weights(), k, replacement=False, generator=self.generator)
        mask = [False] * n
        for i in chosen.tolist():
            mask[i] = True
        return mask

    def _error_weights(self) -> torch.Tensor:
        """1 / relative quantization error per unit; an activation-only unit gets the mean weight."""
        errors = [u.weight_error() for u in self.units]
        known = [e for e in errors if e is not None]
        inv = [1.0 / max(e, 1e-12) for e in known]
        fill = sum(inv) / len(inv) if inv else 1.0
        it = iter(inv)
        return torch.tensor([next(it) if e is not None else fill for e in errors], dtype=torch.float64)

    def _apply(self) -> None:
        for unit, quantized in zip(self.units, self.mask):
            unit.set_skip(not quantized)

    def step(self) -> None:
        """Advance one training step and draw the next step's quantized units."""
        self.step_count += 1
        self.mask = self._draw()
        self._apply()

    def quantized(self) -> list[str]:
        """Names of the units quantized in the coming training step."""
        return [u.name for u, q in zip(self.units, self.mask) if q]

    def remove(self) -> None:
        """Every unit quantized again, in training too (the end of the run)."""
        for unit in self.units:
            unit.set_skip(False)

    def state_dict(self) -> dict:
        return {"step": self.step_count, "generator": self.generator.get_state(), "mask": list(self.mask),
                "units": [u.name for u in self.units]}

    def load_state_dict(self, state: dict) -> None:
        if list(state["units"]) != [u.name for u in self.units]:
            raise ValueError("the stochastic-precision state is for other units than this model's")
        self.step_count = int(state["step"])
        self.generator.set_state(state["generator"])
        self.mask = [bool(v) for v in state["mask"]]
        self._apply()
