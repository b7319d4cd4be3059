"""Which backend runs the quantize and pack loops: numba kernels, or numpy."""

from __future__ import annotations

from types import ModuleType


def load_kernels() -> ModuleType | None:
    """``fedquant._kernels``, or None without numba (then numpy does the same work)."""
    try:
        from fedquant import _kernels
    except ImportError:
        return None
    return _kernels
