"""Modules of EXP-Net: the expanded block, the plain low-precision block, expand and collapse."""

from expcuda.nn.block import ExpandedConv2d, LowPrecisionConv2d
from expcuda.nn.expand import ConcatInput, collapse, expand

__all__ = ["ExpandedConv2d", "LowPrecisionConv2d", "expand", "collapse", "ConcatInput"]
