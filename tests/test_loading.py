"""dpq.data.loading: batches by index, in this process or through DataLoader workers."""

import numpy as np
import pytest
import torch

from conftest import make_image_folder, truncated_jpeg
from dpq.data import CorruptImageError, load_source
from dpq.data.loading import BatchReader, IndexBatches, sequential_batches


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 7 random 12 x 12 PNGs."""
    root = tmp_path_factory.mktemp("loading")
    make_image_folder(root, {"a": 7, "b": 7, "c": 7}, size=12, seed=3)
    return root


def test_in_memory_and_streamed_batches_are_the_same(folder):
    in_memory = load_source(folder, image_size=12).inputs
    streamed = load_source(folder, image_size=12, in_memory=False).inputs
    assert isinstance(in_memory, np.ndarray) and not isinstance(streamed, np.ndarray)
    order = np.random.default_rng(0).permutation(21)[:20].reshape(4, 5)
    with BatchReader(in_memory) as here, BatchReader(streamed, workers=2) as workers:
        assert not here.streams and workers.streams and workers.workers == 2
        for _ in range(2):  # a second pass reuses the same worker processes
            batches = list(workers.read(order))
            expected = [torch.from_numpy(in_memory[row]) for row in order]
            assert len(batches) == 4
            for got, want in zip(batches, expected, strict=True):
                assert got.dtype == torch.uint8 and got.shape == (5, 12, 12, 3)
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            for got, want in zip(here.read(order), expected, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_sequential_reads_every_item_once_in_order(folder):
    streamed = load_source(folder, image_size=12, in_memory=False).inputs
    with BatchReader(streamed, workers=1) as reader:
        starts, rows = zip(*[(start, len(b)) for start, b in reader.sequential(8)], strict=True)
    assert starts == (0, 8, 16) and rows == (8, 8, 5)
    assert [len(b) for b in sequential_batches(5, 2)] == [2, 2, 1]
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        sequential_batches(5, 0)


def test_a_corrupt_image_met_in_a_worker_is_named(tmp_path):
    make_image_folder(tmp_path, {"a": 3, "b": 3}, size=12)
    (tmp_path / "b" / "zz-broken.jpg").write_bytes(truncated_jpeg(np.random.default_rng(0)))
    streamed = load_source(tmp_path, image_size=12, in_memory=False).inputs
    with BatchReader(streamed, workers=2) as reader:
        with pytest.raises(CorruptImageError, match="zz-broken.jpg"):
            list(reader.sequential(4))


def test_arguments_are_checked(folder):
    with pytest.raises(ValueError, match="workers must be a whole number"):
        BatchReader(np.zeros((2, 4), np.float32), workers=-1)
    with pytest.raises(ValueError, match="prefetch must be a positive integer"):
        BatchReader(np.zeros((2, 4), np.float32), prefetch=0)
    batches = IndexBatches()
    batches.set([np.array([2, 0]), np.array([1])])
    assert list(batches) == [[2, 0], [1]] and len(batches) == 2


def test_auto_loading_streams_what_does_not_fit(folder, monkeypatch):
    assert isinstance(load_source(folder, image_size=12, in_memory="auto").inputs, np.ndarray)
    monkeypatch.setenv("DPQ_MEMORY_BUDGET_MB", "0")
    assert not isinstance(load_source(folder, image_size=12, in_memory="auto").inputs, np.ndarray)
    with pytest.raises(ValueError, match="needs an image size"):
        load_source(folder, in_memory=False)
    with pytest.raises(ValueError, match="cannot read images on demand"):
        load_source(folder, image_size=12, in_memory=False, skip_corrupt=True)


def test_cifar10_read_on_demand_is_the_in_memory_collection(small_cifar_zip, tmp_path):
    in_memory = load_source(small_cifar_zip, cache_dir=tmp_path)
    streamed = load_source(small_cifar_zip, in_memory=False)
    assert streamed.kind == "cifar10" and not isinstance(streamed.inputs, np.ndarray)
    np.testing.assert_array_equal(streamed.labels, in_memory.labels)
    with BatchReader(streamed.inputs, workers=2) as reader:
        got = np.concatenate([batch.numpy() for _, batch in reader.sequential(16)])
    np.testing.assert_array_equal(got, in_memory.inputs)
    at_64 = load_source(small_cifar_zip, in_memory=False, image_size=64).inputs
    assert at_64.shape == (50, 64, 64, 3)
    with pytest.raises(ValueError, match="32 x 32 in memory"):
        load_source(small_cifar_zip, image_size=64, cache_dir=tmp_path)
