"""Which device and which arithmetic a run uses, decided on the machine that runs it.

A recipe says ``precision="auto"``; what that means depends on the hardware, so it is
resolved here when training (or encoding) starts, never when a config is built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def native_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16
    autocast trains a ResNet about twice as fast as float32; without it bf16 is emulated and
    far slower (20x in one measurement)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """The arithmetic a run on ``device`` uses for ``precision``: "fp32", "bf16" or "fp16".

    "auto": bf16 on a CUDA GPU that supports it and on a CPU with native bf16; fp16 on a
    CUDA GPU without bf16; fp32 elsewhere. Any other value is returned as it is (checked).
    """
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16; got {precision!r}.")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if native_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved ``precision`` ("fp32" disables autocast)."""
    device = torch.device(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def full_precision(device: torch.device | str) -> Iterator[None]:
    """A block computed in float32 even inside an autocast region (the quantizer, losses)."""
    with torch.autocast(torch.device(device).type, enabled=False):
        yield
