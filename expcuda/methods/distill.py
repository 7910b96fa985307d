"""Joint knowledge distillation (Zhuang et al.): a full-precision twin trains beside the low-precision net.

The authors' released form, the default (``kind="kl"``):

* low-precision loss  ``ls * CE(q, y) + lsl * T^2 * KL(p_fp || p_q)``
* full-precision loss ``lt * CE(fp, y) + ltl * T^2 * KL(p_q || p_fp)``

with ``p = softmax(logits / T)``, KL summed over classes and averaged over the
batch, and the other model's logits detached in each. ``kind="mse"`` puts the
mean squared difference of the logits in place of ``T^2 * KL``. With a frozen
teacher only the low-precision loss exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("kl", "mse")


def check_options(kind, temperature, **weights) -> None:
    if kind not in KINDS:
        raise ValueError(f"--distill must be one of {', '.join(KINDS)}, got {kind!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
            or not math.isfinite(temperature):
        raise ValueError(f"--distill-t (the temperature) must be a number > 0, got {temperature!r}")
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or not math.isfinite(w):
            raise ValueError(f"--distill-{name} must be a number >= 0, got {w!r}")


class DistillLoss(nn.Module):
    """``forward(q_logits, fp_logits, target)`` -> (low-precision loss, full-precision loss or None)."""

    def __init__(self, kind: str = "kl", temperature: float = 1.0, lt: float = 1.0, ls: float = 0.7,
                 ltl: float = 0.5, lsl: float = 0.7):
        super().__init__()
        check_options(kind, temperature, lt=lt, ls=ls, ltl=ltl, lsl=lsl)
        self.kind, self.temperature = kind, float(temperature)
        self.lt, self.ls, self.ltl, self.lsl = float(lt), float(ls), float(ltl), float(lsl)

    def mimic(self, student: Tensor, guide: Tensor) -> Tensor:
        """The term pulling ``student`` towards ``guide`` (detached): T^2 * KL(p_guide || p_student), or MSE."""
        guide = guide.detach()
        if self.kind == "mse":
            return F.mse_loss(student, guide)
        t = self.temperature
        return t * t * F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(guide / t, dim=1),
                                reduction="batchmean", log_target=True)

    def forward(self, q_logits: Tensor, fp_logits: Tensor, target: Tensor,
                fp_trains: bool = True) -> tuple[Tensor, Optional[Tensor]]:
        loss_q = self.ls * F.cross_entropy(q_logits, target) + self.lsl * self.mimic(q_logits, fp_logits)
        if not fp_trains:
            return loss_q, None
        loss_fp = self.lt * F.cross_entropy(fp_logits, target) + self.ltl * self.mimic(fp_logits, q_logits)
        return loss_q, loss_fp

    def extra_repr(self) -> str:
        return (f"{self.kind}, T={self.temperature}, lt={self.lt}, ls={self.ls}, ltl={self.ltl}, "
                f"lsl={self.lsl}")


@dataclass
class StepResult:
    q_logits: Tensor
    fp_logits: Tensor
    q_loss: Tensor
    fp_loss: Optional[Tensor]


def distill_step(student: nn.Module, twin: nn.Module, x: Tensor, y: Tensor, loss: DistillLoss,
                 student_opt: torch.optim.Optimizer,
                 twin_opt: Optional[torch.optim.Optimizer] = None) -> StepResult:
    """One training step of both models: two forwards, both losses, one backward, both optimizers.

    Each loss sees the other model's output detached, so one backward of
    their sum gives each model exactly its own loss's gradient. Without
    ``twin_opt`` the twin is a frozen teacher: run without autograd.
    """
    q_logits = student(x)
    if twin_opt is None:
        with torch.no_grad():
            fp_logits = twin(x)
    else:
        fp_logits = twin(x)
    q_loss, fp_loss = loss(q_logits, fp_logits, y, fp_trains=twin_opt is not None)
    student_opt.zero_grad(set_to_none=True)
    if twin_opt is not None:
        twin_opt.zero_grad(set_to_none=True)
    (q_loss if fp_loss is None else q_loss + fp_loss).backward()
    student_opt.step()
    if twin_opt is not None:
        twin_opt.step()
    return StepResult(q_logits, fp_logits, q_loss, fp_loss)
