"""Checking one setting of a config section: each function raises ``ValueError`` with one
sentence naming the field (``<owner>.<name>``), what it accepts and what it was given, and
returns nothing when the value is fine. The schema that uses them is :mod:`dpq.config`."""

from __future__ import annotations

import math
from collections.abc import Mapping


def check_choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(
            f"{owner}.{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}."
        )


def check_int(
    owner: str, name: str, value: object, minimum: int, maximum: int | None = None
) -> None:
    """``value`` must be an int (not a bool) >= ``minimum`` (and <= ``maximum`` if given)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ValueError(f"{owner}.{name} must be an integer {bound}; got {value!r}.")


def check_float(
    owner: str,
    name: str,
    value: object,
    minimum: float = 0.0,
    maximum: float = math.inf,
    strict_minimum: bool = False,
    strict_maximum: bool = False,
) -> None:
    """``value`` must be a finite int or float (not a bool) within the bounds; a strict bound
    excludes the bound itself."""
    number = (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    )
    ok = (
        number is not None
        and math.isfinite(number)
        and (number > minimum if strict_minimum else number >= minimum)
        and (number < maximum if strict_maximum else number <= maximum)
    )
    if not ok:
        bound = f"> {minimum}" if strict_minimum else f">= {minimum}"
        if maximum != math.inf:
            bound += f" and < {maximum}" if strict_maximum else f" and <= {maximum}"
        raise ValueError(f"{owner}.{name} must be a finite number {bound}; got {value!r}.")


def check_bool(owner: str, name: str, value: object) -> None:
    """``value`` must be True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be true or false; got {value!r}.")


def check_text(owner: str, name: str, value: object, what: str = "a non-empty name") -> None:
    """``value`` must be a non-empty string (``what`` it is, for the message)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{owner}.{name} must be {what}; got {value!r}.")


def check_mapping(owner: str, name: str, value: object, of_what: str) -> None:
    """``value`` must be a mapping (of ``of_what``, for the message)."""
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{owner}.{name} must be a mapping of {of_what}; got {type(value).__name__}."
        )


def checked_numbers(
    owner: str,
    name: str,
    value: object,
    what: str,
    length: int | None = None,
    minimum: float = 0.0,
    maximum: float = math.inf,
    strict_minimum: bool = False,
) -> tuple[float, ...]:
    """``value`` must be a non-empty list or tuple (of ``length`` items when given; ``what``
    says so in the message) of numbers within the bounds of :func:`check_float`; returns
    them as a tuple of floats."""
    if not isinstance(value, list | tuple) or not value or length not in (None, len(value)):
        raise ValueError(f"{owner}.{name} must be {what}; got {value!r}.")
    for number in value:
        check_float(owner, name, number, minimum, maximum, strict_minimum)
    return tuple(float(number) for number in value)
