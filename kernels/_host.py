"""Host-side integer helpers for the launchers, in plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects in Triton 3.6:
called from host code each costs ~20-27 us of Python (measured on the 2-core CPU machine,
2026-12-01), more than a whole eager torch op. The launchers call these instead.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``b > 0``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1
