"""The pure-PyTorch backend: always available, serves every device and dtype."""

from expcuda.quant.reference import *  # noqa: F401,F403  (the kernels)


def unavailable():
    return None


def refuses(device, dtype):
    return None
