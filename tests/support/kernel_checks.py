"""Assertions shared by the kernel test modules."""
from __future__ import annotations

import pytest


def assert_raises_naming(fn, names, exc=(ValueError, TypeError)):
    """``fn()`` raises ``exc`` and the message names one of ``names`` (the bad argument)."""
    if isinstance(names, str):
        names = (names,)
    with pytest.raises(exc) as ei:
        fn()
    msg = str(ei.value)
    assert any(n in msg for n in names), f"message {msg!r} names none of {names}"
    return ei.value
