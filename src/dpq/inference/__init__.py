"""The trained network's encoder outside eager PyTorch: what a model computes from raw inputs
to searched features, written as ONNX (:mod:`.export`: the graph and a JSON record that
detects a stale file), and run by an inference engine (:mod:`.engines`: eager torch, ONNX
Runtime or OpenVINO behind one :class:`~dpq.inference.engines.FeatureEngine` seam).

ONNX Runtime and OpenVINO are optional (``pip install 'dpq[inference]'``); without them only
the "torch" engine runs. The engine names (:mod:`.names`) import without torch; the rest is
imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from dpq.inference.names import ENGINES, INSTALL_HINT, check_engine

_LAZY = {
    "FeatureEngine": "dpq.inference.engines",
    "engine_for": "dpq.inference.engines",
    "open_engine": "dpq.inference.engines",
    "ExportRecord": "dpq.inference.export",
    "check_export": "dpq.inference.export",
    "export_onnx": "dpq.inference.export",
    "read_export": "dpq.inference.export",
}

__all__ = ["ENGINES", "INSTALL_HINT", "check_engine", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    """The torch-dependent names, imported when first asked for (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'dpq.inference' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
