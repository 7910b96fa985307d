"""expcuda: fast, accurate training of low-precision CNNs (EXP-Net and friends)."""

from expcuda import decay, quant
from expcuda.backends import BackendError, use_backend
from expcuda.nn import ExpandedConv2d, LowPrecisionConv2d, collapse, expand

__all__ = ["quant", "decay", "use_backend", "BackendError", "ExpandedConv2d", "LowPrecisionConv2d",
           "expand", "collapse"]
__version__ = "0.1.0"
