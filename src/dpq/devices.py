"""Which device and which arithmetic a run uses, decided on the machine that runs it.

A recipe says ``precision="auto"``; what that means depends on the hardware, so it is
resolved here when training (or encoding) starts, never when a config is built. The same
holds for the device: ``--device auto`` (:func:`resolve_device`) is CUDA where a GPU is
usable, else the CPU; a device is never stored in a config or a checkpoint, so a model
trained on a GPU encodes on a CPU.

- :func:`resolve_device`: "auto", "cpu", "cuda", "cuda:N", "mps" -> ``torch.device``, with a
  one-sentence ``ValueError`` where the machine has no such device.
- :func:`resolve_precision`, :func:`autocast`, :func:`full_precision`: the arithmetic.
- :func:`gradient_scaler`: the loss scaler that float16 training needs (a no-op otherwise).
- :func:`available_cores`, :func:`default_workers`: CPU cores and data-loading processes.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by ``OMP_NUM_THREADS``
    when that is set (e.g. to keep a test or a second job on one core)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        cores = max(1, os.cpu_count() or 1)
    limit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if limit.isdigit() and int(limit) > 0:
        cores = min(cores, int(limit))
    return cores


def default_workers() -> int:
    """Data-loading processes when none are asked for: one per available core, at most 8
    (decoding and resizing a 224 px JPEG costs a few milliseconds of one core)."""
    return min(8, available_cores())


def _cuda_missing_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device named by ``spec``: "auto" (CUDA where a GPU is usable, else the CPU),
    "cpu", "cuda" (the current GPU), "cuda:N" or "mps" (Apple GPUs).

    Raises:
        ValueError: an unknown name, or a device this machine does not have (the message
            says what it has and what to pass instead).
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = "auto" if spec is None else str(spec).strip().lower()
    match = _DEVICE_PATTERN.match(text)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ValueError(f"--device must be {DEVICE_CHOICES}; got {spec!r}.")
    kind, number = match.group(1), match.group(2)
    if kind == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise ValueError(
                "--device mps: this machine has no usable Apple GPU (MPS); use --device cpu "
                "or --device auto."
            )
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {text}: {_cuda_missing_reason()}, so there is no CUDA device here; use "
            "--device cpu (or auto, which picks a GPU only where there is one), or install a "
            "CUDA build of torch on a machine with an NVIDIA GPU."
        )
    if number is None:
        return torch.device("cuda", torch.cuda.current_device())
    count = torch.cuda.device_count()
    if int(number) >= count:
        raise ValueError(
            f"--device {text}: this machine has {count} CUDA device(s), cuda:0 to "
            f"cuda:{count - 1}; pick one of them."
        )
    return torch.device("cuda", int(number))


def describe_device(device: torch.device | str) -> str:
    """A device for log lines: "cpu (2 cores)", "cuda:0 (NVIDIA H200)"."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({available_cores()} cores)"
    return str(device)


def pin_memory(device: torch.device | str) -> bool:
    """Whether host batches bound for ``device`` should sit in pinned memory (CUDA)."""
    return torch.device(device).type == "cuda"


# oneDNN instruction-set limits (ONEDNN_MAX_CPU_ISA) under which it has no bf16 dot products.
_ONEDNN_ISAS_WITHOUT_BF16 = {
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
}


def native_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16
    autocast trains a ResNet about twice as fast as float32; without it bf16 is emulated and
    far slower (20x in one measurement).

    The instruction-set limits of the process count too: with ``ONEDNN_MAX_CPU_ISA`` at an
    ISA without bf16 (e.g. ``AVX2``) or ``ATEN_CPU_CAPABILITY`` below ``avx512``, the kernels
    run as on an AVX2-only CPU, and so does this answer (how docs/RESULTS.md stands in for
    such a machine)."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_ISAS_WITHOUT_BF16:
        return False
    if torch.backends.cpu.get_cpu_capability() in ("NO AVX", "AVX2", "DEFAULT"):
        return False
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
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
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


def gradient_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """The loss scaler of a resolved ``precision``: active for "fp16" (whose gradients
    underflow without it), a pass-through for "fp32" and "bf16"."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))
