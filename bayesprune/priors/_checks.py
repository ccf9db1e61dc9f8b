"""Validation of prior options (private): one message shape for every prior's constructor."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_positive", "check_probability"]


def check_positive(owner: str, name: str, value: Any) -> None:
    """Refuse anything but a positive finite number (a bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{owner} {name} must be a positive finite number, got {value!r}")


def check_probability(owner: str, name: str, value: Any) -> None:
    """Refuse anything but a probability in the open interval (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{owner} {name} must be a probability in (0, 1), got {value!r}")
