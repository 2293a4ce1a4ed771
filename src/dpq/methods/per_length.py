"""What a method trained once per code length shares (the paper's competitors): its code
length (``config.method.bits``, a multiple of 8), its own options (``config.method.options``:
names, paper defaults and ranges, read and checked in one place so every method refuses a
misspelt or out-of-range setting with the same one-sentence ``ValueError``), the learning-rate
multiplier every such method knows, and the one code length it gives
(:class:`PerLengthMethod`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dpq.config import DPQConfig
from dpq.methods.base import RetrievalMethod

LR_SCALE = "lr_scale"
"""The option every trained-per-length method knows: its network learns at
``train.lr * lr_scale`` (what a tuning step varies beside the method's main loss weight)."""


@dataclass(frozen=True)
class Option:
    """One setting of a method.

    Attributes:
        default: the paper's (or its authors' code's) value.
        minimum: the smallest value accepted.
        strict: the value must be above ``minimum`` (not equal to it).
        integer: the value must be a whole number (read as int).
    """

    default: float
    minimum: float = 0.0
    strict: bool = False
    integer: bool = False


def read_options(
    method: str, given: Mapping[str, Any], known: Mapping[str, Option]
) -> dict[str, float]:
    """The method's settings: ``given`` over the defaults of ``known``, each checked.

    Args:
        method: the method's name, for the messages.
        given: ``config.method.options``.
        known: option name -> :class:`Option`.

    Returns:
        name -> value for every known option (float, or int for integer options).

    Raises:
        ValueError: an unknown name, a value that is not a number, not whole where it must
            be, or below its minimum.
    """
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(
            f"method.options {unknown} are not settings of the {method} method; it knows "
            f"{sorted(known)}."
        )
    values: dict[str, float] = {}
    for name, option in known.items():
        value = given.get(name, option.default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(
                f"method.options {name} must be a number for the {method} method; got {value!r}."
            )
        if option.integer:
            if value != int(value):
                raise ValueError(
                    f"method.options {name} must be a whole number for the {method} method; "
                    f"got {value!r}."
                )
            value = int(value)
        too_small = value <= option.minimum if option.strict else value < option.minimum
        if too_small:
            bound = ">" if option.strict else ">="
            raise ValueError(
                f"method.options {name} must be {bound} {option.minimum:g} for the {method} "
                f"method; got {value!r}."
            )
        values[name] = value if option.integer else float(value)
    return values


def check_code_bits(method: str, bits: int | None) -> int:
    """``bits`` when it is a positive multiple of 8, else ValueError naming the fix."""
    if bits is None or bits % 8:
        raise ValueError(
            f"the {method} method needs method.bits, a multiple of 8 (e.g. 32); got {bits}."
        )
    return bits


def check_requested_bits(method: str, trained: int, bits: int | None) -> None:
    """ValueError unless ``bits`` is None or the ``trained`` code length of a model of a
    method that trains one model per length."""
    if bits is not None and bits != trained:
        raise ValueError(
            f"this {method} model gives {trained}-bit codes only; got bits={bits} (train one "
            "model per code length)."
        )


class PerLengthMethod(RetrievalMethod):
    """A method trained once per code length: ``method.bits`` (a multiple of 8) is checked
    into ``self.bits`` and its options, ``lr_scale`` and those of :meth:`option_table`, into
    ``self.options``.

    Args:
        config: the full configuration.
    """

    def __init__(self, config: DPQConfig) -> None:
        super().__init__(config)
        self.bits = check_code_bits(self.name, config.method.bits)
        known = {LR_SCALE: Option(1.0, strict=True), **self.option_table()}
        self.options = read_options(self.name, config.method.options, known)

    def option_table(self) -> dict[str, Option]:
        """The method's own settings (name -> :class:`Option`), with its paper's defaults."""
        return {}

    def network_lr_scale(self) -> float:
        """``lr_scale``: the network learns at ``train.lr * lr_scale``."""
        return self.options[LR_SCALE]

    def code_lengths(self) -> tuple[int, ...]:
        """(bits,): one model, one code length."""
        return (self.bits,)
