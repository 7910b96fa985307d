"""Progressive quantization (Zhuang et al.): two-stage, and the bit-width staircase.

``two-stage``: stage 1 trains quantized weights with full-precision
activations, stage 2 quantizes both, from stage 1's weights.
``bits:32,8,4,2``: each stage runs every quantizer at that stage's bits
(32 = full precision), from the previous stage's weights; an entry ``W/A``
gives weights and activations their own bits (``bits:32,8,4,2/1``). The last
stage is the model's own W/A bits.

A schedule says which stage applies at an epoch and converts a model in
place (``apply``): bits set on every quantizer, learned LSQ/SYQ scales
re-initialised from the current weights (``scales="reinit"``, the default:
a scale learned for 8 bits is 2**6 too fine for 2 bits) or kept
(``"carry"``). Stage lengths: ``"split"`` (the default) divides the run's
epochs among the stages, the same budget as the baseline's; ``"full"``
gives every stage the whole ``epochs``; or a list of epochs per stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from expcuda.methods import units
from expcuda.nn.quantizers import BINARY, check_a_bits, check_w_bits

FP = 32  # a stage's bits for "not quantized"
SCALES = ("reinit", "carry")


@dataclass(frozen=True)
class Stage:
    index: int  # from 0
    w_bits: int  # 32: full-precision weights
    a_bits: int  # 32: full-precision activations
    start: int  # first epoch
    epochs: int

    @property
    def end(self) -> int:
        return self.start + self.epochs

    def label(self) -> str:
        def one(b):
            return "FP" if b == FP else str(b)
        return f"W{one(self.w_bits)}/A{one(self.a_bits)}"


def parse(spec: str, w_bits: int, a_bits: int) -> list[tuple[int, int]]:
    """The stages' (w_bits, a_bits) from ``--progressive``; raises naming the flag."""
    text = str(spec).strip()
    if text == "two-stage":
        return [(w_bits, FP), (w_bits, a_bits)]
    if not text.startswith("bits:"):
        raise ValueError(f"--progressive must be 'two-stage' or 'bits:' and a descending list such as "
                         f"bits:32,8,4,{w_bits}, got {spec!r}")
    entries = [e.strip() for e in text[5:].split(",")]
    if entries == [""]:
        raise ValueError(f"--progressive {spec}: the staircase is empty; give the stages' bits, e.g. "
                         f"bits:32,8,4,{w_bits}")
    stages = []
    for e in entries:
        parts = e.split("/")
        if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"--progressive {spec}: {e!r} is not a bit-width (an int, or W/A such as 2/1)")
        w, a = int(parts[0]), int(parts[-1])
        if not (1 <= w <= FP and 1 <= a <= FP):
            raise ValueError(f"--progressive {spec}: {e!r}: bits must be in 1..32 (32 = full precision)")
        stages.append((w, a))
    if len(stages) < 2:
        raise ValueError(f"--progressive {spec}: a staircase needs at least two stages (one stage is the "
                         f"baseline)")
    for (w0, a0), (w1, a1) in zip(stages, stages[1:]):
        if w1 > w0 or a1 > a0 or (w1, a1) == (w0, a0):
            raise ValueError(f"--progressive {spec}: the bits must strictly descend, stage by stage; "
                             f"{w0}/{a0} is followed by {w1}/{a1}")
    if stages[-1] != (w_bits, a_bits):
        raise ValueError(f"--progressive {spec}: the last stage ({stages[-1][0]}/{stages[-1][1]} bits) must be "
                         f"the model's W/A {w_bits}/{a_bits} (--w-bits/--a-bits)")
    return stages


def check_supported(spec: str, bits: list[tuple[int, int]], w_quant: str, a_quant: str) -> None:
    """Every stage's bits are ones the quantizers implement (32 always is: the quantizer off)."""
    last = bits[-1]
    for i, (w, a) in enumerate(bits):
        for side, kind, b, final in (("w", w_quant, w, last[0]), ("a", a_quant, a, last[1])):
            if b == FP or kind == "none" or (side == "a" and kind == "dorefa" and b == FP):
                continue
            if BINARY.get(kind) == side and b != final:
                raise ValueError(f"--progressive {spec}: stage {i + 1} has {b}-bit "
                                 f"{'weights' if side == 'w' else 'activations'}, but {kind} is binary "
                                 f"(only full precision, 32, can come before it)")
            try:
                (check_w_bits if side == "w" else check_a_bits)(kind, b)
            except ValueError as exc:
                raise ValueError(f"--progressive {spec}: stage {i + 1} ({w}/{a} bits) is not supported by the "
                                 f"{'--w-quant' if side == 'w' else '--a-quant'} {kind} quantizer: {exc}") from None


def split_epochs(how, epochs: int, n: int) -> list[int]:
    """Each stage's epochs: 'split' (of ``epochs``, the extra ones to the last stages), 'full', or a list."""
    if how == "split":
        if epochs < n:
            raise ValueError(f"--epochs {epochs} cannot be split among {n} stages (each needs one epoch at "
                             f"least); raise --epochs, or give --stage-epochs full or a list")
        base, extra = divmod(epochs, n)
        return [base + (1 if i >= n - extra else 0) for i in range(n)]
    if how == "full":
        return [epochs] * n
    parts = [p.strip() for p in str(how).split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--stage-epochs must be 'split', 'full' or positive epochs per stage such as 2,4, "
                         f"got {how!r}")
    if len(parts) != n:
        raise ValueError(f"--stage-epochs {how} lists {len(parts)} stages, --progressive has {n}")
    return [int(p) for p in parts]


class ProgressiveSchedule:
    """The stages of one progressive run, and the in-place conversion of a model to a stage."""

    def __init__(self, spec: str, *, w_quant: str, w_bits: int, a_quant: str, a_bits: int, epochs: int,
                 stage_epochs="split", scales: str = "reinit"):
        if scales not in SCALES:
            raise ValueError(f"--stage-scales must be one of {', '.join(SCALES)}, got {scales!r}")
        self.spec, self.scales = spec, scales
        bits = parse(spec, w_bits, a_bits)
        check_supported(spec, bits, w_quant, a_quant)
        lengths = split_epochs(stage_epochs, epochs, len(bits))
        starts = [sum(lengths[:i]) for i in range(len(bits))]
        self.stages = [Stage(i, w, a, s, n) for i, ((w, a), s, n) in enumerate(zip(bits, starts, lengths))]

    @property
    def total_epochs(self) -> int:
        return self.stages[-1].end

    def stage_at(self, epoch: int) -> Stage:
        """The stage that trains epoch ``epoch`` (from 0); the last one from its start on."""
        for stage in self.stages:
            if epoch < stage.end:
                return stage
        return self.stages[-1]

    def apply(self, model: nn.Module, stage: Stage, reinit: bool | None = None) -> nn.Module:
        """Set every quantizer of ``model`` to ``stage``'s bits in place (32: off); ``reinit``
        (default: ``scales == 'reinit'``) re-initialises LSQ/SYQ scales from the current weights."""
        reinit = self.scales == "reinit" if reinit is None else reinit
        for wq, weight in units.weight_quantizers(model):
            wq.enabled = stage.w_bits != FP
            if wq.enabled:
                wq.set_bits(stage.w_bits if BINARY.get(wq.kind) != "w" else wq.bits, weight if reinit else None)
        for aq in units.activation_quantizers(model):
            aq.enabled = stage.a_bits != FP
            if aq.enabled and aq.kind != "sign":
                aq.set_bits(stage.a_bits, reinit)
        return model
