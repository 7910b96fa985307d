"""Joint distillation: the loss against a hand computation, and gradients reaching only the right model."""

from __future__ import annotations

import math

import pytest
import torch

from expcuda import models
from expcuda.methods import DistillLoss, distill_step


def hand_kl(p_logits, q_logits, t):
    """KL(softmax(p/t) || softmax(q/t)), summed over classes, averaged over the batch, written out."""
    total = 0.0
    for p_row, q_row in zip(p_logits.tolist(), q_logits.tolist()):
        zp = sum(math.exp(v / t) for v in p_row)
        zq = sum(math.exp(v / t) for v in q_row)
        for a, b in zip(p_row, q_row):
            p, q = math.exp(a / t) / zp, math.exp(b / t) / zq
            total += p * math.log(p / q)
    return total / len(p_logits)


def hand_ce(logits, y):
    rows = logits.tolist()
    return sum(-r[c] + math.log(sum(math.exp(v) for v in r)) for r, c in zip(rows, y.tolist())) / len(rows)


@pytest.mark.parametrize("t", [1.0, 3.0])
def test_kl_losses_equal_a_hand_computation(t):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    fp = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 2])
    loss_q, loss_fp = DistillLoss("kl", temperature=t)(q, fp, y)
    assert loss_q.item() == pytest.approx(0.7 * hand_ce(q, y) + 0.7 * t * t * hand_kl(fp, q, t), rel=1e-12)
    assert loss_fp.item() == pytest.approx(1.0 * hand_ce(fp, y) + 0.5 * t * t * hand_kl(q, fp, t), rel=1e-12)
    loss = DistillLoss("mse", ls=0.2, lsl=2.0, lt=0.3, ltl=1.5)
    loss_q, loss_fp = loss(q, fp, y)
    mse = sum((a - b) ** 2 for a, b in zip(q.flatten().tolist(), fp.flatten().tolist())) / q.numel()
    assert loss_q.item() == pytest.approx(0.2 * hand_ce(q, y) + 2.0 * mse, rel=1e-12)
    assert loss_fp.item() == pytest.approx(0.3 * hand_ce(fp, y) + 1.5 * mse, rel=1e-12)


def test_each_loss_reaches_only_its_own_model():
    q = torch.randn(6, 5, requires_grad=True)
    fp = torch.randn(6, 5, requires_grad=True)
    y = torch.randint(0, 5, (6,))
    loss_q, loss_fp = DistillLoss()(q, fp, y)
    loss_q.backward(retain_graph=True)
    assert fp.grad is None and q.grad.abs().sum() > 0
    q.grad = None
    loss_fp.backward()
    assert q.grad is None and fp.grad.abs().sum() > 0


def nets():
    torch.manual_seed(0)
    student = models.svhn_net(0.125, in_channels=1, mode="lp")
    twin = models.svhn_net(0.125, in_channels=1, mode="fp")
    return student, twin


def test_the_step_helper_gives_each_model_its_own_losss_gradient():
    x, y = torch.rand(8, 1, 40, 40), torch.randint(0, 10, (8,))
    loss = DistillLoss()
    student, twin = nets()
    opt_s = torch.optim.SGD(student.parameters(), lr=0.0)  # lr 0: the step leaves the gradients to read
    opt_t = torch.optim.SGD(twin.parameters(), lr=0.0)
    out = distill_step(student, twin, x, y, loss, opt_s, opt_t)
    got_s = [p.grad.clone() for p in student.parameters()]
    got_t = [p.grad.clone() for p in twin.parameters()]
    ref_s, ref_t = nets()
    lq, lf = loss(ref_s(x), ref_t(x), y)
    assert torch.equal(lq, out.q_loss) and torch.equal(lf, out.fp_loss)
    gs = torch.autograd.grad(lq, list(ref_s.parameters()), allow_unused=True)
    gt = torch.autograd.grad(lf, list(ref_t.parameters()), allow_unused=True)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(got_s, gs))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(got_t, gt))
    with pytest.raises(RuntimeError):  # the twin's output entered the student's loss detached
        torch.autograd.grad(loss(ref_s(x), ref_t(x), y)[0], list(ref_t.parameters()))


def test_a_frozen_teacher_gets_no_gradient_and_does_not_change():
    student, teacher = nets()
    before = [p.clone() for p in teacher.parameters()]
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    out = distill_step(student, teacher.eval(), torch.rand(4, 1, 40, 40), torch.randint(0, 10, (4,)),
                       DistillLoss(), opt)
    assert out.fp_loss is None and not out.fp_logits.requires_grad
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_bad_options_name_the_flag():
    with pytest.raises(ValueError, match="--distill must be one of kl, mse"):
        DistillLoss("l2")
    with pytest.raises(ValueError, match=r"--distill-t \(the temperature\) must be a number > 0"):
        DistillLoss(temperature=0)
    with pytest.raises(ValueError, match="--distill-lsl must be a number >= 0"):
        DistillLoss(lsl=-0.1)
