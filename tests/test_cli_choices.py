"""The CLI's choices are the library's own constants, so a new quantizer or combine reaches the flags."""

import pytest

from expcuda import decay
from expcuda.nn import block, quantizers
from expcuda.train import args, config

FLAGS = [("--w-quant", quantizers, "W_QUANTS"), ("--a-quant", quantizers, "A_QUANTS"),
         ("--scheme", block, "SCHEMES"), ("--combine", block, "COMBINES"),
         ("--fp-activation", quantizers, "FP_ACTIVATIONS"), ("--decay", decay, "SCHEDULES"),
         ("--optimizer", config, "OPTIMIZERS")]


def choices(flag: str):
    action = next(a for a in args.parser()._actions if flag in a.option_strings)
    return tuple(action.choices)


@pytest.mark.parametrize("flag,module,name", FLAGS)
def test_flag_choices_are_the_library_constants(flag, module, name, monkeypatch):
    assert choices(flag) == tuple(c for c in getattr(module, name) if c is not None)
    monkeypatch.setattr(module, name, tuple(getattr(module, name)) + ("extra",))
    if module is config:  # imported by name into args
        monkeypatch.setattr(args, name, getattr(module, name))
    assert "extra" in choices(flag)  # a value added to the library's constant reaches the flag
