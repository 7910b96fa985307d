"""Compiles Triton kernels for sm_90 without a GPU and reports what their code holds.

Run by tests/test_triton_ptx.py in a subprocess without TRITON_INTERPRET (under it ``@triton.jit``
gives interpreted functions that cannot be compiled).  stdin: a JSON list of launches
``{"module", "name", "signature", "constexprs", "options"}`` (the options the launch passed,
such as ``enable_fp_fusion``); stdout: a JSON list, one entry per launch,
``{"inexact": {instruction: count}, "narrow_offsets": [TTIR lines]}``.
"""

from __future__ import annotations

import collections
import importlib
import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
FLOAT_TYPES = {"f16", "bf16", "f32", "f64"}
APPROX_MATH = {"rcp", "sqrt", "rsqrt", "ex2", "lg2", "sin", "cos", "tanh"}


def inexact(ptx: str) -> dict[str, int]:
    """Float instructions that break an IEEE-exact contract: contracted multiply-adds, approximate
    division and math, and flush-to-zero of subnormals."""
    found = collections.Counter()
    for op in re.findall(r"^\s*(?:@%\w+\s+)?([a-z][a-z0-9]*(?:\.[a-z0-9]+)+)", ptx, re.M):
        head, *mods = op.split(".")
        fused = head in ("fma", "mad") and FLOAT_TYPES & set(mods)
        approx_div = head == "div" and {"full", "approx"} & set(mods)
        approx = head in APPROX_MATH and "approx" in mods
        if fused or approx_div or approx or "ftz" in mods:
            found[op] += 1
    return dict(found)


def narrow_offsets(ttir: str) -> list[str]:
    """tt.addptr ops that offset a block of pointers by 32-bit (or narrower) integers."""
    bad = []
    for line in ttir.splitlines():
        m = re.search(r"tt\.addptr .*: tensor<[^,]*!tt\.ptr<[^>]*>>, tensor<[\dx]+i(\d+)", line)
        if m and int(m.group(1)) < 64:
            bad.append(line.strip().split(" loc(")[0])
    return bad


def main() -> None:
    report = []
    for item in json.load(sys.stdin):
        kernel = getattr(importlib.import_module(item["module"]), item["name"])
        # constexprs keyed by (argument index,): what Triton 3.x takes, 3.6 (the GPU machine's) too
        constexprs = {(kernel.arg_names.index(k),): v for k, v in item["constexprs"].items()}
        src = ASTSource(fn=kernel, signature=item["signature"], constexprs=constexprs)
        compiled = triton.compile(src, target=TARGET, options=item["options"])
        report.append({"inexact": inexact(compiled.asm["ptx"]),
                       "narrow_offsets": narrow_offsets(compiled.asm["ttir"])})
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
