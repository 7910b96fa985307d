"""The pure-PyTorch backend: always available, serves every device and dtype.

Its kernels are the definition of correct: the quantizers' in their modules of ``expcuda/quant/kinds``
and the block epilogue's beside its op in ``expcuda.nn.epilogue``.
"""

from expcuda import registry
from expcuda._backends import kernel_attributes
from expcuda.deploy import ops as deploy_ops
from expcuda.nn import epilogue
from expcuda import quant  # noqa: F401  (imports every quantizer module, filling spec.REFERENCE)
from expcuda.quant import reference, spec


def unavailable():
    return None


def refuses(device, dtype):
    return None


for _op, _fn in spec.REFERENCE.items():
    registry.register(_op, "reference", _fn)
for _op, _fn in epilogue.REFERENCE_KERNELS.items():
    registry.register(_op, "reference", _fn)
registry.register(deploy_ops.PACKED_CONV2D, "reference", deploy_ops.reference_kernel)


_kernels = kernel_attributes("reference")


def __getattr__(name: str):
    """A registered kernel, else a helper of the reference (``pack_mask``, ``levels``, ...)."""
    try:
        return _kernels(name)
    except AttributeError:
        return getattr(reference, name)
