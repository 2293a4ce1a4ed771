"""dpq.inference.names: the engine names and their check, importable without torch (the
CLI's parser and the service's settings use them before anything loads)."""

import subprocess
import sys

import pytest

from dpq.inference.names import ENGINES, GRAPH_ENGINES, PRECISIONS, check_engine, check_precision


def test_every_engine_is_accepted_and_an_onnx_file_only_by_a_graph_engine():
    assert ENGINES == ("torch", "onnxruntime", "openvino")
    assert [check_engine(name) for name in ENGINES] == list(ENGINES)
    assert [check_engine(name, "e.onnx") for name in GRAPH_ENGINES] == list(GRAPH_ENGINES)
    with pytest.raises(ValueError, match="unknown engine 'tensorrt'; choose one of torch, onnx"):
        check_engine("tensorrt")
    with pytest.raises(ValueError, match=r"an ONNX file \(--onnx\) is run by the onnxruntime"):
        check_engine("torch", "e.onnx")


def test_each_engine_names_its_precisions():
    for engine in ENGINES:
        assert PRECISIONS[engine][0] == "fp32"  # the default runs everywhere
        for precision in PRECISIONS[engine]:
            check_precision(engine, precision)
    with pytest.raises(ValueError, match="the onnxruntime engine runs precision fp32 or int8, not"):
        check_precision("onnxruntime", "bf16")
    with pytest.raises(
        ValueError, match="the openvino engine runs precision fp32 or bf16 or int8, not"
    ):
        check_precision("openvino", "fp16")


def test_the_names_and_the_package_import_without_torch():
    script = (
        "import sys, dpq.inference, dpq.inference.names, dpq.serve.settings, dpq.cli.options; "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
