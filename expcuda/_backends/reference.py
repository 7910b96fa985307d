"""The pure-PyTorch backend: always available, serves every device and dtype.

Its kernels are the definition of correct: the quantizers' in ``expcuda.quant.reference``
and the block epilogue's beside its op in ``expcuda.nn.epilogue``.
"""

from expcuda import registry
from expcuda.nn import epilogue
from expcuda.quant import ops, reference
from expcuda.quant.reference import *  # noqa: F401,F403  (the kernels, as module attributes too)


def unavailable():
    return None


def refuses(device, dtype):
    return None


registry.register_all("reference", reference, ops.KERNELS)
for _op, _fn in epilogue.REFERENCE_KERNELS.items():
    registry.register(_op, "reference", _fn)
