"""expcuda: fast, accurate training of low-precision CNNs (EXP-Net and friends)."""

from expcuda import decay, quant
from expcuda.backends import BackendError, use_backend
from expcuda.nn import ExpandedConv2d, LowPrecisionConv2d, collapse, expand


def export(model, path, *, fp16=False, verbose=False):
    """Write a collapsed model bit-packed to ``path`` (see ``expcuda.deploy.export``); returns the sizes."""
    from expcuda.deploy.export import export as _export
    return _export(model, path, fp16=fp16, verbose=verbose)


def load_packed(path):
    """The packed model ``export`` wrote, as an nn.Module in eval mode (``expcuda.deploy.packed_model``)."""
    from expcuda.deploy.packed_model import load_packed as _load
    return _load(path)

__all__ = ["quant", "decay", "use_backend", "BackendError", "ExpandedConv2d", "LowPrecisionConv2d",
           "expand", "collapse", "export", "load_packed"]
__version__ = "0.1.0"
