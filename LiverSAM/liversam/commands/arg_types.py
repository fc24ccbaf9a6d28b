"""argparse types of numeric options: a value outside an option's range is a usage error (exit 2, the option and
what to give), found before the CT is read or the model loaded, never an internal error after the model has run."""

from __future__ import annotations

import argparse
import math


def finite(text: str) -> float:
    """Any finite number (e.g. a window level in HU)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}': give a finite number")
    return value


def _checked(value, text: str, ok: bool, rule: str):
    if not ok:
        raise argparse.ArgumentTypeError(f"{text}: {rule}")
    return value


def positive(text: str) -> float:
    """A finite number above 0 (a window width, a cache size, a time)."""
    value = finite(text)
    return _checked(value, text, value > 0, "give a value above 0")


def non_negative(text: str) -> float:
    """A finite number of 0 or more (a radius, an area, a weight); 0 usually means "off"."""
    value = finite(text)
    return _checked(value, text, value >= 0, "give a value of 0 or more (0 turns it off)")


def probability(text: str) -> float:
    """A chance, from 0 to 1."""
    value = finite(text)
    return _checked(value, text, 0 <= value <= 1, "give a probability from 0 to 1")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None


def positive_int(text: str) -> int:
    """A whole number of 1 or more (a count of slices, epochs, sessions)."""
    value = _integer(text)
    return _checked(value, text, value >= 1, "give a whole number of 1 or more")


def non_negative_int(text: str) -> int:
    """A whole number of 0 or more (0 usually means "the default" or "none")."""
    value = _integer(text)
    return _checked(value, text, value >= 0, "give a whole number of 0 or more")


def port(text: str) -> int:
    """A TCP port, 0 (a free one) to 65535."""
    value = _integer(text)
    return _checked(value, text, 0 <= value <= 65535, "give a port from 1 to 65535, or 0 for a free one")
