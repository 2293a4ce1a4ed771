"""dpq.cli.export: ``dpq export --onnx MODEL_DIR OUT`` writes the graph and its record and
says what it wrote; ``--int8 --calibration IMAGES`` writes the int8 graph that `dpq encode
--engine-precision int8 --onnx OUT` runs; a missing format flag, image size or calibration is
a usage error (exit 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import make_image_folder, needs_engine, save_encoder_model
from dpq.cli import main
from dpq.inference.export import check_export, read_export, record_path


@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    pytest.importorskip("onnxscript", reason="exporting needs the inference extra (onnxscript)")
    return save_encoder_model("resnet9", tmp_path_factory.mktemp("cli-export") / "model")


def test_export_writes_the_graph_and_its_record(image_model, tmp_path, capsys):
    out = tmp_path / "out" / "encoder.onnx"
    assert main(["export", "--onnx", str(image_model), str(out), "--image-size", "32"]) == 0
    printed = capsys.readouterr().out
    assert "uint8 (N, 32, 32, 3) images -> float32 (N, 24) features" in printed
    assert "encoder.onnx.json" in printed and "flip" not in printed
    record = check_export(out, image_model, image_size=32)
    assert record_path(out).is_file() and record.tta_flip is False
    assert main(["export", "--onnx", str(image_model), str(out), "--image-size", "32",
                 "--tta-flip"]) == 0  # fmt: skip
    assert "flip-averaged" in capsys.readouterr().out
    assert check_export(out, image_model).tta_flip is True


def test_export_needs_the_format_and_an_image_size(image_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["export", str(image_model), str(tmp_path / "e.onnx")])
    assert stopped.value.code == 2 and "--onnx" in capsys.readouterr().err
    assert main(["export", "--onnx", str(image_model), str(tmp_path / "e.onnx")]) == 2
    assert "give the size of the images it will read" in capsys.readouterr().err
    assert not (tmp_path / "e.onnx").exists()


def test_int8_export_is_calibrated_on_the_given_images_and_runs_in_both_engines(
    image_model, tmp_path, capsys
):
    """The int8 export reads --calibration at the encoder's size; `dpq encode` runs it with
    --engine-precision int8 --onnx OUT (onnxruntime here, OpenVINO in a child process: see
    test_inference_engines on OpenVINO in a pytest process), its codes close to float32's."""
    needs_engine("onnxruntime")
    from dpq.index import DPQIndex

    images = tmp_path / "set"
    make_image_folder(images, {"a": 12, "b": 12}, size=32)
    out = tmp_path / "int8.onnx"
    export = ["export", "--onnx", str(image_model), str(out), "--image-size", "32"]
    assert main([*export, "--int8", "--calibration", str(images)]) == 0
    assert "int8: uint8 (N, 32, 32, 3) images" in capsys.readouterr().out
    record = read_export(out)
    assert record.precision == "int8" and "24 calibration items" in record.exporter
    common = ["encode", "--model", str(image_model), "--images", str(images), "--quiet"]
    assert main([*common, "--out", str(tmp_path / "f32.npz")]) == 0
    int8 = ["--engine-precision", "int8", "--onnx", str(out)]
    assert (
        main([*common, "--engine", "onnxruntime", *int8, "--out", str(tmp_path / "ort.npz")]) == 0
    )
    done = subprocess.run(
        [sys.executable, "-m", "dpq.cli", *common, "--engine", "openvino", *int8,
         "--out", str(tmp_path / "ov.npz")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if "needs the openvino package" not in done.stderr:
        assert done.returncode == 0, done.stderr[-3000:]
        runs = ("f32", "ort", "ov")
    else:
        runs = ("f32", "ort")
    codes = [DPQIndex.load(tmp_path / f"{name}.npz").codes for name in runs]
    for other in codes[1:]:
        assert other.shape == codes[0].shape and (other == codes[0]).mean() >= 0.5


def test_int8_needs_its_export_and_its_calibration(image_model, tmp_path, capsys):
    needs_engine("onnxruntime")
    export = ["export", "--onnx", str(image_model), str(tmp_path / "e.onnx"), "--image-size", "32"]
    assert main([*export, "--int8"]) == 2
    assert "--int8 needs --calibration IMAGES" in capsys.readouterr().err
    assert main([*export, "--calibration", "digits"]) == 2
    assert "--calibration apply to --int8 exports; add --int8" in capsys.readouterr().err
    assert not (tmp_path / "e.onnx").exists()
    make_image_folder(tmp_path / "set", {"a": 2, "b": 2}, size=32)
    encode = ["encode", "--model", str(image_model), "--images", str(tmp_path / "set"),
              "--engine", "onnxruntime", "--engine-precision", "int8", "--quiet",
              "--out", str(tmp_path / "db.npz")]  # fmt: skip
    assert main(encode) == 2  # no --onnx and no int8 export in the model's cache
    err = capsys.readouterr().err
    assert (
        "int8 needs calibration inputs" in err and "dpq export --onnx MODEL_DIR OUT --int8" in err
    )
    assert not (tmp_path / "db.npz").exists()
