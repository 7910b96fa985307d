"""Test-set evaluation: the expanded model at the current f, and the LP network alone at f = 0."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from expcuda.train import distributed
from expcuda.train.distributed import Dist


@torch.no_grad()
def evaluate(model: nn.Module, loader, d: Dist) -> dict:
    """Loss, top-1 and top-5 accuracy (%) over the whole test set (summed over DDP shards)."""
    was_training = model.training
    model.eval()
    loss = correct = top5 = count = 0.0
    for x, y in loader:
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == y[:, None]
        correct += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        count += y.numel()
    model.train(was_training)
    loss, correct, top5, count = distributed.all_sum(d, [loss, correct, top5, count])
    if count == 0:
        raise ValueError("the test set is empty")
    return {"loss": loss / count, "acc": 100.0 * correct / count, "top5": 100.0 * top5 / count}


@contextlib.contextmanager
def f_zero(model: nn.Module):
    """Every expanded block at f = 0 inside the block, its f restored after."""
    blocks = [m for m in model.modules() if getattr(m, "expanded", False) and hasattr(m, "set_f")]
    saved = [float(b.f) for b in blocks]
    for b in blocks:
        b.set_f(0.0)
    try:
        yield
    finally:
        for b, v in zip(blocks, saved):
            b.set_f(v)


def evaluate_both(model: nn.Module, loader, d: Dist, expanded: bool) -> dict:
    """``test_*`` at the current f and ``test_*_lp`` at f = 0 (one pass when nothing is expanded)."""
    now = evaluate(model, loader, d)
    if expanded:
        with f_zero(model):
            lp = evaluate(model, loader, d)
    else:
        lp = now
    return {"test_loss": now["loss"], "test_acc": now["acc"], "test_top5": now["top5"],
            "test_loss_lp": lp["loss"], "test_acc_lp": lp["acc"], "test_top5_lp": lp["top5"]}
