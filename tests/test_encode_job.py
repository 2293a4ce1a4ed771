"""dpq.encode.job.encode_collection: the one encode path, here in this process (new files
and appends, with a model of any method or with codebooks); the Ray runner's path is
tests/test_ray_encode.py."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_image_folder, small_config
from dpq.data import SourceSpec, load_source
from dpq.encode.build import build_index
from dpq.encode.job import EncodeSettings, encode_collection
from dpq.index import DPQIndex
from dpq.index.binary import BinaryIndex
from dpq.methods import load_network, method_for
from dpq.model.network import DPQModel


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 cats and 4 dogs, 8x8 PNGs."""
    root = tmp_path_factory.mktemp("job-images") / "images"
    make_image_folder(root, {"cat": 3, "dog": 4}, size=8)
    return root


def test_a_model_encodes_the_source_as_build_index_does(small_model_dir, folder, tmp_path):
    out = tmp_path / "db.npz"
    settings = EncodeSettings(out, SourceSpec(images=folder), model=small_model_dir, batch_size=3)
    result = encode_collection(settings)
    model = DPQModel.from_checkpoint(small_model_dir)
    source = load_source(folder, progress=False)
    reference = build_index(model, source.inputs, labels=source.labels)
    written = DPQIndex.load(out)
    assert result.path == out and result.total == written.ntotal == 7 and not result.appended
    np.testing.assert_array_equal(written.codes, reference.codes)
    np.testing.assert_array_equal(written.ids, np.arange(7))
    np.testing.assert_array_equal(result.ids, np.arange(7))
    np.testing.assert_array_equal(written.labels, source.labels)
    assert written.metadata == {
        "created_by": "dpq encode",
        "source": str(folder),
        "classes": ["cat", "dog"],
        "model": str(small_model_dir),
    }
    assert result.shards is None
    assert result.summary().startswith(f"wrote {out}: 7 items, 3 levels x 16 codewords (up to ")
    assert "labels yes; encoded in" in result.summary()
    # read on demand, partitioned, searched by inner product: the same codes
    streamed = SourceSpec(images=folder, image_size=8, loading="stream")
    options = {"search_mode": "ip", "partition_levels": 1, "workers": 0}
    grouped = encode_collection(EncodeSettings(out, streamed, model=small_model_dir, **options))
    assert (grouped.index.search_mode, grouped.index.partition_levels) == ("ip", 1)
    order = np.argsort(grouped.index.ids)
    np.testing.assert_array_equal(grouped.index.codes[order], reference.codes)


def test_rows_ids_and_labels_say_what_is_encoded(small_model_dir, folder, tmp_path):
    out = tmp_path / "db.npz"
    source = load_source(folder, progress=False)
    rows = np.array([6, 0, 2])
    spec = SourceSpec(images=folder)
    chosen = encode_collection(EncodeSettings(out, spec, model=small_model_dir, rows=rows))
    model = DPQModel.from_checkpoint(small_model_dir)
    np.testing.assert_array_equal(chosen.index.codes, model.encode(source.inputs[rows]))
    np.testing.assert_array_equal(chosen.index.ids, rows)  # ids: the source rows
    np.testing.assert_array_equal(chosen.index.labels, source.labels[rows])
    np.save(tmp_path / "ids.npy", np.array([10, 11, 12]))
    given = EncodeSettings(
        out,
        spec,
        model=small_model_dir,
        rows=rows,
        ids=tmp_path / "ids.npy",
        labels=np.array([1, 1, 0]),
    )
    index = encode_collection(given).index
    np.testing.assert_array_equal(index.ids, [10, 11, 12])
    np.testing.assert_array_equal(index.labels, [1, 1, 0])
    assert "classes" not in index.metadata  # the given labels are not the source's classes
    with pytest.raises(
        ValueError, match=r"positions in \[0, 7\) of .*; make the split from the same source"
    ):
        encode_collection(EncodeSettings(out, spec, model=small_model_dir, rows=np.array([0, 7])))
    with pytest.raises(ValueError, match="labels has 2 rows but there are 3 items"):
        encode_collection(
            EncodeSettings(out, spec, model=small_model_dir, rows=rows, labels=np.array([0, 1]))
        )


def test_codebooks_encode_features_and_append_grows_the_file(tmp_path):
    rng = np.random.default_rng(3)
    books = rng.normal(size=(2, 16, 6)).astype(np.float32)
    np.save(tmp_path / "books.npy", books)
    first, second = rng.normal(size=(30, 6)), rng.normal(size=(20, 6))
    np.save(tmp_path / "a.npy", first)
    np.save(tmp_path / "b.npy", second)
    out = tmp_path / "db.npz"
    new = EncodeSettings(
        out, SourceSpec(features=tmp_path / "a.npy"), codebooks=tmp_path / "books.npy"
    )
    made = encode_collection(new)
    assert made.index.assignment == "euclidean" and made.index.search_mode == "aqd"
    assert made.index.metadata["codebooks"] == str(tmp_path / "books.npy")
    assert "labels no" in made.summary()
    grow = EncodeSettings(
        out, SourceSpec(features=tmp_path / "b.npy"), codebooks=books, append=True
    )
    grown = encode_collection(grow)
    assert grown.appended and grown.total == 50
    np.testing.assert_array_equal(grown.ids, np.arange(30, 50))  # the file's counter goes on
    assert grown.summary().startswith(f"appended 20 items to {out} (ids 30..49): 50 items now")
    whole = DPQIndex(books)
    whole.add_features(np.concatenate([first, second]))
    written = DPQIndex.load(out)
    np.testing.assert_array_equal(written.codes, whole.codes)
    np.testing.assert_array_equal(written.ids, np.arange(50))
    other = replace(grow, codebooks=books + 1)
    with pytest.raises(ValueError, match="codebooks differ"):
        encode_collection(other)
    with pytest.raises(ValueError, match="are the existing index's with --append"):
        encode_collection(replace(grow, partition_levels=1))
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        encode_collection(replace(grow, out=tmp_path / "nothing.npz"))
    assert DPQIndex.load(out).ntotal == 50  # refused appends left the file as it was


def test_settings_that_do_not_go_together_are_refused(small_model_dir, tmp_path):
    pytest.importorskip("ray.data", reason="RayRunner needs Ray Data")
    from dpq.encode.ray import RayRunner

    np.save(tmp_path / "x.npy", np.zeros((4, 12), np.float32))
    out, images = tmp_path / "db.npz", SourceSpec(images="digits")
    features = SourceSpec(features=tmp_path / "x.npy")
    refused = [
        ({"source": images, "codebooks": tmp_path / "x.npy"}, "--images needs --model"),
        ({"source": features}, "give one of --model"),
        (
            {"source": features, "model": small_model_dir, "codebooks": "b.npy"},
            "give one of --model",
        ),
        (
            {"source": images, "model": small_model_dir, "assignment": "cosine"},
            "applies to --codebooks",
        ),
        (
            {"source": features, "model": small_model_dir, "rows": np.arange(2)},
            "applies to --images",
        ),
        ({"source": images, "model": small_model_dir, "shards": 2}, "apply to --runner ray"),
        ({"source": features, "codebooks": "b.npy", "runner": RayRunner()}, "needs --model"),
        (
            {"source": images, "model": small_model_dir, "runner": RayRunner(), "append": True},
            "--append applies to --runner local",
        ),
        (
            {
                "source": images,
                "model": small_model_dir,
                "runner": RayRunner(),
                "engine": "openvino",
            },
            "--engine openvino applies to --runner local",
        ),
        (
            {
                "source": images,
                "model": small_model_dir,
                "runner": RayRunner(),
                "engine_precision": "bf16",
            },
            "--engine-precision bf16 applies to --runner local",
        ),
        (
            {
                "source": images,
                "model": small_model_dir,
                "engine": "onnxruntime",
                "engine_precision": "bf16",
            },
            "the onnxruntime engine runs precision fp32 or int8, not 'bf16'",
        ),
    ]
    for options, message in refused:
        with pytest.raises(ValueError, match=message):
            encode_collection(EncodeSettings(out, **options))
    assert not out.exists()
    with pytest.raises(ValueError, match="--actors must be a positive integer"):
        RayRunner(actors=0)


def test_a_hashing_model_writes_and_grows_a_binary_index(folder, tmp_path):
    """A "sign" checkpoint: its method's sign codes in a binary index file, appended to with
    the ids going on; the DPQ index's settings are refused for it."""
    torch.manual_seed(0)
    config = small_config().replace(method={"name": "sign", "bits": 16})
    method_for(config).build_network().save_checkpoint(tmp_path / "model")
    out = tmp_path / "codes.npz"
    settings = EncodeSettings(out, SourceSpec(images=folder), model=tmp_path / "model")
    result = encode_collection(settings)
    network = load_network(tmp_path / "model")
    source = load_source(folder, progress=False)
    expected = method_for(network.config).encode(network, network.extract_features(source.inputs))
    written = BinaryIndex.load(out)
    np.testing.assert_array_equal(written.codes, expected)
    np.testing.assert_array_equal(written.labels, source.labels)
    assert written.metadata["model"] == str(tmp_path / "model")
    assert result.summary().startswith(f"wrote {out}: 7 items, 16-bit binary codes")
    grown = encode_collection(replace(settings, append=True))
    assert grown.appended and grown.total == 14
    np.testing.assert_array_equal(grown.ids, np.arange(7, 14))
    np.testing.assert_array_equal(BinaryIndex.load(out).codes, np.concatenate([expected] * 2))
    with pytest.raises(ValueError, match="apply to a DPQ index"):
        encode_collection(replace(settings, out=tmp_path / "x.npz", partition_levels=1))
    np.save(tmp_path / "features.npy", np.zeros((2, 16), np.float32))
    features = SourceSpec(features=tmp_path / "features.npy")
    dpq = EncodeSettings(out, features, codebooks=np.ones((2, 4, 16), np.float32), append=True)
    with pytest.raises(ValueError, match="holds binary codes"):
        encode_collection(dpq)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_an_engine_encodes_as_torch_does_and_each_stage_is_timed(
    small_model_dir, folder, tmp_path, engine
):
    import shutil

    from conftest import needs_engine
    from dpq.encode.stages import STAGES

    needs_engine(engine)
    pytest.importorskip("onnxscript", reason="exporting needs the inference extra (onnxscript)")
    model_dir = shutil.copytree(small_model_dir, tmp_path / "model")  # the cache goes beside it
    source = SourceSpec(images=folder)
    torch_run = encode_collection(EncodeSettings(tmp_path / "torch.npz", source, model=model_dir))
    result = encode_collection(
        EncodeSettings(tmp_path / "engine.npz", source, model=model_dir, engine=engine)
    )
    agreement = (result.index.codes == torch_run.index.codes).all(axis=1).mean()
    assert agreement >= 0.999
    assert (model_dir / "engine-cache").is_dir()  # exported on the fly, once
    stages = result.stages
    assert stages is not None and stages.items == 7 and list(stages.seconds) == list(STAGES)
    assert stages.seconds["network"] > 0 and stages.seconds["file"] > 0
    assert stages.summary().startswith("items/s by stage (7 items): decode ")


def test_engine_settings_that_do_not_go_together_are_refused(small_model_dir, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 12), np.float32))
    out, images = tmp_path / "db.npz", SourceSpec(images="digits")
    features = SourceSpec(features=tmp_path / "x.npy")
    refused = [
        ({"source": images, "model": small_model_dir, "engine": "tvm"}, "unknown engine 'tvm'"),
        (
            {"source": images, "model": small_model_dir, "onnx": tmp_path / "e.onnx"},
            "an ONNX file .--onnx. is run by the onnxruntime or openvino engine",
        ),
        (
            {"source": features, "codebooks": tmp_path / "x.npy", "engine": "onnxruntime"},
            "--engine onnxruntime runs a model's network",
        ),
        (
            {"source": images, "model": small_model_dir, "engine": "openvino", "device": "cuda"},
            "--engine openvino runs on the CPU, not on --device cuda",
        ),
    ]
    for options, message in refused:
        with pytest.raises(ValueError, match=message):
            encode_collection(EncodeSettings(out, **options))
    assert not out.exists()
