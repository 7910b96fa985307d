"""The Triton backend: GPU kernels that also run on the CPU under TRITON_INTERPRET=1."""

import os

from expcuda._backends import kernel_attributes

try:
    import triton  # noqa: F401
    _REASON = None
except ImportError as exc:
    _REASON = f"triton is not installed ({exc})"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable():
    if _REASON is not None:
        return _REASON
    import torch
    if not torch.cuda.is_available() and not interpreting():
        return "no CUDA GPU is visible, and TRITON_INTERPRET=1 is not set"
    return None


def refuses(device, dtype):
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreting():
        return None
    return f"runs {device.type} tensors only under TRITON_INTERPRET=1" if device.type == "cpu" \
        else f"does not serve {device.type} tensors"


if unavailable() is None:
    import torch

    from expcuda import registry
    from expcuda._backends import per_tensor
    from expcuda._backends import triton_epilogue
    from expcuda._backends import triton_quant
    from expcuda import quant
    registry.register_all("triton", triton_quant, quant.KERNELS, per_tensor(refuses))
    registry.register("block_epilogue_fwd", "triton", triton_epilogue.forward, per_tensor(refuses),
                      layouts=(torch.contiguous_format, torch.channels_last))
    registry.register("block_epilogue_bwd", "triton", triton_epilogue.backward, per_tensor(refuses),
                      layouts=(torch.contiguous_format, torch.channels_last))


__getattr__ = kernel_attributes("triton")
