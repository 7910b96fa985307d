"""--init-from: a full-precision model's weights copied by position into the LP, EXP-Net or FP model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from expcuda import models
from expcuda.methods.pretrained import load_full_precision
from expcuda.nn import ExpandedConv2d, LowPrecisionConv2d


def saved_fp(tmp_path, arch="preresnet20", **kw):
    torch.manual_seed(1)
    cfg = models.ModelConfig(arch=arch, width=0.25, num_classes=10, mode="fp", **kw)
    fp = models.build(cfg)
    with torch.no_grad():
        for name, t in fp.state_dict().items():
            if t.is_floating_point():
                t.uniform_(-1, 1)  # running statistics too: every tensor must arrive
    path = str(tmp_path / "fp_model.safetensors")
    save_file({k: v.contiguous() for k, v in fp.state_dict().items()}, path)
    return cfg, fp, path


@pytest.mark.parametrize("mode", ["lp", "exp", "fp"])
def test_weights_arrive_in_order(tmp_path, mode):
    cfg, fp, path = saved_fp(tmp_path)
    torch.manual_seed(2)
    model = models.build(cfg.replace(mode=mode))
    load_full_precision(model, cfg.replace(mode=mode), path)
    fp_convs = [m for m in fp.modules() if isinstance(m, torch.nn.Conv2d)]
    ours = [m.lp_conv if isinstance(m, LowPrecisionConv2d) else m for m in model.modules()
            if isinstance(m, (LowPrecisionConv2d, torch.nn.Conv2d)) and not _inside_block(model, m)]
    assert len(ours) == len(fp_convs)
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(ours, fp_convs))
    assert torch.equal(model.fc.weight, fp.fc.weight)
    fp_bns = [m for m in fp.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    our_bns = [m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and not n.endswith("fp_bn")]
    assert all(torch.equal(a.running_var, b.running_var) for a, b in zip(our_bns, fp_bns))
    if mode == "exp":
        block = next(m for m in model.modules() if isinstance(m, ExpandedConv2d))
        assert not torch.equal(block.fp_conv.weight, block.lp_conv.weight)  # the FP branch keeps its own


def _inside_block(model, conv):
    """A Conv2d that is a block's own lp_conv / fp_conv (counted through the block)."""
    return any(conv is getattr(b, "lp_conv", None) or conv is getattr(b, "fp_conv", None)
               for b in model.modules() if isinstance(b, LowPrecisionConv2d))


def test_another_architecture_or_a_broken_file_is_refused(tmp_path):
    cfg, _, path = saved_fp(tmp_path)
    other = models.ModelConfig(arch="preresnet20", width=0.5, num_classes=10, mode="lp")
    with pytest.raises(ValueError, match=r"--init-from .*not the full-precision preresnet20 x0.5"):
        load_full_precision(models.build(other), other, path)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_full_precision(models.build(cfg.replace(mode="lp")), cfg, str(tmp_path / "bad.safetensors"))
