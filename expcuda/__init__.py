"""expcuda: fast, accurate training of low-precision CNNs (EXP-Net and friends)."""

from expcuda import quant
from expcuda.backends import BackendError, use_backend

__all__ = ["quant", "use_backend", "BackendError"]
__version__ = "0.1.0"

from expcuda.nn import ExpandedConv2d, LowPrecisionConv2d  # noqa: E402

__all__ += ["ExpandedConv2d", "LowPrecisionConv2d"]

from expcuda import decay  # noqa: E402
from expcuda.nn import collapse, expand  # noqa: E402

__all__ += ["expand", "collapse", "decay"]
