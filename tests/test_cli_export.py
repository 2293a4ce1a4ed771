"""dpq.cli.export: ``dpq export --onnx MODEL_DIR OUT`` writes the graph and its record and
says what it wrote; a missing format flag or image size is a usage error (exit 2)."""

from __future__ import annotations

import pytest

from conftest import save_encoder_model
from dpq.cli import main
from dpq.inference.export import check_export, record_path


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
