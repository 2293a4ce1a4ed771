"""dpq.data.sources: one load_source for every kind of collection, conflicting arguments
refused, skipped images counted."""

import numpy as np
import pytest

from conftest import make_image_folder, truncated_jpeg
from dpq.data import SkippedImagesWarning, detect_source_kind, load_source


def test_every_kind_loads_through_one_function(tmp_path):
    digits = load_source("digits")
    assert (
        digits.kind == "digits" and digits.inputs.shape == (1797, 8, 8, 3) and len(digits) == 1797
    )
    make_image_folder(tmp_path / "folder", {"a": 3, "b": 2})
    folder = load_source(tmp_path / "folder")
    assert folder.kind == "image-folder" and folder.classes == ["a", "b"]
    np.testing.assert_array_equal(folder.labels, [0, 0, 0, 1, 1])
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"a/{i:03d}.png 7\n" for i in range(3)) + "b/000.png 9\n")
    labels_only = load_source(listing, labels_only=True)
    assert labels_only.inputs is None and labels_only.classes == ["7", "9"]
    listed = load_source(listing, image_root=tmp_path / "folder", image_size=8)
    assert listed.kind == "list-file" and listed.inputs.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(listed.labels, [0, 0, 0, 1])
    np.testing.assert_array_equal(listed.inputs[0], folder.inputs[0])
    np.save(tmp_path / "x.npy", np.ones((5, 4), np.float32))
    np.save(tmp_path / "y.npy", np.array([0, 1, 0, 1, 1]))
    features = load_source(features=tmp_path / "x.npy", labels=tmp_path / "y.npy")
    assert features.kind == "features" and features.inputs.shape == (5, 4)
    inputs, labels = features.rows(np.array([4, 0]))
    assert inputs.shape == (2, 4) and labels.tolist() == [1, 0]


def test_conflicting_or_missing_arguments_are_refused(tmp_path):
    make_image_folder(tmp_path / "folder", {"a": 1, "b": 1})
    np.save(tmp_path / "x.npy", np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="not both"):
        load_source(tmp_path / "folder", features=tmp_path / "x.npy", labels=tmp_path / "x.npy")
    with pytest.raises(ValueError, match="--features needs --labels"):
        load_source(features=tmp_path / "x.npy")
    with pytest.raises(ValueError, match="apply to image sources"):
        load_source(features=tmp_path / "x.npy", labels=tmp_path / "x.npy", image_root=tmp_path)
    with pytest.raises(ValueError, match="apply to list files"):
        load_source(tmp_path / "folder", image_root=tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text("a/000.png 0\n")
    with pytest.raises(ValueError, match="pass --image-root"):
        load_source(listing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="give a data source"):
        load_source()
    assert detect_source_kind("digits") == "digits"


def test_skipped_images_are_counted_and_said_once(tmp_path):
    make_image_folder(tmp_path / "folder", {"a": 3, "b": 2})
    (tmp_path / "folder" / "a" / "bad.jpg").write_bytes(truncated_jpeg(np.random.default_rng(0)))
    with pytest.warns(SkippedImagesWarning, match="skipped 1 of 6") as caught:
        source = load_source(tmp_path / "folder", skip_corrupt=True)
    assert len(caught) == 1 and source.skipped == 1 and len(source) == 5
    assert source.notes and "bad.jpg" in source.notes[0]
