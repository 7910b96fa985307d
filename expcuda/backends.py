"""Backend selection: which implementation serves an op for given inputs.

Backends are tried in priority order for the inputs' device; each one either
accepts or says why not.  ``EXPCUDA_BACKEND`` or :func:`use_backend` forces
one backend; if it cannot serve the inputs the error gives its reason, and if
nothing can, the error lists every backend with its reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from typing import Iterator, Optional

import torch

NAMES = ("reference", "cpu", "triton", "cuda")
_PRIORITY = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("expcuda_backend", default=None)


class BackendError(RuntimeError):
    """No backend (or not the forced one) can serve these inputs."""


def _check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(NAMES)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` for every expcuda op inside the ``with`` block."""
    token = _forced.set(_check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> Optional[str]:
    name = _forced.get()
    if name is None:
        env = os.environ.get("EXPCUDA_BACKEND", "").strip()
        if env:
            name = _check_name(env)
    return name


@functools.cache
def load(name: str):
    """The backend module ``expcuda.quant.<name>``-style object for ``name``."""
    return importlib.import_module(f"expcuda._backends.{name}")


@functools.cache
def availability(name: str) -> Optional[str]:
    """None when the backend can run at all in this process, else why not (asked once)."""
    try:
        module = load(name)
    except ImportError as exc:  # e.g. a broken Triton install
        return f"its module failed to import: {exc}"
    return module.unavailable()


def why_not(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    reason = availability(name)
    if reason is None:
        reason = load(name).refuses(device, dtype)
    return reason


_automatic: dict = {}  # (device, dtype) -> the automatic choice: availability is fixed per process


def select(device: torch.device, dtype: torch.dtype):
    """The backend module that serves inputs on ``device`` of ``dtype``.

    Every op call asks this (twice per forward + backward), so the automatic
    choice is remembered per (device, dtype); a forced backend is re-read
    each call, since ``use_backend`` and ``EXPCUDA_BACKEND`` may change.
    """
    name = forced_backend()
    if name is not None:
        reason = why_not(name, device, dtype)
        if reason is not None:
            raise BackendError(f"backend {name!r} was forced but cannot serve {dtype} tensors "
                               f"on {device}: {reason}")
        return load(name)
    key = (device, dtype)
    module = _automatic.get(key)
    if module is None:
        module = _automatic[key] = _automatic_choice(device, dtype)
    return module


def _automatic_choice(device: torch.device, dtype: torch.dtype):
    reasons = []
    for cand in _PRIORITY.get(device.type, ("reference",)):
        reason = why_not(cand, device, dtype)
        if reason is None:
            return load(cand)
        reasons.append(f"  {cand}: {reason}")
    raise BackendError(f"no expcuda backend serves {dtype} tensors on {device}:\n" + "\n".join(reasons))


def report() -> dict[str, Optional[str]]:
    """Each backend's name mapped to None (available) or the reason it is not."""
    return {name: availability(name) for name in NAMES}
