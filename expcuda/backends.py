"""Backends as a whole: which can run in this process, and forcing one (``EXPCUDA_BACKEND``).

Which kernel runs a given op is decided by :mod:`expcuda.registry`, the one
dispatcher; this module keeps the backend-level questions the tools ask
(``python -m expcuda.info``, the self-check, the test fixtures).
"""

from __future__ import annotations

from typing import Optional

import torch

from expcuda.registry import (NAMES, BackendError, availability, forced_backend, load, report,  # noqa: F401
                              use_backend)


def why_not(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when backend ``name`` can serve ``dtype`` tensors on ``device`` at all, else why not."""
    reason = availability(name)
    if reason is None:
        reason = load(name).refuses(device, dtype)
    return reason
