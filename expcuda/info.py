"""``python -m expcuda.info``: versions, and which backends can run here (and why not)."""

from __future__ import annotations

import platform

import torch

from expcuda import backends


def lines() -> list[str]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    out = [
        f"python   {platform.python_version()}",
        f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'}; "
        f"GPU visible: {torch.cuda.is_available()}; CPU threads: {torch.get_num_threads()})",
        f"triton   {triton_version}",
        "backends:",
    ]
    for name, reason in backends.report().items():
        out.append(f"  {name:<9} {'available' if reason is None else 'unavailable: ' + reason}")
    forced = backends.forced_backend()
    out.append(f"forced   {forced or 'no (automatic choice)'}")
    return out


def main() -> None:
    print("\n".join(lines()))


if __name__ == "__main__":
    main()
