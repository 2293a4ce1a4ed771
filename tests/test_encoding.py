"""dpq.encoding.build_index: the one way a model and items become an index."""

import numpy as np
import pytest
import torch

from dpq import encoding
from dpq.config import DPQConfig, ModelConfig, QuantizerConfig
from dpq.data import ImageFileReader
from dpq.data.decode import ImageStore
from dpq.encoding import build_index
from dpq.model import DPQModel


@pytest.fixture(scope="module")
def model() -> DPQModel:
    torch.manual_seed(0)
    config = DPQConfig(
        model=ModelConfig(backbone="small_cnn", backbone_kwargs={"width": 0.25}, num_classes=3),
        quantizer=QuantizerConfig(num_levels=3, codebook_size=16, dim=10),
    )
    return DPQModel(config).eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(37, 8, 8, 3), dtype=np.uint8)


def test_build_index_holds_the_models_codes_ids_and_labels(model, images, monkeypatch):
    monkeypatch.setattr(encoding, "CHUNK_ITEMS", 10)  # four chunks, the last one short
    labels = np.arange(37) % 3
    index = build_index(model, images, ids=np.arange(100, 137), labels=labels, batch_size=4)
    np.testing.assert_array_equal(index.codes, model.encode(images))
    np.testing.assert_array_equal(index.ids, np.arange(100, 137))
    np.testing.assert_array_equal(index.labels, labels)
    np.testing.assert_array_equal(index.codebooks, model.codebooks())
    assert index.assignment == model.config.quantizer.assignment and index.search_mode == "aqd"
    assert build_index(model, images[:3], search_mode="ip").search_mode == "ip"


def test_build_index_grows_an_index_and_checks_its_codebooks(model, images):
    index = build_index(model, images[:20])
    grown = build_index(model, images[20:], index=index)
    assert grown is index and index.ntotal == 37
    np.testing.assert_array_equal(index.ids, np.arange(37))
    torch.manual_seed(1)
    other = DPQModel(model.config)
    with pytest.raises(ValueError, match="differ from the ones this index was built with"):
        build_index(other, images[:2], index=index)
    with pytest.raises(ValueError, match="labels has 2 rows but there are 37 items"):
        build_index(model, images, labels=np.zeros(2, np.int64))


def test_build_index_streams_an_on_demand_reader(model, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(encoding, "CHUNK_ITEMS", 4)
    pixels = np.random.default_rng(2).integers(0, 256, size=(9, 8, 8, 3), dtype=np.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    reader = ImageFileReader(ImageStore(str(tmp_path)), [f"{i}.png" for i in range(9)], (8, 8))
    read, added = [], []
    original = ImageFileReader.__getitem__
    monkeypatch.setattr(
        ImageFileReader, "__getitem__", lambda self, key: read.append(key) or original(self, key)
    )
    add = encoding.add_features
    monkeypatch.setattr(
        encoding,
        "add_features",
        lambda index, model, features, **rows: (
            added.append(len(features)) or add(index, model, features, **rows)
        ),
    )
    index = build_index(model, reader, batch_size=2, workers=0)
    assert read == list(range(9))  # one image at a time, each once: never all at once
    assert added == [4, 4, 1]  # codes added a chunk at a time
    np.testing.assert_array_equal(index.codes, model.encode(pixels))
    # decoded by two worker processes: the same codes, in the same order
    in_workers = build_index(model, reader, batch_size=2, workers=2)
    np.testing.assert_array_equal(in_workers.codes, index.codes)
