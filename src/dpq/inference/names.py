"""The names of the inference engines and the extra that installs them, importable without
torch (the CLI's flags and the service's settings check them before anything loads)."""

from __future__ import annotations

ENGINES = ("torch", "onnxruntime", "openvino")
"""The engine names :func:`dpq.inference.open_engine` accepts: eager PyTorch, and the
exported encoder (:mod:`dpq.inference.export`) in ONNX Runtime or OpenVINO."""
GRAPH_ENGINES = ENGINES[1:]
"""The engines that run an exported ONNX graph (on the CPU)."""
PRECISIONS = {
    "torch": ("fp32", "bf16", "fp16"),
    "onnxruntime": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "int8"),
}
"""The arithmetic each engine runs: torch's autocast choices; the ONNX engines in float32 or
int8 (the export quantized by ONNX Runtime's static quantization, :mod:`dpq.inference.quantize`,
which OpenVINO also runs), and OpenVINO in bfloat16 by its CPU plugin's inference precision
(the same float32 export; on CPUs with AVX512-BF16 or AMX; refused on others)."""
CLI_PRECISIONS = ("fp32", "bf16", "int8")
"""The precisions ``--engine-precision`` offers (int8 reads an int8 export: ``dpq export
--onnx MODEL_DIR OUT --int8 --calibration IMAGES``, passed with ``--onnx OUT``)."""
INT8_EXPORT_HINT = (
    "write one with `dpq export --onnx MODEL_DIR OUT --int8 --calibration TRAINING_IMAGES` "
    "and pass it with --onnx OUT"
)
"""How a command-line user gets the int8 export an int8 engine reads."""
INSTALL_HINT = "pip install 'dpq[inference]'"
"""How to install the packages of the graph engines and of the exporter."""


def check_engine(engine: object, onnx_path: object = None) -> str:
    """``engine`` when it names an engine and ``onnx_path`` (an exported file, or None)
    suits it; ValueError naming the choices otherwise."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}.")
    if onnx_path is not None and engine not in GRAPH_ENGINES:
        raise ValueError(
            "an ONNX file (--onnx) is run by the onnxruntime or openvino engine; add --engine "
            "onnxruntime (or openvino), or leave --onnx out to run the checkpoint in torch."
        )
    return str(engine)


def check_precision(engine: str, precision: str) -> None:
    """ValueError unless ``engine`` runs ``precision`` (:data:`PRECISIONS`)."""
    if precision not in PRECISIONS[engine]:
        raise ValueError(
            f"the {engine} engine runs precision {' or '.join(PRECISIONS[engine])}, not "
            f"{precision!r}."
        )
