"""Zhuang et al. (TPAMI 2022): progressive quantization, stochastic precision, joint distillation.

Each is usable on its own, with EXP-Net's expanded blocks, and from a user's
own training loop; ``expcuda train`` / ``expcuda compare`` use these objects.
"""

from expcuda.methods.distill import DistillLoss, distill_step
from expcuda.methods.progressive import ProgressiveSchedule, Stage
from expcuda.methods.stochastic import StochasticPrecision
from expcuda.methods.units import Unit, set_quantized, units

__all__ = ["DistillLoss", "distill_step", "ProgressiveSchedule", "Stage", "StochasticPrecision", "Unit",
           "set_quantized", "units"]
