"""The lines the training loop logs: how it trains (processes, device, arithmetic, on-demand
reading), running losses for a progress bar, one line per epoch where no bar is shown."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dpq.devices import describe_device
from dpq.training.ddp import DistributedContext


def setup_lines(
    batch_size: int,
    device: torch.device,
    precision: str,
    scaled: bool,
    dist: DistributedContext | None = None,
    streamed: tuple[int, int] | None = None,
) -> list[str]:
    """What a run says before its first epoch: the processes of a multi-process run, the
    device and arithmetic (unless fp32 on the CPU), ``streamed`` = (images, worker
    processes) when images are read on demand."""
    lines = []
    if dist is not None:
        lines.append(
            f"DistributedDataParallel: {dist.world_size} processes ({dist.backend}), "
            f"global batch {batch_size} = {batch_size // dist.world_size} per process"
        )
    if precision != "fp32" or device.type != "cpu":
        arithmetic = "float32" if precision == "fp32" else f"{precision} autocast"
        scaler = " with a gradient scaler" if scaled else ""
        lines.append(f"training on {describe_device(device)} in {arithmetic}{scaler}")
    if streamed is not None:
        lines.append(
            f"reading {streamed[0]:,} training images on demand with {streamed[1]} worker "
            "process(es)"
        )
    return lines


def backbone_weights_line(path: str, loaded: Mapping[str, int]) -> str:
    """After pretrained backbone weights were loaded (``loaded``: tensor counts)."""
    ignored = loaded["ignored"]
    left_out = f" ({ignored} classifier tensors left out)" if ignored else ""
    return f"backbone weights from {path}: {loaded['loaded']} tensors{left_out}"


def running_losses(sums: Mapping[str, float], steps: int, shown: Sequence[tuple[str, str]]) -> str:
    """Running means of the loss parts ``shown`` ((part, label) pairs) over ``steps`` steps."""
    return ", ".join(f"{label} {sums[key] / steps:.3g}" for key, label in shown if key in sums)


def epoch_line(record: Mapping[str, Any], epochs: int, shown: Sequence[tuple[str, str]]) -> str:
    """The one line per epoch printed where no progress bar is shown (a pipe, a file)."""
    losses = running_losses(record, 1, shown)
    accuracy = record.get("train_accuracy")
    extra = f", train accuracy {accuracy:.3f}" if accuracy is not None else ""
    return (
        f"epoch {record['epoch']}/{epochs} ({record['phase']}): {losses}{extra}; "
        f"{record['seconds']:.1f} s"
    )
