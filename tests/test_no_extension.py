"""The package works with no compiled extension at all (a pure-Python install)."""

import subprocess
import sys

SCRIPT = r"""
import sys
sys.modules["expcuda._C"] = None          # make `from expcuda import _C` fail as if never built
import torch, expcuda
from expcuda import backends, quant
report = backends.report()
assert report["reference"] is None, report
assert "not built" in report["cpu"], report
x = torch.rand(4, 3, requires_grad=True)
quant.dorefa_activation(x, 2).sum().backward()
assert x.grad is not None
from expcuda.info import lines
print("\n".join(lines()))
"""


def test_imports_and_runs_without_extension():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "cpu       unavailable: expcuda._C is not built" in done.stdout
