"""The whole packed model (``expcuda.load_packed``) against the collapsed float32 model, side by side.

    PYTHONPATH=. OMP_NUM_THREADS=1 python -m pytest benchmarks/benchmark_packed_model.py \
        --benchmark-group-by=param:width,param:bits,param:batch --benchmark-columns=min,median,rounds

Each group times both models on the same random 1-channel 40x40 images (Fashion-MNIST's shape) for
``svhn_net`` in LP mode (the collapsed form) with random weights, exported to a packed file and
loaded back; ``expcuda bench-infer RUN_DIR`` does the same for a trained run and prints images/s
and GOP/s.  Target on the CPU: the 1/1-bit packed model 4x faster than the float model.
"""

from __future__ import annotations

import functools

import pytest
import torch

import expcuda
from expcuda import models


@functools.cache
def _models(width: float, bits: int, tmp: str):
    torch.manual_seed(0)
    cfg = models.ModelConfig(arch="svhn_net", width=width, in_channels=1, mode="lp", w_bits=bits, a_bits=bits)
    float_model = models.build(cfg).eval()
    path = f"{tmp}/svhn_{width}_{bits}.packed.safetensors"
    expcuda.export(float_model, path)
    return float_model, expcuda.load_packed(path)


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("width", [0.25, 1.0])
@pytest.mark.parametrize("impl", ["float32", "packed"])
def test_model(benchmark, tmp_path_factory, impl, width, bits, batch):
    float_model, packed = _models(width, bits, str(tmp_path_factory.getbasetemp()))
    model = float_model if impl == "float32" else packed
    x = torch.rand(batch, 1, 40, 40)
    with torch.no_grad():
        benchmark(model, x)
