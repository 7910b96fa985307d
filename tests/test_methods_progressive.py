"""Progressive quantization: stages, the in-place conversion, and the staircase's bad input."""

from __future__ import annotations

import pytest
import torch

from expcuda import models
from expcuda.methods import ProgressiveSchedule
from expcuda.nn import LowPrecisionConv2d


def schedule(spec, epochs=8, w_quant="dorefa", w_bits=2, a_quant="dorefa", a_bits=2, **kw):
    return ProgressiveSchedule(spec, w_quant=w_quant, w_bits=w_bits, a_quant=a_quant, a_bits=a_bits,
                               epochs=epochs, **kw)


def net(**options):
    torch.manual_seed(0)
    return models.svhn_net(0.125, in_channels=1, mode="lp", **options)


def block_levels(model, x):
    """Distinct values of the first LP conv's quantized weights and of its output."""
    block = next(m for m in model.modules() if isinstance(m, LowPrecisionConv2d))
    seen = {}
    handle = block.register_forward_hook(lambda m, i, o: seen.setdefault("out", o.detach()))
    model(x)
    handle.remove()
    return block.wq(block.lp_conv.weight).unique().numel(), seen["out"].unique().numel()


def test_stages_and_their_epochs():
    two = schedule("two-stage", epochs=5)
    assert [(s.w_bits, s.a_bits, s.start, s.epochs) for s in two.stages] == [(2, 32, 0, 2), (2, 2, 2, 3)]
    stair = schedule("bits:32,8,4,2", epochs=6)
    assert [s.epochs for s in stair.stages] == [1, 1, 2, 2] and stair.total_epochs == 6
    assert [stair.stage_at(e).index for e in range(7)] == [0, 1, 2, 2, 3, 3, 3]
    assert schedule("two-stage", epochs=3, stage_epochs="full").total_epochs == 6
    assert [s.epochs for s in schedule("bits:32,4/2,2/1", a_bits=1, stage_epochs="1,2,3").stages] == [1, 2, 3]


def test_two_stage_stage_one_leaves_the_activations_unquantized():
    model, x = net(), torch.rand(16, 1, 40, 40)
    sched = schedule("two-stage")
    model.train()
    sched.apply(model, sched.stages[0])
    w_levels, a_levels = block_levels(model, x)
    assert w_levels <= 4 and a_levels > 100  # 2-bit weights, activations only clipped to [0, 1]
    sched.apply(model, sched.stages[1])
    w_levels, a_levels = block_levels(model, x)
    assert w_levels <= 4 and a_levels <= 4


@pytest.mark.parametrize("fused", [True, False])
def test_the_staircase_hands_the_weights_over_and_runs_at_the_new_bits(fused):
    model, x = net(), torch.rand(16, 1, 40, 40)
    for m in model.modules():
        if isinstance(m, LowPrecisionConv2d):
            m.fused = None if fused else False
    sched = schedule("bits:32,8,4,2")
    model.train()
    levels = []
    for stage in sched.stages:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        sched.apply(model, stage)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # DoReFa: no scales to re-initialise
        levels.append(block_levels(model, x))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        model(x).sum().backward()
        opt.step()
    (w32, a32), (w8, a8), (w4, a4), (w2, a2) = levels
    assert w32 > 100 and a32 > 100  # full precision
    assert 16 < w8 <= 256 and 16 < a8 <= 256
    assert 4 < w4 <= 16 and 4 < a4 <= 16
    assert w2 <= 4 and a2 <= 4


def test_lsq_scales_are_reinitialised_or_carried():
    for scales, expect_same in (("reinit", False), ("carry", True)):
        model = net(w_quant="lsq", a_quant="lsq")
        block = next(m for m in model.modules() if isinstance(m, LowPrecisionConv2d))
        sched = schedule("bits:8,4,2", scales=scales)
        sched.apply(model, sched.stages[0])
        step8 = (block.wq.step.clone(), block.aq.step.clone())
        sched.apply(model, sched.stages[1])
        assert block.wq.bits == block.aq.bits == 4
        same = torch.equal(step8[0], block.wq.step) and torch.equal(step8[1], block.aq.step)
        assert same == expect_same


@pytest.mark.parametrize("spec, message", [
    ("bits:", "the staircase is empty"),
    ("bits:32,eight,2", "'eight' is not a bit-width"),
    ("bits:2,4,8", "strictly descend"),
    ("bits:8,8,2", "strictly descend"),
    ("bits:32,8,4", r"the last stage \(4/4 bits\) must be the model's W/A 2/2"),
    ("bits:2", "at least two stages"),
    ("bits:64,2", "bits must be in 1..32"),
    ("three-stage", "must be 'two-stage' or 'bits:'"),
    ("bits:32,16,2", r"stage 2 \(16/16 bits\) is not supported by the --w-quant dorefa quantizer"),
])
def test_bad_staircases_name_the_flag(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        schedule(spec)
    assert str(info.value).startswith("--progressive")


def test_quantizers_that_cannot_run_a_stage_are_refused():
    with pytest.raises(ValueError, match=r"stage 2 \(4/4 bits\) is not supported by the --w-quant syq"):
        schedule("bits:32,4,2", w_quant="syq")
    with pytest.raises(ValueError, match="xnor is binary"):
        schedule("bits:32,4,1/2", w_quant="xnor", w_bits=1)
    assert len(schedule("bits:32,2/1", a_quant="sign", a_bits=1).stages) == 2
    with pytest.raises(ValueError, match="cannot be split among 4 stages"):
        schedule("bits:32,8,4,2", epochs=3)
    with pytest.raises(ValueError, match="--stage-epochs 1,2 lists 2 stages, --progressive has 4"):
        schedule("bits:32,8,4,2", stage_epochs="1,2")
