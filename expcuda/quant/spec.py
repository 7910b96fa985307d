"""What one quantizer module declares, and the tables built from every such module.

Each module of ``expcuda/quant/kinds`` holds one quantizer end to end on the Python side:
its kernel entry points (declared with the op registry), their pure-PyTorch reference
(the definition of correct), the ``torch.library`` custom ops with their fake kernels and
autograd, the public function, what ``expcuda.nn``'s modules need to use it, and its
self-check cases.  ``expcuda.quant`` imports every module there; the backends, the CLI's
choices and the self-check read the tables below, so nothing else lists the quantizers.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from expcuda import registry

KERNELS: dict[str, str] = {}  # kernel entry point -> what it computes (declared with the registry)
REFERENCE: dict[str, Callable] = {}  # kernel entry point -> its reference kernel
COMPILED: dict[str, Callable] = {}  # entry point -> (torch.ops.expcuda_C, *args): argument conversion
PUBLIC: dict[str, Callable] = {}  # public function name -> function (exported by expcuda.quant)
WEIGHT_KINDS: dict[str, "WeightKind"] = {}  # w_quant name -> how the nn modules use it
SELFTEST: dict[str, list] = {}  # public function name -> [(label, fn, make(dtype, device) -> inputs)]


def kernels(**docs: str) -> None:
    """Declare kernel entry points (name=doc): every backend may serve them, same signature."""
    for name, doc in docs.items():
        registry.declare(name, doc)
        KERNELS[name] = doc


def reference(fn: Callable) -> Callable:
    """Decorator: ``fn`` is the reference kernel of the entry point of its name."""
    if fn.__name__ not in KERNELS:
        raise KeyError(f"{fn.__name__} is not a declared kernel entry point")
    REFERENCE[fn.__name__] = fn
    return fn


def compiled(name: str) -> Callable:
    """Decorator: how the compiled backends call entry point ``name`` (the function gets the op
    namespace ``torch.ops.expcuda_C`` first), where Python arguments need converting (a string to
    its code)."""
    def register(fn: Callable) -> Callable:
        COMPILED[name] = fn
        return fn
    return register


def public(fn: Callable) -> Callable:
    """Decorator: exported as ``expcuda.quant.<name>``."""
    PUBLIC[fn.__name__] = fn
    return fn


def _nothing(*args) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class WeightKind:
    """How ``expcuda.nn.WeightQuantizer`` uses one weight quantizer (``w_quant=name``)."""
    name: str
    order: int  # its place among the choices (``--w-quant``)
    forward: Callable  # (module, w) -> the quantized weight
    bits: Optional[tuple[int, int]] = (1, 8)  # the w_bits it takes, lo..hi; None: binary, no bit-width
    binary_why: str = ""  # with bits=None: why there is no bit-width to set
    setup: Callable = _nothing  # (module, kernel_size, eta, granularity): its learned parameters
    init_from: Callable = _nothing  # (module, mean|w| as a float32 scalar): data-dependent scales
    on_bits: Callable = _nothing  # (module, bits): after a change of bit-width


def weight_kind(**fields) -> WeightKind:
    kind = WeightKind(**fields)
    WEIGHT_KINDS[kind.name] = kind
    return kind


def selftest(name: str, cases: list) -> None:
    """The self-check's cases for public function ``name``: (label, fn, make(dtype, device))."""
    SELFTEST[name] = cases


def sample(shape, dtype, device, lo=-1.5, hi=1.5, seed=0, channels_last=False) -> torch.Tensor:
    """Random values in [lo, hi] led by exact boundaries and rounding ties (the hard cases)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen) * (hi - lo) + lo
    specials = torch.tensor([0.0, 1.0, -1.0, 0.5, 1 / 6, 0.5 / 3, 2.5 / 3, -0.0])
    k = min(x.numel(), specials.numel())
    x.view(-1)[:k] = specials[:k]
    x = x.to(dtype=dtype, device=device)
    return x.to(memory_format=torch.channels_last) if channels_last else x
