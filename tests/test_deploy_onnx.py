"""ONNX export of the collapsed model: onnxruntime against torch on real Fashion-MNIST images.

The custom quantizer ops do not export, so the graph holds the quantized weights as constants and
the activation quantizers' reference math in standard ops (``expcuda.deploy.onnx``). That rewrite is
checked bit for bit in torch; onnxruntime sums its convolutions in another order, so its logits
agree within float32 rounding (a code flips only where a value sits within rounding of a step).
"""

from __future__ import annotations

import pytest
import torch

from expcuda import models
from expcuda.deploy.onnx import OnnxNet, export_onnx, run_onnx
from tests import deploy_helpers as h

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("options", [dict(w_bits=2, a_bits=2), dict(w_quant="xnor", w_bits=1, a_quant="sign"),
                                     dict(w_quant="syq", w_bits=2, a_quant="lsq", a_bits=3)])
def test_standard_ops_rewrite_is_bit_exact(options):
    model = h.calibrated(0.3, **options)
    x = torch.randn(16, 1, 40, 40, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(OnnxNet(model)(x), model(x))


@h.needs_fmnist
def test_onnxruntime_matches_torch_on_fmnist(tmp_path):
    model = h.trained(w_bits=2, a_bits=2)
    x, y = h.test_images(256)
    path = str(tmp_path / "m.onnx")
    export_onnx(model, path, x[:1])
    got = run_onnx(path, x)
    with torch.no_grad():
        want = model(x)
    close = ((got - want).abs() <= 1e-4).all(1)
    assert close.float().mean() >= 0.99, float((got - want).abs().max())
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.99
    assert (want.argmax(1) == y).float().mean() > 0.4  # trained: chance is 0.1
    import onnx
    onnx.checker.check_model(onnx.load(path))


def test_refuses_a_model_not_collapsed(tmp_path):
    model = models.svhn_net(0.125, in_channels=1, mode="exp").eval()
    with pytest.raises(ValueError, match=r"features\.0: f = 1"):
        export_onnx(model, str(tmp_path / "m.onnx"), torch.zeros(1, 1, 40, 40))
    assert list(tmp_path.iterdir()) == []
