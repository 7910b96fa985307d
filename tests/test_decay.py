"""Decay of f: the formulas of METHODS.md and the scheduler that applies them."""

from __future__ import annotations

import math

import pytest
import torch

from expcuda import decay
from expcuda.nn import ExpandedConv2d


@pytest.mark.parametrize("b", [1, 7, 50])
def test_cosine_formula(b):
    for a in range(0, 3 * b + 2):
        expected = 0.5 + 0.5 * math.cos(math.pi * min(a, b) / b)
        assert decay.cosine(a, b) == pytest.approx(expected, abs=1e-15)
        if a >= b:
            assert decay.cosine(a, b) == 0.0  # exactly
    assert decay.cosine(0, b) == 1.0


@pytest.mark.parametrize("b,d,eps", [(3, 0.5, 0.001), (10, 0.7, 0.01), (1, 0.9, 0.2)])
def test_exponential_formula(b, d, eps):
    values = [decay.exponential(a, b, d, eps) for a in range(0, 40 * b)]
    for a, v in enumerate(values):
        raw = d ** (a // b)
        assert v == (0.0 if raw < eps else raw)
    assert values[0] == 1.0 and values[-1] == 0.0
    assert all(x >= y for x, y in zip(values, values[1:]))  # monotone
    first_zero = values.index(0.0)
    assert all(v == 0.0 for v in values[first_zero:])


def test_authors_default_exponential_reaches_zero():
    # 0.5 ** 10 < 0.001 <= 0.5 ** 9
    assert decay.exponential(9, 1) == 0.5 ** 9 and decay.exponential(10, 1) == 0.0


@pytest.mark.parametrize("call", [lambda: decay.cosine(-1, 5), lambda: decay.cosine(1, 0),
                                  lambda: decay.exponential(1, 2, rate=1.0),
                                  lambda: decay.exponential(1, 2, threshold=0.0)])
def test_bad_arguments(call):
    with pytest.raises(ValueError):
        call()


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(ExpandedConv2d(3, 4, 3), ExpandedConv2d(4, 4, 3),
                               ExpandedConv2d(4, 4, 3, expand=False), ExpandedConv2d(4, 4, 3))


def test_synchronous_schedule():
    m = model()
    sched = decay.DecayScheduler(m, decay.Cosine(4))
    assert set(sched.blocks) == {"0", "1", "3"}  # expand=False has no FP branch
    for a in range(7):
        for block in sched.blocks.values():
            assert float(block.f) == pytest.approx(decay.cosine(a, 4)) and block.f_is_zero == (a >= 4)
        sched.step()


def test_asynchronous_schedule_and_resume():
    m = model()
    sched = decay.DecayScheduler(m, decay.Exponential(2), per_layer={"1": 5, 2: decay.Cosine(3)})
    for _ in range(4):
        sched.step()
    vals = sched.values()
    assert vals == {"0": decay.exponential(4, 2), "1": decay.exponential(4, 5), "3": decay.cosine(4, 3)}
    state = sched.state_dict()
    m2 = model()
    resumed = decay.DecayScheduler(m2, decay.Exponential(2), per_layer={"1": 5, 2: decay.Cosine(3)})
    resumed.load_state_dict(state)
    assert resumed.values() == vals
    sched.step(), resumed.step()
    assert resumed.values() == sched.values()


def test_scheduler_errors():
    with pytest.raises(ValueError, match="per_layer"):
        decay.DecayScheduler(model(), decay.Cosine(3), per_layer={"2": 4})
    with pytest.raises(ValueError, match="schedule"):
        decay.DecayScheduler(model(), 5)
    with pytest.raises(ValueError, match="expanded"):
        decay.DecayScheduler(torch.nn.Linear(2, 2), decay.Cosine(3))
