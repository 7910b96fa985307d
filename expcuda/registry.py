"""The op registry and the one dispatcher: which kernel runs an op for given inputs.

Every op with more than one implementation (the quantizers' forward and
backward kernels, the block epilogue and its split passes, what comes next)
is declared here by name with :func:`declare`.  Each backend module in
``expcuda/_backends`` registers, when it is first loaded, the kernels it has
with :func:`register`: the function and one predicate that says, for the
op's first tensor argument, whether the kernel can serve it (device, dtype,
memory format) and why not.

:func:`dispatch` is the one place that picks.  A forced backend
(``EXPCUDA_BACKEND``, :func:`expcuda.use_backend`, or a forcing limited to
some ops, as the epilogue tests use) must serve the op, else the error says
why; otherwise the backends are tried in priority order for the tensor's
device and the first that serves wins (remembered per op, device, dtype and
memory format, since what a backend can do is fixed in a process).  When
nothing serves, one message lists every backend with its reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import os
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

NAMES = ("reference", "cpu", "triton", "cuda")
PRIORITY = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

Refuses = Callable[[Tensor], Optional[str]]


class BackendError(RuntimeError):
    """No backend (or not the forced one) can serve these inputs."""


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One backend's implementation of one op."""
    op: str
    backend: str
    fn: Callable
    refuses: Refuses  # None when it serves this tensor, else why not
    #: the memory formats it takes as they are (an op gives it a contiguous copy of anything
    #: else); None: any strides at all (the PyTorch kernels)
    layouts: Optional[tuple] = None


_DOCS: dict[str, str] = {}  # op -> what it computes
_KERNELS: dict[str, dict[str, Kernel]] = {}  # op -> backend -> kernel
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("expcuda_backend", default=None)
_forced_ops: contextvars.ContextVar[tuple] = contextvars.ContextVar("expcuda_backend_ops", default=())
_automatic: dict = {}  # (op, device, dtype, channels_last) -> Kernel


def declare(op: str, doc: str) -> str:
    """Declare ``op`` (a kernel entry point with the same signature in every backend)."""
    _DOCS[op] = doc
    _KERNELS.setdefault(op, {})
    return op


def ops() -> tuple[str, ...]:
    return tuple(_DOCS)


def _serves_anything(t: Tensor) -> Optional[str]:
    return None


def register(op: str, backend: str, fn: Callable, refuses: Refuses = _serves_anything,
             layouts: Optional[tuple] = None) -> None:
    """Register ``backend``'s kernel ``fn`` for the declared ``op``."""
    if op not in _DOCS:
        raise KeyError(f"op {op!r} is not declared; declared ops: {', '.join(_DOCS)}")
    _KERNELS[op][_check_name(backend)] = Kernel(op, backend, fn, refuses, layouts)
    _automatic.clear()


def register_all(backend: str, module, names, refuses: Refuses = _serves_anything,
                 layouts: Optional[tuple] = None) -> None:
    """Register each function of ``module`` named like a declared op in ``names``."""
    for name in names:
        fn = getattr(module, name, None)
        if fn is not None:
            register(name, backend, fn, refuses, layouts)


def kernel(op: str, backend: str) -> Optional[Kernel]:
    """``backend``'s registered kernel for ``op`` (loading the backend first), or None."""
    availability(backend)
    return _KERNELS[op].get(backend)


@contextlib.contextmanager
def replaced(op: str, backend: str, fn: Callable) -> Iterator[None]:
    """``backend``'s kernel for ``op`` replaced by ``fn`` inside the block (tests break kernels)."""
    availability(backend)
    old = _KERNELS[op][backend]
    _KERNELS[op][backend] = dataclasses.replace(old, fn=fn)
    _automatic.clear()
    try:
        yield
    finally:
        _KERNELS[op][backend] = old
        _automatic.clear()


def _check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(NAMES)}; got {name!r}")
    return name


# --------------------------------------------------------------------------- backends

@functools.cache
def load(name: str):
    """The backend module ``expcuda._backends.<name>``; importing it registers its kernels."""
    return importlib.import_module(f"expcuda._backends.{_check_name(name)}")


@functools.cache
def availability(name: str) -> Optional[str]:
    """None when the backend can run at all in this process, else why not (asked once)."""
    try:
        module = load(name)
    except ImportError as exc:  # e.g. a broken Triton install
        return f"its module failed to import: {exc}"
    return module.unavailable()


def _kernel(op: str, backend: str) -> tuple[Optional[Kernel], Optional[str]]:
    reason = availability(backend)
    if reason is not None:
        return None, reason
    kernel = _KERNELS[op].get(backend)
    if kernel is None:
        return None, f"has no kernel for {op}"
    return kernel, None


def why_not(op: str, backend: str, t: Tensor) -> Optional[str]:
    """None when ``backend`` serves ``op`` for ``t``, else why not."""
    kernel, reason = _kernel(op, backend)
    return reason if kernel is None else kernel.refuses(t)


# --------------------------------------------------------------------------- forcing

@contextlib.contextmanager
def use_backend(name: str, ops: Optional[tuple[str, ...]] = None) -> Iterator[None]:
    """Force ``name`` for every op (or only ``ops``) inside the ``with`` block."""
    _check_name(name)
    if ops is None:
        token = _forced.set(name)
        try:
            yield
        finally:
            _forced.reset(token)
        return
    token = _forced_ops.set(tuple((op, name) for op in ops) + _forced_ops.get())
    try:
        yield
    finally:
        _forced_ops.reset(token)


def forced_backend() -> Optional[str]:
    """The backend forced for every op: ``use_backend`` first, then ``EXPCUDA_BACKEND``."""
    name = _forced.get()
    if name is None:
        env = os.environ.get("EXPCUDA_BACKEND", "").strip()
        if env:
            name = _check_name(env)
    return name


def forced_for(op: str) -> Optional[str]:
    for forced_op, name in _forced_ops.get():
        if forced_op == op:
            return name
    return forced_backend()


# --------------------------------------------------------------------------- the dispatcher

def _where(t: Tensor) -> str:
    fmt = ", channels_last" if _is_channels_last(t) else ""
    return f"{t.dtype} tensors on {t.device}{fmt}"


def _is_channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def dispatch(op: str, t: Tensor) -> Kernel:
    """The kernel that runs ``op`` for inputs like ``t`` (its first tensor argument)."""
    name = forced_for(op)
    if name is not None:
        reason = why_not(op, name, t)
        if reason is not None:
            raise BackendError(f"backend {name!r} was forced but cannot serve {op} for {_where(t)}: {reason}")
        return _KERNELS[op][name]
    key = (op, t.device, t.dtype, _is_channels_last(t))
    kernel = _automatic.get(key)
    if kernel is None:
        kernel = _automatic[key] = _automatic_choice(op, t)
    return kernel


def _automatic_choice(op: str, t: Tensor) -> Kernel:
    reasons = []
    for name in PRIORITY.get(t.device.type, ("reference",)):
        reason = why_not(op, name, t)
        if reason is None:
            return _KERNELS[op][name]
        reasons.append(f"  {name}: {reason}")
    raise BackendError(f"no expcuda backend serves {op} for {_where(t)}:\n" + "\n".join(reasons))


def run(op: str, t: Tensor, *args):
    """dispatch(op, t) and call its kernel with (t, *args)."""
    return dispatch(op, t).fn(t, *args)


# --------------------------------------------------------------------------- reports

def report() -> dict[str, Optional[str]]:
    """Each backend's name mapped to None (available) or the reason it is not."""
    return {name: availability(name) for name in NAMES}


def op_report(t: Tensor) -> dict[str, dict[str, Optional[str]]]:
    """Per declared op, each backend mapped to None (serves tensors like ``t``) or why not."""
    for name in NAMES:
        availability(name)  # load every backend, so that its kernels are registered
    return {op: {name: why_not(op, name, t) for name in NAMES} for op in _DOCS}
