"""dpq.index.kinds: the kind a file holds, load_any for both kinds (a DPQ index and a binary
index load as themselves and search the same as before saving), code lengths, search modes,
which codes go together, and the search of either kind from float queries."""

import numpy as np
import pytest

from dpq.index import DPQIndex, IndexFileError, load_any
from dpq.index.binary import BinaryIndex, sign_codes
from dpq.index.kinds import (
    binary_queries,
    check_compatible,
    code_lengths,
    index_kind,
    kind_of,
    same_codes,
    search_features,
    search_mode,
)
from dpq.index.storage import read_index_file, write_index_file


def _dpq_index(seed: int = 0, levels: int = 2, size: int = 16) -> DPQIndex:
    rng = np.random.default_rng(seed)
    index = DPQIndex(rng.normal(size=(levels, size, 6)).astype(np.float32))
    index.add_features(rng.normal(size=(40, 6)).astype(np.float32), labels=np.arange(40) % 3)
    return index


def _binary_index(bits: int = 16) -> tuple[BinaryIndex, np.ndarray]:
    features = np.random.default_rng(1).normal(size=(40, bits)).astype(np.float32)
    index = BinaryIndex(bits, metadata={"method": "sign"})
    index.add(sign_codes(features), labels=np.arange(40) % 3)
    return index, features


def test_load_any_reads_either_kind_as_itself(tmp_path):
    dpq, queries = _dpq_index(), np.random.default_rng(2).normal(size=(5, 6)).astype(np.float32)
    binary, features = _binary_index()
    dpq_path, binary_path = dpq.save(tmp_path / "dpq.npz"), binary.save(tmp_path / "bin.npz")
    assert (index_kind(dpq_path), index_kind(binary_path)) == ("dpq", "binary")
    loaded_dpq, loaded_binary = load_any(dpq_path), load_any(binary_path, mmap=True)
    assert isinstance(loaded_dpq, DPQIndex) and isinstance(loaded_binary, BinaryIndex)
    assert (kind_of(loaded_dpq), kind_of(loaded_binary)) == ("dpq", "binary")
    for before, after, query in ((dpq, loaded_dpq, queries), (binary, loaded_binary, features)):
        expected = search_features(before, query, 7)
        found = search_features(after, query, 7)
        np.testing.assert_array_equal(found[1], expected[1])
        np.testing.assert_array_equal(found[0], expected[0])
    assert loaded_binary.metadata == {"method": "sign"}
    assert load_any(dpq_path, mmap=True).read_only


def test_a_damaged_file_or_an_unknown_kind_is_refused(tmp_path):
    binary, _ = _binary_index()
    path = binary.save(tmp_path / "bin.npz")
    header, arrays = read_index_file(path)
    for name in ("array_sha256", "checksum_sha256", "format", "format_version"):
        header.pop(name, None)
    write_index_file(tmp_path / "odd.npz", {**header, "kind": "graph"}, arrays)
    with pytest.raises(IndexFileError, match="kind 'graph'"):
        load_any(tmp_path / "odd.npz")
    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF  # in the zip directory or the header: the file no longer reads
    (tmp_path / "bad.npz").write_bytes(bytes(data))
    with pytest.raises(IndexFileError):
        load_any(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        load_any(tmp_path / "absent.npz")
    with pytest.raises(TypeError, match="DPQIndex or a BinaryIndex"):
        kind_of(object())  # type: ignore[arg-type]


def test_code_lengths_and_search_modes_of_each_kind():
    dpq = _dpq_index(levels=3, size=256)
    assert code_lengths(dpq) == (8, 16, 24) and search_mode(dpq) == "aqd"
    dpq.search_mode = "ip"
    assert search_mode(dpq) == "ip"
    binary, _ = _binary_index(24)
    assert code_lengths(binary) == (24,) and search_mode(binary) == "hamming"


def test_which_codes_go_together():
    dpq, other_books = _dpq_index(0), _dpq_index(1)
    binary16, binary32 = _binary_index(16)[0], _binary_index(32)[0]
    assert same_codes(dpq, _dpq_index(0)) and not same_codes(dpq, other_books)
    assert same_codes(binary16, BinaryIndex(16)) and not same_codes(binary16, binary32)
    assert not same_codes(dpq, binary16)
    check_compatible(dpq, _dpq_index(0))
    check_compatible(binary16, BinaryIndex(16))
    with pytest.raises(ValueError, match="codebooks differ"):
        check_compatible(dpq, other_books, source="model m")
    with pytest.raises(ValueError, match="model m makes 32-bit codes but the index holds 16"):
        check_compatible(binary16, binary32, source="model m")
    with pytest.raises(ValueError, match="makes binary codes but the index holds dpq codes"):
        check_compatible(dpq, binary16)


def test_binary_queries_are_codes_or_the_signs_of_features():
    binary, features = _binary_index()
    np.testing.assert_array_equal(binary_queries(binary, features), binary.codes)
    codes = binary.codes[:3]
    assert binary_queries(binary, codes) is codes
    np.testing.assert_array_equal(
        np.unpackbits(binary_queries(binary, features), axis=1), features > 0
    )
    with pytest.raises(ValueError, match=r"float \(nq, 16\) features"):
        binary_queries(binary, features[:, :8])


def test_a_binary_index_refuses_the_options_of_a_dpq_index():
    binary, features = _binary_index()
    distances, ids = search_features(binary, features[:2], 3)
    assert (ids[:, 0] == [0, 1]).all() and (distances[:, 0] == 0).all()  # each finds itself
    assert search_features(binary, features[:2], 3, num_levels=None)[1].shape == (2, 3)
    with pytest.raises(ValueError, match="nprobe, num_levels apply to a DPQ index"):
        search_features(binary, features[:2], 3, num_levels=1, nprobe=2)
    dpq = _dpq_index()
    one_level = search_features(dpq, dpq.decode(dpq.codes[:2]), 3, num_levels=1)
    np.testing.assert_array_equal(
        one_level[1], dpq.search(dpq.decode(dpq.codes[:2]), 3, num_levels=1)[1]
    )
