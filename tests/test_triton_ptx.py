"""The Triton kernels as a GPU compiles them, checked without a GPU.

The interpreter (``TRITON_INTERPRET=1``) never contracts ``a * b + c`` into an FMA and divides
exactly, so the bit-exact tests cannot see what the compiled kernels do.  Here every launch that
the quantizers and the epilogue make on tiny inputs is recorded (argument types, constexprs and
the options it passes), and a subprocess without TRITON_INTERPRET compiles each for sm_90
(``tests/triton_ptx_worker.py``).  The numeric contract makes every one of these kernels exact:
no FMA, no approximate division or math, no flush-to-zero in the PTX; and every block of
pointers is offset by int64 (z and the weights may pass 2**31 elements).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from expcuda import backends
from tests import triton_ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_REASON = backends.why_not("triton", DEVICE, torch.float32)
pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(_REASON is not None, reason=f"triton backend: {_REASON}")]

WORKER = os.path.join(os.path.dirname(__file__), "triton_ptx_worker.py")
TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16",
         torch.bfloat16: "bf16", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
         torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1"}


def _type(v) -> str:
    if isinstance(v, torch.Tensor):
        return "*" + TYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(v).__name__}")


def _kernels(module) -> dict[str, object]:
    return {name: obj for name, obj in vars(module).items()
            if name.endswith("_kernel") and hasattr(obj, "arg_names")}


def _record_launches(monkeypatch) -> list[dict]:
    """Every launch through ``triton_quant.launch`` while the ops run on tiny inputs."""
    from expcuda._backends import triton_epilogue as E
    from expcuda._backends import triton_quant as T

    seen: dict[str, dict] = {}
    original = T.launch

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                names = self.kernel.arg_names
                constexprs = {k: v for k, v in kwargs.items() if k in names}
                options = {k: v for k, v in kwargs.items() if k not in names}
                item = {"module": self.kernel.fn.__module__, "name": self.kernel.fn.__name__,
                        "signature": {**{n: _type(a) for n, a in zip(names, args)},
                                      **{n: "constexpr" for n in constexprs}},
                        "constexprs": constexprs, "options": options}
                seen.setdefault(json.dumps(item, sort_keys=True), item)
                return self.kernel[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(T, "launch", lambda kernel, grid, *a, **k: original(Recorder(kernel), grid, *a, **k))
    triton_ops.run_quantizers(T, DEVICE)
    triton_ops.run_epilogue(E, DEVICE)
    return list(seen.values())


@pytest.fixture(scope="module")
def compiled():
    """(launches, the worker's report on each)."""
    with pytest.MonkeyPatch.context() as mp:
        launches = _record_launches(mp)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, WORKER], input=json.dumps(launches), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return launches, json.loads(proc.stdout)


def test_every_kernel_is_launched_through_the_launch_helper(compiled):
    from expcuda._backends import triton_epilogue as E
    from expcuda._backends import triton_quant as T
    launched = {(item["module"], item["name"]) for item in compiled[0]}
    for module in (T, E):
        for name in _kernels(module):
            assert (module.__name__, name) in launched, f"{name} was not launched through launch()"


def test_compiled_kernels_hold_no_fma_approximate_division_or_ftz(compiled):
    bad = {f"{item['name']} {item['constexprs']}": rep["inexact"]
           for item, rep in zip(*compiled) if rep["inexact"]}
    assert not bad, f"inexact instructions in the sm_90 PTX: {bad}"


def test_compiled_kernels_offset_pointers_in_int64(compiled):
    bad = {f"{item['name']} {item['constexprs']}": rep["narrow_offsets"][:3]
           for item, rep in zip(*compiled) if rep["narrow_offsets"]}
    assert not bad, f"32-bit pointer offsets in the TTIR: {bad}"
