"""Custom ops with a fast eager path, shared by the quantizers and the block epilogue.

Each op is a ``torch.library`` custom op (schema, fake kernel, registered
autograd) so that ``torch.compile`` and ``opcheck`` see it.  In eager mode the
custom-op wrapper costs about 0.1 ms a call in Python, as much as a kernel on
a small tensor, so eager calls run the op's own body and its registered
autograd formula under one ``torch.autograd.Function`` instead; the two paths
compute the same thing (tested bit for bit).
"""

from __future__ import annotations

import torch

_EAGER: dict = {}  # custom op -> (python body, setup_context, backward)


def define(qualname: str, body):
    """Register ``body`` as the custom op ``qualname``; keep the body for eager calls."""
    op = torch.library.custom_op(qualname, body, mutates_args=())
    _EAGER[op] = (body, None, None)
    return op


def autograd(op, backward, setup) -> None:
    """register_autograd, and the same formula for the eager autograd.Function below."""
    op.register_autograd(backward, setup_context=setup)
    _EAGER[op] = (_EAGER[op][0], setup, backward)


def call(ctx, op, *args):
    """Run a backward custom op: its body directly under the eager Function, else the op.

    The body and the op are one function; eager mode skips the custom-op
    wrapper, while tracing (torch.compile, opcheck) needs the op itself.
    """
    if getattr(ctx, "eager", False):
        return _EAGER[op][0](*args)
    return op(*args)


class _Eager(torch.autograd.Function):
    """The registered autograd formula of a custom op, run as a plain autograd.Function."""

    @staticmethod
    def forward(ctx, op, *args):
        body, setup, _ = _EAGER[op]
        out = body(*args)
        setup(ctx, args, out)
        ctx.op, ctx.eager = op, True
        if isinstance(out, tuple):
            ctx.mark_non_differentiable(*(t for t in out if not t.is_floating_point()))
        return out

    @staticmethod
    def backward(ctx, *grads):
        grads = _EAGER[ctx.op][2](ctx, *grads)
        return (None,) + (tuple(grads) if isinstance(grads, tuple) else (grads,))


def apply(op, *args):
    """Forward with autograd: the custom op while compiling, the autograd.Function otherwise."""
    if torch.compiler.is_compiling():
        return op(*args)
    return _Eager.apply(op, *args)
