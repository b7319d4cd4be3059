"""Type checks for numbers that come from callers or from stored, untrusted state.

One definition for the validators of ``fedquant.accounting``, ``fedquant.dpquant`` and
``fedquant.node_state``: a number is real or integral by the ``numbers`` ABCs (so numpy
scalars pass), never a ``bool`` (``True`` is an ``int`` to Python, not a noise multiplier
or a step count to us), and finite where a float is needed.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["is_finite", "is_int", "is_real"]


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number (int, float, numpy scalar) and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer (int, numpy integer) and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def is_finite(value: object) -> bool:
    """Whether ``value`` is a real number (not a bool) that converts to a finite float.

    An int beyond float range (``10**400``) is not: ``float()`` overflows on it.
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool | np.bool_):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False
