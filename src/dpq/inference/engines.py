"""Who runs the network: one seam, :class:`FeatureEngine`, between the code that needs
searched features (encoding, image queries, benchmarks) and the runtime that computes them.

- "torch": the model itself in eager PyTorch
  (:meth:`~dpq.model.retrieval_network.RetrievalNetwork.iter_searched_features`), today's path;
- "onnxruntime": the exported encoder (:mod:`dpq.inference.export`) in an ONNX Runtime
  CPU session;
- "openvino": the same graph compiled by OpenVINO for the CPU.

Every engine maps raw inputs (uint8 (N, H, W, 3) images, or float32 (N, F) rows for the
identity backbone) to float32 (N, D) searched features, ``batch_size`` items per pass, on
``threads`` threads, and streams an on-demand image reader through DataLoader workers as
the torch path does. :func:`open_engine` builds one for a checkpoint directory; without an
ONNX file it exports the encoder once into ``MODEL_DIR/engine-cache/`` and re-exports when
the checkpoint changes.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

import numpy as np

from dpq.inference.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    ExportRecord,
    check_export,
    export_onnx,
)
from dpq.inference.names import INSTALL_HINT, check_engine, check_precision
from dpq.progress import progress_bar

EXPORT_PRECISION = {"fp32": "fp32", "bf16": "fp32", "fp16": "fp32", "int8": "int8"}
"""The precision of the ONNX export an engine precision reads: only int8 has its own file."""
CACHE_FOLDER = "engine-cache"
"""Folder inside a checkpoint directory where :func:`open_engine` keeps its exports."""
DEFAULT_BATCH_SIZE = 256


@runtime_checkable
class FeatureEngine(Protocol):
    """Raw inputs -> searched features, whoever computes them.

    Attributes:
        name: "torch", "onnxruntime" or "openvino".
        input_kind: "images" (uint8 (N, H, W, 3)) or "features" (float32 (N, F)).
        feature_dim: D, the width of the features.
        batch_size: items per forward pass.
    """

    name: str
    input_kind: str
    feature_dim: int
    batch_size: int

    def features(self, inputs: Any, workers: int | None = 0, progress: bool = False) -> np.ndarray:
        """float32 (N, D) features of N raw inputs (an array or an on-demand reader, decoded
        by ``workers`` DataLoader processes; 0: this process)."""
        ...

    def iter_features(
        self, inputs: Any, workers: int | None = None, progress: bool = False
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(start, float32 (b, D)) for rows start..start+b, in order, ``batch_size`` at a
        time; an on-demand reader is decoded by ``workers`` DataLoader processes."""
        ...

    def close(self) -> None:
        """Release the runtime's resources."""
        ...


def import_runtime(engine: str) -> ModuleType:
    """The package of an ONNX engine ("onnxruntime", "openvino"); ValueError naming the extra
    to install when it does not import."""
    try:
        return importlib.import_module(engine)
    except ImportError:
        raise ValueError(
            f"the {engine} engine needs the {engine} package: {INSTALL_HINT}."
        ) from None


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return value


class TorchEngine:
    """The model in eager PyTorch (what ``extract_features`` runs).

    Args:
        network: a loaded :class:`~dpq.model.retrieval_network.RetrievalNetwork`.
        batch_size: items per forward pass.
        threads: torch's intra-op threads (``torch.set_num_threads``: for the whole process).
        precision: "fp32", "bf16" or "fp16" autocast.
        tta_flip: average with the mirrored image (default: the model's config).
    """

    name = "torch"

    def __init__(
        self,
        network: Any,
        batch_size: int = DEFAULT_BATCH_SIZE,
        threads: int | None = None,
        precision: str = "fp32",
        tta_flip: bool | None = None,
    ) -> None:
        self.network = network
        self.batch_size = _check_positive("batch_size", batch_size)
        self.precision = precision
        self.tta_flip = tta_flip
        if threads is not None:
            import torch

            torch.set_num_threads(_check_positive("threads", threads))

    @property
    def input_kind(self) -> str:
        return str(self.network.input_kind)

    @property
    def feature_dim(self) -> int:
        return int(self.network.feature_dim)

    def iter_features(
        self, inputs: Any, workers: int | None = None, progress: bool = False
    ) -> Iterator[tuple[int, np.ndarray]]:
        for start, features, _logits in self.network.iter_searched_features(
            inputs,
            batch_size=self.batch_size,
            tta_flip=self.tta_flip,
            precision=self.precision,
            workers=workers,
            progress=progress,
        ):
            yield start, features

    def features(self, inputs: Any, workers: int | None = 0, progress: bool = False) -> np.ndarray:
        return self.network.extract_features(
            inputs,
            batch_size=self.batch_size,
            tta_flip=self.tta_flip,
            precision=self.precision,
            progress=progress,
            workers=workers,
        )

    def close(self) -> None:
        return None


class GraphEngine(ABC):
    """An engine that runs an exported encoder graph (:mod:`dpq.inference.export`): the
    batching, the input checks and the reading of on-demand inputs; a subclass runs one
    batch (:meth:`run_batch`).

    Args:
        onnx_path: the exported graph.
        record: its :class:`~dpq.inference.export.ExportRecord`.
        batch_size: items per forward pass.
        threads: the runtime's threads for one pass.
        precision: one of the engine's :data:`PRECISIONS`, of which ``record`` is the export.
    """

    name = "graph"

    def __init__(
        self,
        onnx_path: Path,
        record: ExportRecord,
        batch_size: int,
        threads: int,
        precision: str = "fp32",
    ) -> None:
        check_precision(self.name, precision)
        if record.precision != EXPORT_PRECISION[precision]:
            raise ValueError(
                f"{onnx_path} holds the {record.precision} encoder, not the "
                f"{EXPORT_PRECISION[precision]} one that precision {precision} reads; run it "
                f"at precision {record.precision} (--engine-precision), or pass an export of "
                "that precision, or none to use the engine's cache."
            )
        self.onnx_path = Path(onnx_path)
        self.record = record
        self.batch_size = _check_positive("batch_size", batch_size)
        self.threads = _check_positive("threads", threads)
        self.precision = precision
        self._open()

    @property
    def input_kind(self) -> str:
        return self.record.input_kind

    @property
    def feature_dim(self) -> int:
        return self.record.feature_dim

    @abstractmethod
    def _open(self) -> None:
        """Load :attr:`onnx_path` into the runtime (called by ``__init__`` once the settings
        are checked and set)."""

    @abstractmethod
    def run_batch(self, batch: np.ndarray) -> np.ndarray:
        """float32 (b, D) features of one contiguous batch of the export's input dtype."""

    def _prepared(self, batch: np.ndarray) -> np.ndarray:
        dtype = np.uint8 if self.input_kind == "images" else np.float32
        return np.ascontiguousarray(batch, dtype=dtype)

    def iter_features(
        self, inputs: Any, workers: int | None = None, progress: bool = False
    ) -> Iterator[tuple[int, np.ndarray]]:
        from dpq.data.loading import BatchReader

        self.record.check_inputs(inputs)
        bar = progress_bar(len(inputs), "features", "img", enabled=progress, leave=False)
        try:
            with BatchReader(inputs, workers=workers) as reader:
                for start, batch in reader.sequential(self.batch_size):
                    features = self.run_batch(self._prepared(batch.numpy()))
                    bar.update(len(features))
                    yield start, features
        finally:
            bar.close()

    def features(self, inputs: Any, workers: int | None = 0, progress: bool = False) -> np.ndarray:
        self.record.check_inputs(inputs)
        out = np.empty((len(inputs), self.feature_dim), dtype=np.float32)
        for start, features in self.iter_features(inputs, workers, progress):
            out[start : start + len(features)] = features
        return out

    def close(self) -> None:
        return None


class OnnxRuntimeEngine(GraphEngine):
    """The exported encoder in an ONNX Runtime CPU session (all graph optimisations,
    ``threads`` intra-op threads, one inter-op thread)."""

    name = "onnxruntime"

    def _open(self) -> None:
        ort = import_runtime("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: no notes about unused initializers
        self.session = ort.InferenceSession(
            str(self.onnx_path), options, providers=["CPUExecutionProvider"]
        )

    def run_batch(self, batch: np.ndarray) -> np.ndarray:
        (features,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        return np.asarray(features, dtype=np.float32)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


class OpenVINOEngine(GraphEngine):
    """The exported encoder compiled by OpenVINO for the CPU: one stream (the latency hint)
    on ``threads`` threads, in ``precision``: "fp32" (no bf16 downcast, also on CPUs that
    have it: codes equal torch's), "bf16" (OpenVINO's bfloat16 inference of the float32
    export: 2.3-2.9x faster than torch fp32 on a CPU with native bf16, codes of some items
    differ) or "int8" (the int8 export, :mod:`dpq.inference.quantize`: its quantized
    convolutions and matrix products in int8, the rest in float32; ~1.4x bf16's speed on
    the same CPU, codes of more items differ; docs/RESULTS.md)."""

    name = "openvino"

    def _open(self) -> None:
        ov = import_runtime("openvino")
        core = ov.Core()
        if self.precision == "bf16" and not openvino_has_bf16(core):
            raise ValueError(
                "OpenVINO has no bf16 kernels on this CPU (its CPU plugin lists "
                f"{core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES')}; bf16 needs "
                "AVX512-BF16 or AMX); run precision fp32."
            )
        model = core.read_model(str(self.onnx_path))
        for op in model.get_ops():
            if op.get_type_name() == "Interpolate" and op.get_attributes().get("antialias"):
                raise ValueError(
                    f"{self.onnx_path} shrinks the images inside the graph with antialiasing, "
                    "which OpenVINO's CPU plugin computes differently from torch; decode the "
                    "images at the model's image size and export at that size, or use the "
                    "onnxruntime engine."
                )
        self.compiled = core.compile_model(
            model,
            "CPU",
            {
                "INFERENCE_NUM_THREADS": self.threads,
                "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16", "int8": "f32"}[
                    self.precision
                ],
                "PERFORMANCE_HINT": "LATENCY",
            },
        )
        self.request = self.compiled.create_infer_request()

    def run_batch(self, batch: np.ndarray) -> np.ndarray:
        self.request.infer({0: batch})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32, copy=True)

    def close(self) -> None:
        self.request = None
        self.compiled = None


def openvino_has_bf16(core: Any) -> bool:
    """Whether OpenVINO's CPU plugin (``core``: an ``openvino.Core``) runs bf16 natively."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


_GRAPH_ENGINES: dict[str, type[GraphEngine]] = {
    "onnxruntime": OnnxRuntimeEngine,
    "openvino": OpenVINOEngine,
}


def cached_export_path(
    model_dir: str | Path,
    image_size: int | tuple[int, int] | None,
    tta_flip: bool | None,
    precision: str = "fp32",
) -> Path:
    """Where :func:`open_engine` keeps the export of these settings: a file under
    ``MODEL_DIR/engine-cache/`` named after them (None: the model's own)."""
    if image_size is None:
        size = "model"
    elif isinstance(image_size, int):
        size = f"{image_size}x{image_size}"
    else:
        size = f"{image_size[0]}x{image_size[1]}"
    flip = "model" if tta_flip is None else ("on" if tta_flip else "off")
    suffix = "" if precision == "fp32" else f"-{precision}"
    return Path(model_dir) / CACHE_FOLDER / f"encoder-size-{size}-flip-{flip}{suffix}.onnx"


def cached_export(
    model_dir: str | Path,
    image_size: int | tuple[int, int] | None = None,
    tta_flip: bool | None = None,
) -> tuple[Path, ExportRecord]:
    """The export of ``model_dir`` for these settings from the cache, exported (again) when
    it is missing, stale or damaged; returns (ONNX path, record)."""
    path = cached_export_path(model_dir, image_size, tta_flip)
    try:
        return path, check_export(path, model_dir, image_size, tta_flip)
    except (FileNotFoundError, ValueError):
        pass
    try:
        return path, export_onnx(model_dir, path, image_size=image_size, tta_flip=tta_flip)
    except PermissionError as exc:
        raise _cache_error(path, exc) from None


def _cache_error(path: Path, exc: OSError) -> ValueError:
    return ValueError(
        f"cannot write the engine's export cache in {path.parent} ({exc.strerror}); "
        "export once with `dpq export --onnx MODEL_DIR OUT` and pass that file."
    )


def cached_int8_export(
    model_dir: str | Path,
    image_size: int | tuple[int, int] | None = None,
    tta_flip: bool | None = None,
    calibration: Any = None,
) -> tuple[Path, ExportRecord]:
    """The int8 export of ``model_dir`` from the cache, quantized (again) from the float32
    one when it is missing, stale (another model, or another quantization scheme than
    :data:`~dpq.inference.quantize.INT8_SCHEME`), or calibrated on other inputs than
    ``calibration`` (None: whatever calibration the cached file had); returns (ONNX path,
    record)."""
    from dpq.inference.quantize import (
        INT8_SCHEME,
        calibration_sample,
        quantize_onnx,
        sample_sha256,
    )

    path = cached_export_path(model_dir, image_size, tta_flip, "int8")
    float_path, float_record = cached_export(model_dir, image_size, tta_flip)
    try:
        record = check_export(path, model_dir, image_size, tta_flip)
        fresh = (record.precision == "int8" and INT8_SCHEME in record.exporter) and (
            calibration is None
            or sample_sha256(calibration_sample(float_record, calibration))
            == record.calibration_sha256
        )
        if fresh:
            return path, record
    except (FileNotFoundError, ValueError):
        pass
    try:  # without calibration inputs this is the ValueError saying that int8 needs them
        return path, quantize_onnx(float_path, path, calibration)
    except PermissionError as exc:
        raise _cache_error(path, exc) from None


def open_engine(
    model_dir: str | Path,
    engine: str = "torch",
    onnx_path: str | Path | None = None,
    threads: int | None = None,
    precision: str = "fp32",
    batch_size: int = DEFAULT_BATCH_SIZE,
    image_size: int | tuple[int, int] | None = None,
    tta_flip: bool | None = None,
    device: str = "cpu",
    calibration: Any = None,
) -> FeatureEngine:
    """An engine that computes the searched features of the checkpoint ``model_dir``.

    Args:
        model_dir: a checkpoint directory of any method.
        engine: "torch", "onnxruntime" or "openvino".
        onnx_path: an export of this checkpoint (``dpq export --onnx``) for the ONNX
            engines, checked against the checkpoint; None: the cached export (written on
            first use, atomically, into ``MODEL_DIR/engine-cache/``).
        threads: threads of one forward pass (default: the cores this process may use).
            For "torch" this sets torch's thread count for the whole process.
        precision: the arithmetic (:data:`PRECISIONS`): "fp32" everywhere, torch's
            "bf16"/"fp16" autocast, OpenVINO's "bf16" inference (the float32 export), or
            "int8" for onnxruntime and openvino (opt-in: the export quantized by ONNX
            Runtime, calibrated on ``calibration``, cached beside the float32 one).
        batch_size: items per forward pass.
        image_size: side (or (height, width)) of the images the ONNX engines read (default
            the model's ``model.image_size``); the torch engine reads any size.
        tta_flip: average with the mirrored image (default: the model's config).
        device: where the torch engine runs ("cpu", "cuda", ...); the ONNX engines run on
            the CPU.
        calibration: int8 only: training inputs (uint8 (N, H, W, 3) images, an array or a
            reader) whose activation ranges calibrate the quantization; needed the first
            time (and again when the checkpoint changes), later the cached file is reused.

    Raises:
        ValueError: an unknown engine or precision, an engine whose package is missing
            (naming the extra to install), or a stale or damaged ``onnx_path``.
    """
    check_engine(engine)
    check_precision(engine, precision)
    _check_positive("batch_size", batch_size)
    if threads is not None:
        _check_positive("threads", threads)
    if engine == "torch":
        if onnx_path is not None:
            raise ValueError(
                "onnx_path is for the onnxruntime and openvino engines; the torch engine runs "
                "the checkpoint itself."
            )
        from dpq.devices import resolve_device
        from dpq.methods import load_network

        network = load_network(model_dir, device=resolve_device(device))
        return TorchEngine(network, batch_size, threads, precision, tta_flip)
    if device != "cpu":
        raise ValueError(f"the {engine} engine runs on the CPU; got device {device!r}.")
    import_runtime(engine)  # before any export: a missing package costs no export
    if onnx_path is None and precision == "int8":
        path, record = cached_int8_export(model_dir, image_size, tta_flip, calibration)
    elif onnx_path is None:
        path, record = cached_export(model_dir, image_size, tta_flip)
    else:
        path = Path(onnx_path)
        record = check_export(path, model_dir, image_size, tta_flip)
    if threads is None:
        from dpq.devices import available_cores

        threads = available_cores()
    return _GRAPH_ENGINES[engine](path, record, batch_size, threads, precision)


def engine_for(
    network: Any,
    model_dir: str | Path,
    engine: str = "torch",
    onnx_path: str | Path | None = None,
    inputs: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | None = None,
    precision: str = "fp32",
) -> FeatureEngine:
    """The engine ``engine`` for a network already loaded from ``model_dir``: that network
    itself for "torch" (no second load; ``threads`` None leaves torch's count alone), else
    :func:`open_engine` on the CPU with ``onnx_path`` or the cached export, read at the image
    size of ``inputs`` (uint8 (N, H, W, 3) images, an array or a reader; None or features:
    the model's size); ``precision`` as :func:`open_engine`'s (int8 needs its cached,
    calibrated export: :func:`open_engine` with ``calibration`` first)."""
    check_engine(engine, onnx_path)
    check_precision(engine, precision)
    if engine == "torch":
        return TorchEngine(network, batch_size, threads, precision)
    shape = tuple(getattr(inputs, "shape", ()))
    image_size = None
    if network.input_kind == "images" and len(shape) == 4:
        image_size = (int(shape[1]), int(shape[2]))
    return open_engine(
        model_dir,
        engine,
        onnx_path,
        threads,
        precision=precision,
        batch_size=batch_size,
        image_size=image_size,
    )
