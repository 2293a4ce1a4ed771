"""The trained network's encoder outside eager PyTorch: what a model computes from raw inputs
to searched features, written as ONNX (:mod:`.export`: the graph and a JSON record that
detects a stale file), and run by an inference engine (:mod:`.engines`: eager torch, ONNX
Runtime or OpenVINO behind one :class:`~dpq.inference.engines.FeatureEngine` seam).

ONNX Runtime and OpenVINO are optional (``pip install 'dpq[inference]'``); without them only
the "torch" engine runs.
"""

from dpq.inference.engines import ENGINES, FeatureEngine, open_engine
from dpq.inference.export import ExportRecord, check_export, export_onnx, read_export

__all__ = [
    "ENGINES",
    "ExportRecord",
    "FeatureEngine",
    "check_export",
    "export_onnx",
    "open_engine",
    "read_export",
]
