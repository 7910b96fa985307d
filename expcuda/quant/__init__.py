"""The quantizers of METHODS.md, each with its straight-through backward.

Each quantizer is one module of ``expcuda/quant/kinds`` (its reference kernels, custom ops,
public function, nn use and self-check cases; see ``expcuda.quant.spec``).  Importing this
package imports every one of them and exports their public functions here: for example
``expcuda.quant.xnor_weight`` is ``expcuda.quant.kinds.xnor.xnor_weight``, which checks its
arguments and calls the custom op ``torch.ops.expcuda.xnor_weight``, whose body asks the
registry (``expcuda.registry.dispatch``) for the backend kernel of ``xnor_weight_fwd``.
"""

from __future__ import annotations

import importlib
import pkgutil

from expcuda.quant import kinds, ops, spec  # noqa: F401  (ops declares the shared mask_bwd)

for _module in sorted(m.name for m in pkgutil.iter_modules(kinds.__path__)):
    importlib.import_module(f"{kinds.__name__}.{_module}")

globals().update(spec.PUBLIC)
__all__ = list(spec.PUBLIC)
KERNELS = spec.KERNELS  # every quantizer kernel entry point -> what it computes
WEIGHT_KINDS = spec.WEIGHT_KINDS
GRANULARITY_RANK = kinds.syq.GRANULARITY_RANK
