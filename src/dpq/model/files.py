"""How a model lives on disk: a checkpoint directory with ``model.safetensors`` (the
weights) and ``config.json`` (the :class:`~dpq.config.DPQConfig`, plus a ``checkpoint``
record holding the format, version and the weights' SHA-256).

:func:`save_model` writes the weights first and the config last, each atomically, so a
half-written pair is detected when it is read. :func:`load_weights` loads a checkpoint into a
model it is given (the caller builds the model from :func:`read_checkpoint_config`), so this
module knows no network class and the network imports it, not the other way round.
Nothing is unpickled: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpq.atomic import write_bytes_atomic, write_json_atomic
from dpq.config import DPQConfig, config_differences

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINT_FORMAT = "dpq-model"
CHECKPOINT_VERSION = 1


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's content (read in 1 MiB blocks)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Save a flat dict of tensors as safetensors (moved to the CPU), atomically."""
    from safetensors.torch import save

    write_bytes_atomic(
        path, save({name: t.detach().cpu().contiguous() for name, t in tensors.items()})
    )


def architecture(config: DPQConfig) -> dict[str, Any]:
    """The config sections that decide the weights' shapes and meaning (model, quantizer,
    method)."""
    data = config.to_dict()
    return {"model": data["model"], "quantizer": data["quantizer"], "method": data["method"]}


def save_model(
    model: nn.Module,
    path: str | Path,
    config: DPQConfig | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` and then ``config.json`` into the directory ``path``.

    Args:
        model: the model whose weights are saved.
        path: directory (created if missing).
        config: the config recorded with the weights (default ``model.config``); a trainer
            passes its own, so the checkpoint also says how the model was trained. Its
            model, quantizer and method sections must be the model's.
        extra: JSON-ready bookkeeping stored under ``config.json["checkpoint"]``.
    """
    config = model.config if config is None else config
    if architecture(config) != architecture(model.config):
        raise ValueError("the config saved with a model must have the model's architecture.")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_tensors(path / WEIGHTS_FILE, dict(model.state_dict()))
    record = config.to_dict()
    record["checkpoint"] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "weights_sha256": file_sha256(path / WEIGHTS_FILE),
        **(extra or {}),
    }
    write_json_atomic(path / CONFIG_FILE, record, sort_keys=True)
    return path


def read_checkpoint_config(path: str | Path) -> tuple[DPQConfig, dict[str, Any]]:
    """(config, checkpoint record) of a model checkpoint directory, checked for format."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist.")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path} is not a DPQ checkpoint: {name} is missing (expected "
                f"{WEIGHTS_FILE} and {CONFIG_FILE})."
            )
    try:
        record = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path / CONFIG_FILE} is not valid JSON: {exc}.") from None
    if not isinstance(record, dict) or not isinstance(record.get("checkpoint"), dict):
        raise ValueError(f"{path / CONFIG_FILE} has no 'checkpoint' record; not a DPQ model.")
    meta = record.pop("checkpoint")
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} holds format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this dpq reads {CHECKPOINT_FORMAT!r} version {CHECKPOINT_VERSION}."
        )
    return DPQConfig.from_dict(record), meta


def check_architecture(path: str | Path, saved: DPQConfig, expected: DPQConfig) -> None:
    """ValueError listing the differences when ``expected``'s model, quantizer and method
    sections are not ``saved``'s (the checkpoint at ``path``)."""
    diffs = config_differences(architecture(saved), architecture(expected))
    if diffs:
        raise ValueError(
            f"checkpoint {path} does not match the requested model (checkpoint vs "
            "requested): "
            + "; ".join(diffs)
            + ". Load it without a config, or request the checkpoint's settings."
        )


def load_weights(model: nn.Module, path: str | Path, meta: Mapping[str, Any]) -> nn.Module:
    """Load the weights of the checkpoint directory ``path`` into ``model`` (built from the
    checkpoint's config, :func:`read_checkpoint_config`, whose record ``meta`` is), after
    checking them against the recorded SHA-256.

    Raises:
        ValueError: a corrupted or half-written weights file, or weights that do not fit.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if file_sha256(path / WEIGHTS_FILE) != meta.get("weights_sha256"):
        raise ValueError(
            f"{path / WEIGHTS_FILE} does not match the checksum in {CONFIG_FILE}; the "
            f"checkpoint is corrupted or was half-written. Use an earlier checkpoint."
        )
    try:
        state = load_file(str(path / WEIGHTS_FILE), device="cpu")
    except SafetensorError as exc:
        raise ValueError(
            f"{path / WEIGHTS_FILE} is not a readable safetensors file: {exc}"
        ) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights in {path} do not fit the model of its config: {exc}") from None
    return model
