"""dpq.index.binary.BinaryIndex: Hamming search against a numpy reference with many ties
(equal distances by ascending id), missing results, ids and labels, the checksummed file
round trip, labels by id, sign codes, and its errors."""

import numpy as np
import pytest

from dpq.index import DPQIndex, IndexFileError
from dpq.index.binary import MISSING_DISTANCE, BinaryIndex, sign_codes


def _reference(queries, codes, ids, k):
    """Hamming distances by unpacked bits, ranked by (distance, id)."""
    bits = np.unpackbits(queries, axis=1)[:, None, :] != np.unpackbits(codes, axis=1)[None]
    distances = bits.sum(axis=2)
    order = np.array([np.lexsort((ids, row))[:k] for row in distances])
    return np.take_along_axis(distances, order, axis=1), ids[order]


def test_search_matches_the_reference_with_ties_broken_by_id():
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, size=(12, 2), dtype=np.uint8)  # few distinct codes: ties
    codes = palette[rng.integers(0, 12, size=300)]
    ids = rng.permutation(np.arange(1000, 1300))  # ids not in the order of the rows
    index = BinaryIndex(16)
    np.testing.assert_array_equal(index.add(codes, ids=ids), ids)
    queries = np.concatenate([palette[:5], rng.integers(0, 256, (5, 2), dtype=np.uint8)])
    for k in (1, 7, 40, 300):
        distances, found = index.search(queries, k)
        expected_d, expected_i = _reference(queries, codes, ids, k)
        assert distances.dtype == np.int32 and found.dtype == np.int64
        np.testing.assert_array_equal(distances, expected_d)
        np.testing.assert_array_equal(found, expected_i)


def test_fewer_items_than_k_and_an_empty_index():
    index = BinaryIndex(8)
    distances, found = index.search(np.zeros((2, 1), np.uint8), 3)
    assert (found == -1).all() and (distances == MISSING_DISTANCE).all()
    index.add(np.array([[0b1111], [0b0001]], np.uint8))
    distances, found = index.search(np.array([[0]], np.uint8), 3)
    np.testing.assert_array_equal(found, [[1, 0, -1]])
    np.testing.assert_array_equal(distances, [[1, 4, MISSING_DISTANCE]])
    assert index.ntotal == len(index) == 2 and index.labels is None


def test_a_saved_index_loads_with_codes_ids_labels_and_the_same_results(tmp_path):
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, size=(50, 4), dtype=np.uint8)
    labels = rng.integers(0, 2, size=(50, 3)).astype(np.uint8)
    index = BinaryIndex(32, metadata={"model": "runs/x/model"})
    index.add(codes[:30], labels=labels[:30])
    index.add(codes[30:], ids=np.arange(100, 120), labels=labels[30:])
    path = index.save(tmp_path / "codes.npz")
    loaded = BinaryIndex.load(path)
    assert (loaded.bits, loaded.ntotal, loaded.metadata) == (32, 50, {"model": "runs/x/model"})
    np.testing.assert_array_equal(loaded.codes, index.codes)
    np.testing.assert_array_equal(loaded.ids, index.ids)
    np.testing.assert_array_equal(loaded.labels, labels)
    for a, b in zip(index.search(codes[:9], 6), loaded.search(codes[:9], 6), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded.add(codes[:1], labels=labels[:1])[0] == 120  # the id counter went on


def test_files_of_another_kind_or_damaged_are_refused(tmp_path):
    dpq_file = DPQIndex(np.zeros((1, 2, 3), np.float32)).save(tmp_path / "dpq.npz")
    with pytest.raises(IndexFileError, match="not a binary one; load it with dpq.index.DPQIndex"):
        BinaryIndex.load(dpq_file)
    index = BinaryIndex(8)
    index.add(np.arange(20, dtype=np.uint8)[:, None])
    path = index.save(tmp_path / "binary.npz")
    with pytest.raises(IndexFileError):
        DPQIndex.load(path)
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF  # a flipped byte inside the codes
    (tmp_path / "bad.npz").write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="checksum"):
        BinaryIndex.load(tmp_path / "bad.npz")


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="multiple of 8"):
        BinaryIndex(12)
    index = BinaryIndex(16)
    with pytest.raises(ValueError, match=r"uint8 of shape \(N, 2\)"):
        index.add(np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match=r"uint8 of shape \(N, 2\)"):
        index.add(np.zeros((3, 2), np.int64))
    index.add(np.zeros((2, 2), np.uint8), ids=[4, 5], labels=[0, 1])
    with pytest.raises(ValueError, match="unique and not yet in the index"):
        index.add(np.zeros((1, 2), np.uint8), ids=[5], labels=[0])
    with pytest.raises(ValueError, match="pass labels for the new items too"):
        index.add(np.zeros((1, 2), np.uint8))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(np.zeros((1, 2), np.uint8), 0)
    with pytest.raises(ValueError, match="query codes must be uint8"):
        index.search(np.zeros((1, 3), np.uint8), 1)


def test_labels_are_looked_up_by_id_with_missing_ids_marked():
    index = BinaryIndex(8)
    index.add(np.zeros((3, 1), np.uint8), ids=[30, 10, 20], labels=[3, 1, 2])
    looked_up = index.labels_of(np.array([[10, -1], [30, 99]]))
    assert looked_up.dtype == np.int64
    np.testing.assert_array_equal(looked_up, [[1, -1], [3, -1]])
    multi = BinaryIndex(8)
    hot = np.array([[1, 0, 1], [0, 1, 0]], np.uint8)
    multi.add(np.zeros((2, 1), np.uint8), labels=hot)
    np.testing.assert_array_equal(multi.labels_of([1, 7, 0]), [hot[1], [0, 0, 0], hot[0]])
    with pytest.raises(ValueError, match="this index has no labels"):
        BinaryIndex(8).labels_of([0])


def test_sign_codes_pack_the_positive_features():
    features = np.array([[0.5, -0.1, 0.0, 2.0, -3.0, 0.1, 0.2, -0.2]], np.float32)
    np.testing.assert_array_equal(sign_codes(features), [[0b10010110]])
    np.testing.assert_array_equal(np.unpackbits(sign_codes(features), axis=1), features > 0)
    with pytest.raises(ValueError, match=r"float \(N, bits\) with bits a multiple of 8"):
        sign_codes(features[:, :6])
    with pytest.raises(ValueError, match=r"float \(N, bits\)"):
        sign_codes(np.zeros((1, 8), np.uint8))
