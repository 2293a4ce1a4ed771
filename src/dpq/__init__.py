"""dpq: Deep Progressive Quantization (Gao et al., IJCAI 2019) for image retrieval.

One network whose last layers are L progressive quantization blocks of K codewords: the
first l codes of an item are a valid (l * log2 K)-bit code, so one model gives 8, 16, 24 and
32-bit codes at once. Search uses Asymmetric Quantization Distance with lookup tables.

The names a user needs are here::

    import dpq
    source = dpq.load_source("digits")                  # any labelled collection
    index = dpq.DPQIndex(codebooks)                     # numpy + numba + faiss, no torch
    model = dpq.DPQModel.from_checkpoint("runs/my-model/model")
    index = dpq.build_index(model, images, labels=labels)
    distances, ids = index.search(queries, k=10, num_levels=2)   # 16 bits
    dpq.map_at_r(ids, query_labels, database_labels)

Importing ``dpq`` imports neither torch nor faiss: each name is loaded on first use, so
``dpq.DPQIndex`` and ``dpq.map_at_r`` work with numpy (and faiss) alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "DPQConfig": "dpq.config",
    "DPQIndex": "dpq.index",
    "DPQModel": "dpq.model.network",
    "Source": "dpq.data",
    "build_index": "dpq.encode.build",
    "evaluate_retrieval": "dpq.evaluate.retrieval",
    "load_recipe": "dpq.recipes",
    "load_source": "dpq.data",
    "map_at_r": "dpq.evaluate.metrics",
    "train": "dpq.training.loop",
}

if TYPE_CHECKING:  # pragma: no cover
    from dpq.config import DPQConfig
    from dpq.data import Source, load_source
    from dpq.encode.build import build_index
    from dpq.evaluate.metrics import map_at_r
    from dpq.evaluate.retrieval import evaluate_retrieval
    from dpq.index import DPQIndex
    from dpq.model.network import DPQModel
    from dpq.recipes import load_recipe
    from dpq.training.loop import train_model as train

__all__ = [  # noqa: F822 - the names are loaded lazily by __getattr__
    "DPQConfig",
    "DPQIndex",
    "DPQModel",
    "Source",
    "build_index",
    "evaluate_retrieval",
    "load_recipe",
    "load_source",
    "map_at_r",
    "train",
]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'dpq' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = getattr(module, "train_model" if name == "train" else name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
