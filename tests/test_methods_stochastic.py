"""Stochastic precision: which units are quantized at each step, and p0 = 1 is the baseline step exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from expcuda import models
from expcuda.methods import StochasticPrecision, units


def tiny_net(seed=0, **options):
    torch.manual_seed(seed)
    return models.svhn_net(0.125, in_channels=1, mode="lp", **options)


def train_steps(model, sp=None, steps=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.rand(8, 1, 40, 40, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if sp is not None:
            sp.step()
    return model


def test_p0_one_is_the_baseline_step_bit_for_bit():
    base = train_steps(tiny_net())
    sp_model = tiny_net()
    sp = StochasticPrecision(sp_model, 1.0, 10)
    train_steps(sp_model, sp)
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), sp_model.state_dict().values()))
    half = tiny_net()
    train_steps(half, StochasticPrecision(half, 0.5, 10))  # the comparison can fail: p0 < 1 trains otherwise
    assert not all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), half.state_dict().values()))


def test_the_quantized_fraction_grows_to_one_and_the_skipped_units_run_full_precision():
    model = tiny_net()
    sp = StochasticPrecision(model, 0.0, 20, reach=0.5)  # 7 units, 1 at step 10
    n = len(sp.units)
    counts = []
    for step in range(20):
        counts.append(len(sp.quantized()))
        assert counts[-1] == round(min(1.0, step / 10) * n)
        for unit, q in zip(sp.units, sp.mask):
            assert all(qz.skip_in_training != q for qz in unit.quantizers)
        sp.step()
    assert counts[0] == 0 and counts[10:] == [n] * 10
    sp2 = StochasticPrecision(tiny_net(), 0.5, 20)
    conv = next(u for u, q in zip(sp2.units, sp2.mask) if not q and u.weights)
    wq, w = conv.weights[0]
    wq.train()
    assert torch.equal(wq(w), w)  # skipped in training: weights unquantized
    wq.eval()
    assert not torch.equal(wq(w), w) and wq(w).unique().numel() <= 4  # evaluation is always quantized


def test_evaluation_is_the_fully_quantized_network():
    model = tiny_net()
    x = torch.rand(4, 1, 40, 40)
    model.eval()
    full = model(x)
    sp = StochasticPrecision(model, 0.3, 50)
    assert len(sp.quantized()) < len(sp.units)
    model.eval()
    assert torch.equal(model(x), full)
    model.train()
    assert not torch.equal(model(x), model.eval()(x))


def test_draws_come_from_the_seeded_generator_and_resume_exactly():
    def masks(sp, n):
        out = []
        for _ in range(n):
            out.append(tuple(sp.mask))
            sp.step()
        return out

    a = StochasticPrecision(tiny_net(), 0.3, 100, seed=7)
    reference = masks(a, 12)
    b = StochasticPrecision(tiny_net(), 0.3, 100, seed=7)
    first = masks(b, 5)
    state = b.state_dict()
    torch.manual_seed(123)  # the global generator plays no part
    c = StochasticPrecision(tiny_net(), 0.3, 100, seed=7)
    c.load_state_dict(state)
    assert first + masks(c, 7) == reference
    assert len(set(reference)) > 1
    assert masks(StochasticPrecision(tiny_net(), 0.3, 100, seed=8), 12) != reference


def test_error_weighting_prefers_the_units_that_quantize_well():
    model = tiny_net()
    sp = StochasticPrecision(model, 0.2, 1000, weighting="error", seed=0)
    errors = [u.weight_error() for u in sp.units]
    weights = sp._error_weights()
    conv = [i for i, e in enumerate(errors) if e is not None]
    assert all(weights[i] == pytest.approx(1 / errors[i]) for i in conv)
    with torch.no_grad():  # make one conv quantize badly: a few huge weights
        sp.units[conv[0]].weights[0][1].view(-1)[:3] = 50.0
    hits = torch.zeros(len(sp.units))
    for _ in range(300):
        sp.step()
        hits += torch.tensor(sp.mask, dtype=torch.float32)
        if sp.fraction() > 0.3:
            break
    assert hits[conv[0]] < hits[conv[1:]].min()


def test_block_units_group_a_residual_block_and_bad_options_are_refused():
    res = models.preresnet20(0.25, mode="lp")
    blocks = units(res, "block")
    assert [u.name for u in blocks] == [f"features.{i}" for i in range(9)]
    assert len(blocks[3].quantizers) == 2 * 3 + 1  # conv1, conv2, shortcut (wq + aq each), the pre-activation
    with pytest.raises(ValueError, match="--sp-unit block needs a model with residual blocks"):
        units(tiny_net(), "block")
    with pytest.raises(ValueError, match=r"--stochastic-precision P0 must be a number in \[0, 1\]"):
        StochasticPrecision(tiny_net(), 1.5, 10)
    with pytest.raises(ValueError, match="--sp-reach must be in"):
        StochasticPrecision(tiny_net(), 0.5, 10, reach=1.0)
    with pytest.raises(ValueError, match="no quantizers"):
        units(models.svhn_net(0.125, in_channels=1, mode="fp"))


@pytest.mark.parametrize("w_quant, w_bits, a_quant, a_bits", [("dorefa", 2, "dorefa", 2), ("xnor", 1, "sign", 1),
                                                              ("syq", 2, "dorefa", 1), ("lsq", 4, "lsq", 4)])
def test_a_skipped_unit_is_the_full_precision_form_with_every_quantizer(w_quant, w_bits, a_quant, a_bits):
    from expcuda.methods import set_quantized

    opts = dict(w_quant=w_quant, w_bits=w_bits, a_quant=a_quant, a_bits=a_bits)
    x = torch.rand(4, 1, 40, 40)
    model, off = tiny_net(**opts).train(), set_quantized(tiny_net(**opts), False, False).train()
    StochasticPrecision(model, 0.0, 10)  # p0 = 0: no unit quantized in the first step
    out, ref = model(x), off(x)
    assert torch.equal(out, ref)
    out.sum().backward()
    model.eval()
    quantized = model(x)
    assert not torch.allclose(quantized, off.eval()(x), rtol=1e-3, atol=1e-3)
