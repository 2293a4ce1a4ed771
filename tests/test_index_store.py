"""dpq.index.store alone: appending into a tail, grouping into cells, removing, lookups by
id, cached prefix norms, cell tables, attaching file arrays, and the read-only guard."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shrinking_codebooks
from dpq.index.codebooks import check_codebooks
from dpq.index.store import TAIL_FRACTION, CodeStore, IdOrder

L, K, D = 3, 8, 4


@pytest.fixture
def books() -> np.ndarray:
    return check_codebooks(shrinking_codebooks(L, K, D))


@pytest.fixture
def codes() -> np.ndarray:
    return np.random.default_rng(1).integers(0, K, size=(120, L))


def cells_of(codes: np.ndarray, levels: int) -> np.ndarray:
    cells = np.zeros(len(codes), np.int64)
    for level in range(levels):
        cells = cells * K + codes[:, level]
    return cells


def prefix_norms(books: np.ndarray, codes: np.ndarray, levels: int) -> np.ndarray:
    vectors = sum(books[lv].astype(np.float64)[codes[:, lv]] for lv in range(levels))
    return (vectors**2).sum(axis=1)


@pytest.mark.parametrize("partition_levels", [1, 2])
def test_appended_rows_wait_in_the_tail_until_grouped(books, codes, partition_levels):
    store = CodeStore(books, partition_levels)
    store.append(codes[:70], ids=np.arange(70))
    store.group()
    store.append(codes[70:], ids=np.arange(70, 120))
    assert store.grouped == 70 and store.ungrouped == 50
    np.testing.assert_array_equal(store.ids[70:], np.arange(70, 120))  # tail in arrival order
    store.group()
    assert store.ungrouped == 0
    cells = cells_of(store.codes[:, :L].astype(np.int64), partition_levels)
    assert np.all(np.diff(cells) >= 0)
    counts = np.bincount(cells, minlength=K**partition_levels)
    np.testing.assert_array_equal(np.diff(store.offsets), counts)
    for cell in np.unique(cells):  # insertion order inside each cell
        assert np.all(np.diff(store.ids[cells == cell]) > 0)
    np.testing.assert_array_equal(store.codes[:, :L], codes[store.ids])


def test_group_added_waits_while_the_tail_is_small(books, codes):
    store = CodeStore(books, 1)
    store.append(codes[:100])
    store.group()
    small = 100 // TAIL_FRACTION  # at most (100 + small) // TAIL_FRACTION
    store.append(codes[100 : 100 + small])
    store.group_added(only_if_large=True)
    assert store.ungrouped == small
    store.append(codes[100 + small :])
    store.group_added(only_if_large=True)
    assert store.ungrouped == 0


def test_an_unpartitioned_store_is_one_cell_without_a_tail(books, codes):
    store = CodeStore(books)
    store.append(codes[:10])
    store.append(codes[10:30])
    assert store.ungrouped == 0 and store.offsets.tolist() == [0, 30]
    np.testing.assert_array_equal(store.ids, np.arange(30))


def test_rows_of_finds_ids_in_storage_order_and_remove_keeps_the_rest(books, codes):
    store = CodeStore(books, 1)
    ids = np.arange(120) * 5 + 3
    store.append(codes, ids=ids)
    rows, found = store.rows_of([8, 4, 598])
    assert found.tolist() == [True, False, True] and rows[1] == -1
    np.testing.assert_array_equal(store.ids[rows[found]], [8, 598])
    assert store.remove([8, 4, 13]) == 2
    assert store.ntotal == 118 and not store.rows_of([8, 13])[1].any()
    assert np.all(np.diff(cells_of(store.codes[:, :1].astype(np.int64), 1)) >= 0)
    np.testing.assert_array_equal(np.diff(store.offsets).sum(), 118)
    with pytest.raises(ValueError, match="1-D integer array"):
        store.rows_of([[1.5]])


def test_id_order_extends_for_later_ids_and_rebuilds_otherwise():
    order = IdOrder()
    stored = np.array([10, 30, 20], np.int64)
    rows, found = order.rows_of(stored, [20, 30, 99])
    assert rows.tolist() == [2, 1, -1] and found.tolist() == [True, True, False]
    stored = np.append(stored, [50, 40])
    order.appended(stored, 3, np.array([50, 40]))
    assert order.order is not None  # all after 30: extended, not sorted again
    assert order.rows_of(stored, [40, 50])[0].tolist() == [4, 3]
    stored = np.append(stored, [15])
    order.appended(stored, 5, np.array([15]))
    assert order.order is None  # among the stored ids: rebuilt at the next lookup
    assert order.rows_of(stored, [15, 10])[0].tolist() == [5, 0]


def test_new_items_are_checked_before_anything_is_stored(books, codes):
    store = CodeStore(books)
    store.append(codes[:5], labels=np.arange(5))
    for call, message in (
        (lambda: store.append(codes[:1] + K, labels=[0]), "out of range"),
        (lambda: store.append(codes[:2], ids=[9, 9], labels=[0, 0]), "duplicates"),
        (lambda: store.append(codes[:1], ids=[2], labels=[0]), "already in the index"),
        (lambda: store.append(codes[:1]), "pass labels"),
        (lambda: store.append(codes[:1], labels=np.eye(1, dtype=int)), "labels shape per item"),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    assert store.ntotal == 5 and store.next_id == 5
    store.advance_next_id(40)
    store.advance_next_id(7)  # never goes back
    assert store.append(codes[:1], labels=[1]).tolist() == [40]


def test_prefix_norms_are_computed_once_and_follow_appends(books, codes):
    store = CodeStore(books)
    store.append(codes[:60])
    np.testing.assert_allclose(store.norms(L), prefix_norms(books, codes[:60], L), rtol=1e-5)
    two = store.norms(2)
    assert np.shares_memory(store.norms(2), two)  # cached
    store.append(codes[60:])  # cached prefixes are extended for the new rows
    np.testing.assert_allclose(store.norms(2), prefix_norms(books, codes, 2), rtol=1e-5)


@pytest.mark.parametrize("levels", [1, 2])
def test_cell_table_lists_the_non_empty_cells_with_their_rows(books, codes, levels):
    store = CodeStore(books, 2)
    store.append(codes[:40])
    store.group()
    table = store.cell_table(levels)
    cells = cells_of(store.codes[:, :levels].astype(np.int64), levels)
    present = np.unique(cells)
    np.testing.assert_array_equal(cells_of(table.codes, levels), present)
    for start, stop, cell in zip(table.starts, table.stops, present, strict=True):
        np.testing.assert_array_equal(np.flatnonzero(cells == cell), np.arange(start, stop))
    np.testing.assert_allclose(table.norms, prefix_norms(books, table.codes, levels), rtol=1e-5)


def test_packed_rows_are_read_as_words(books, codes):
    store = CodeStore(books)
    store.append(codes[:3])
    words, stride = store.scan_layout()
    if store.packed:  # little-endian machines: 4 uint8 codes per uint32
        assert store.code_width == 4 and stride == 1 and words.dtype == np.uint32
        assert int(words[1]) & 255 == codes[1, 0] and (int(words[1]) >> 8) & 255 == codes[1, 1]
    else:
        assert stride == store.code_width and words.shape == (3, store.code_width)


def test_attach_uses_file_arrays_and_checks_them(books, codes):
    source = CodeStore(books, 1)
    source.append(codes, labels=np.arange(120) % 3)
    columns = source.file_columns()  # grouped first
    arrays = {**columns, "offsets": source.offsets}
    attached = CodeStore(books, 1)
    attached.attach(arrays, 120, has_labels=True, mapped="somewhere.npz")
    np.testing.assert_array_equal(attached.codes, source.codes)
    np.testing.assert_array_equal(attached.labels, source.labels)
    assert attached.ungrouped == 0 and attached.mapped_from == "somewhere.npz"
    with pytest.raises(ValueError, match="memory-mapped from somewhere.npz and read-only"):
        attached.append(codes[:1], labels=[0])
    with pytest.raises(ValueError, match="read-only"):
        attached.remove([0])
    bad_offsets = {**arrays, "offsets": arrays["offsets"][::-1].copy()}
    bad_codes = {**arrays, "codes": arrays["codes"][:, :2].copy()}
    no_labels = {name: a for name, a in arrays.items() if name != "labels"}
    for broken, message in (
        (bad_offsets, "cell offsets"),
        (bad_codes, "codes are"),
        (no_labels, "labels are missing"),
    ):
        with pytest.raises(ValueError, match=message):
            CodeStore(books, 1).attach(broken, 120, has_labels=True, mapped=None)


def test_reserve_sets_the_capacity_and_appends_fill_it(books, codes):
    store = CodeStore(books)
    store.reserve(100)
    store.append(codes[:10])
    assert store.capacity == 100
    for start in range(10, 100, 30):
        store.append(codes[start : start + 30])
    assert store.capacity == 100 and store.ntotal == 100
    store.append(codes[100:])
    assert store.capacity >= 120
