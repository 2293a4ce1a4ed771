"""dpq.data.spec.SourceSpec: one JSON-ready bundle of source options that opens the same
items as load_source with those options."""

from pathlib import Path

import numpy as np
import pytest

from conftest import make_image_folder
from dpq.data import SourceSpec, load_source
from dpq.data.dataset import ImageFileReader


def test_a_spec_survives_json_with_every_option(tmp_path):
    spec = SourceSpec(
        images=tmp_path / "list.txt",
        image_root=tmp_path / "images",
        image_size=[16, 24],
        strip_prefix="/data/",
        skip_corrupt=True,
        cache_dir=tmp_path / "cache",
        loading="memory",
    )
    assert spec.images == str(tmp_path / "list.txt") and spec.image_size == (16, 24)
    assert SourceSpec.from_json(spec.to_json()) == spec
    assert SourceSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict()["image_size"] == [16, 24]
    assert spec.describe() == str(tmp_path / "list.txt")
    features = SourceSpec(features="x.npy", labels="y.npy")
    assert SourceSpec.from_json(features.to_json()) == features
    assert features.describe() == "x.npy"


def test_a_spec_refuses_options_that_do_not_go_together():
    with pytest.raises(ValueError, match="exactly one of images"):
        SourceSpec()
    with pytest.raises(ValueError, match="exactly one of images"):
        SourceSpec(images="digits", features="x.npy")
    with pytest.raises(ValueError, match="a labels file goes with features"):
        SourceSpec(images="digits", labels="y.npy")
    with pytest.raises(ValueError, match="--image-root, --skip-corrupt apply to --images"):
        SourceSpec(features="x.npy", image_root="images", skip_corrupt=True)
    with pytest.raises(ValueError, match="loading must be one of auto, memory, stream"):
        SourceSpec(images="digits", loading="lazy")
    with pytest.raises(TypeError, match="images must be a path"):
        SourceSpec(images=3)
    with pytest.raises(ValueError, match="unknown source option\\(s\\) size"):
        SourceSpec.from_dict({"images": "digits", "size": 8})
    with pytest.raises(ValueError, match="must be a JSON object"):
        SourceSpec.from_json("[1, 2]")
    with pytest.raises(ValueError, match="cannot parse it"):
        SourceSpec.from_json("{images")


def test_load_is_load_source_with_the_options(tmp_path):
    made = make_image_folder(tmp_path / "images", {"cat": 3, "dog": 2}, size=8)
    spec = SourceSpec(images=tmp_path / "images", loading="memory")
    source = spec.load(progress=False)
    reference = load_source(tmp_path / "images", progress=False)
    np.testing.assert_array_equal(source.inputs, reference.inputs)
    np.testing.assert_array_equal(source.labels, [0, 0, 0, 1, 1])
    assert source.classes == ["cat", "dog"] and source.kind == "image-folder"
    np.testing.assert_array_equal(source.inputs[3], made["dog"][0])
    # read on demand at a given size: a reader, decoded when a row is read
    streamed = SourceSpec(images=tmp_path / "images", image_size=8, loading="stream")
    inputs, labels, classes = streamed.open(progress=False)
    assert isinstance(inputs, ImageFileReader) and len(inputs) == 5
    np.testing.assert_array_equal(inputs[4], made["dog"][1])
    assert labels.tolist() == [0, 0, 0, 1, 1] and classes == ["cat", "dog"]
    # a labelled features file: load_source maps its labels to 0..C-1
    np.save(tmp_path / "x.npy", np.arange(12, dtype=np.float32).reshape(4, 3))
    np.save(tmp_path / "y.npy", np.array([5, 7, 5, 7]))
    loaded = SourceSpec(features=tmp_path / "x.npy", labels=tmp_path / "y.npy").load()
    assert loaded.kind == "features" and loaded.labels.tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="--features needs --labels"):
        SourceSpec(features=tmp_path / "x.npy").load()


def test_open_gives_unlabelled_features_memory_mapped_and_labels_as_they_are(tmp_path: Path):
    rows = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", rows)
    np.savetxt(tmp_path / "x.txt", rows)
    inputs, labels, classes = SourceSpec(features=tmp_path / "x.npy").open()
    assert isinstance(inputs, np.memmap) and labels is None and classes is None
    np.testing.assert_array_equal(inputs, rows)
    text, _labels, _classes = SourceSpec(features=tmp_path / "x.txt").open()
    np.testing.assert_allclose(text, rows, rtol=1e-6)
    np.save(tmp_path / "y.npy", np.array([5, 7, 5, 7, 9, 9]))
    _inputs, labels, _classes = SourceSpec(
        features=tmp_path / "x.npy", labels=tmp_path / "y.npy"
    ).open()
    assert labels.tolist() == [5, 7, 5, 7, 9, 9] and labels.dtype == np.int64
    np.savez(tmp_path / "archive.npz", x=rows)
    (tmp_path / "archive.npz").rename(tmp_path / "archive.npy")
    with pytest.raises(ValueError, match="--features file .*archive.npy"):
        SourceSpec(features=tmp_path / "archive.npy").open()
    images = SourceSpec(images="digits").open(progress=False)
    assert len(images[0]) == len(images[1]) == 1797 and images[2][0] == "0"
