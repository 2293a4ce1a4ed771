"""Index files larger than memory: append items to a file, merge files into one.

Both stream: the sources are memory-mapped (``DPQIndex.load(..., mmap=True)``, checksums
verified), the output is written cell block by cell block (about 2^20 items at a time) into
a temporary file that replaces the target when complete. Memory therefore stays around the
size of one block plus the items being appended, whatever the size of the files (the id
checks hold 8 bytes per item: see each function). numpy only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpq.index import cells as cell_math
from dpq.index.dpq_index import DPQIndex
from dpq.index.storage import StreamedArray, write_index_file

__all__ = ["append_to_index_file", "merge_index_files"]

# Items per written block.
_BLOCK_ITEMS = 1 << 20


@dataclass
class _Source:
    """One input of a merge: an index (grouped) and a shift added to its ids."""

    index: DPQIndex
    id_shift: int = 0

    def __post_init__(self) -> None:
        self.columns = self.index.store.file_columns()
        self.offsets = self.index.cell_offsets

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        values = self.columns[name][start:stop]
        return values + self.id_shift if name == "ids" and self.id_shift else values


def _merged_column(sources: Sequence[_Source], name: str) -> StreamedArray:
    """The cell-by-cell merge of one column of the sources, streamed in blocks."""
    first = sources[0].columns[name]
    offsets = cell_math.merged_offsets([s.offsets for s in sources])
    row_shape = first.shape[1:]

    def chunks() -> Iterator[np.ndarray]:
        for a, b in cell_math.cell_blocks(offsets, _BLOCK_ITEMS):
            size = int(offsets[b] - offsets[a])
            if size > _BLOCK_ITEMS or len(sources) == 1:  # one big cell: sources in turn
                for s in sources:
                    for start in range(int(s.offsets[a]), int(s.offsets[b]), _BLOCK_ITEMS):
                        yield s.rows(name, start, min(start + _BLOCK_ITEMS, int(s.offsets[b])))
                continue
            block = np.empty((size, *row_shape), first.dtype)
            positions = cell_math.interleave_positions([s.offsets for s in sources], a, b)
            for s, where in zip(sources, positions, strict=True):
                block[where] = s.rows(name, int(s.offsets[a]), int(s.offsets[b]))
            yield block

    return StreamedArray(first.dtype, (int(offsets[-1]), *row_shape), chunks)


def _write_merged(
    path: Path, sources: Sequence[_Source], next_id: int, metadata: dict[str, Any]
) -> Path:
    base = sources[0].index
    offsets = cell_math.merged_offsets([s.offsets for s in sources])
    arrays: dict[str, np.ndarray | StreamedArray] = {"codebooks": base.codebooks}
    for name in sources[0].columns:
        arrays[name] = _merged_column(sources, name)
    if base.partition_levels:
        arrays["offsets"] = offsets
    header = base.file_header(ntotal=int(offsets[-1]), next_id=next_id, metadata=metadata)
    return write_index_file(path, header, arrays)


def _ids_present(index: DPQIndex, ids: np.ndarray, shift: int = 0) -> np.ndarray:
    """bool (len(ids),): which ids (any order) are among index's ids + shift; reads the
    index's ids in blocks, so memory is O(len(ids) + block)."""
    wanted = np.sort(ids)
    found = np.zeros(len(wanted), bool)
    stored = index.ids
    for start in range(0, len(stored), _BLOCK_ITEMS):
        block = stored[start : start + _BLOCK_ITEMS] + shift
        pos = np.searchsorted(wanted, block)
        hit = pos < len(wanted)
        hit[hit] = wanted[pos[hit]] == block[hit]
        found[pos[hit]] = True
    out = np.zeros(len(ids), bool)
    out[np.argsort(ids, kind="stable")] = found
    return out


def append_to_index_file(
    path: str | os.PathLike[str], codes: Any, ids: Any = None, labels: Any = None
) -> np.ndarray:
    """Add coded items to the index file at ``path`` (rewritten atomically); returns their
    int64 (n,) ids.

    codes: integer (n, L) made with the file's codebooks (check with
    ``DPQIndex.load(path, mmap=True).check_compatible(model_codebooks)`` and encode with
    that index's ``encode``); ids default to continuing the file's counter; labels are
    required if and only if the file has labels. The file's checksum is verified, the new
    items join their cells, and the result is a version-2 file (a version-1 file is read
    into memory). Memory: the new items, one block, and their ids sorted; time: one pass
    over the file.
    """
    target = Path(path)
    existing = DPQIndex.load(target, mmap=True)
    added = DPQIndex(
        existing.codebooks,
        existing.assignment,
        existing.metadata,
        search_mode=existing.search_mode,
        partition_levels=existing.partition_levels,
    )
    added.store.advance_next_id(existing.next_id)
    codes_arr = added.store.check_codes(codes)
    if ids is not None:
        id_arr = added.store.check_new_ids(ids, codes_arr.shape[0])
        clash = _ids_present(existing, id_arr)
        if clash.any():
            raise ValueError(
                f"{int(clash.sum())} id(s) are already in {target} (first: "
                f"{int(id_arr[clash][0])}); give other ids or leave them out to continue "
                "the file's counter."
            )
    has_labels = existing.labels is not None
    if existing.ntotal and (labels is not None) != has_labels:
        raise ValueError(
            f"{target} {'has' if has_labels else 'has no'} labels: pass labels for "
            f"{'each of' if has_labels else 'none of'} the new items."
        )
    if existing.ntotal and labels is not None:
        shape = tuple(np.shape(labels)[1:])
        if shape != existing.labels.shape[1:]:
            raise ValueError(
                f"labels shape per item must be {existing.labels.shape[1:]} as in {target}; "
                f"got {shape}."
            )
    new_ids = added.add(codes_arr, ids=ids, labels=labels)
    # an empty file takes the new items' labelling
    sources = [_Source(existing), _Source(added)] if existing.ntotal else [_Source(added)]
    _write_merged(target, sources, max(existing.next_id, added.next_id), existing.metadata)
    return new_ids


def merge_index_files(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    renumber_ids: bool = False,
) -> Path:
    """Merge index files encoded separately with the same codebooks into one file at
    ``out`` (written atomically; it may be one of the inputs). Returns its path.

    The inputs must share codebooks (checked by their sha256), assignment, search mode,
    partition_levels and labelling; their checksums are verified. In every cell the items
    of the first file come first, then the second's, ..., so merging files built from
    consecutive slices of a collection gives exactly the index built from all of it.
    Ids must be disjoint; renumber_ids=True instead shifts each file's ids by the sum of
    the earlier files' ``next_id`` (for slices encoded with default ids 0..n-1). Memory: one
    block plus 8 bytes per item for the id check.
    """
    if len(paths) < 1:
        raise ValueError("merge_index_files needs at least one input file.")
    indexes = [DPQIndex.load(p, mmap=True) for p in paths]
    first, first_path = indexes[0], Path(paths[0])
    for index, path in zip(indexes[1:], paths[1:], strict=True):
        if index.codebook_sha256 != first.codebook_sha256:
            raise ValueError(
                f"{path} was encoded with other codebooks than {first_path} (sha256 "
                f"{index.codebook_sha256[:12]} vs {first.codebook_sha256[:12]}); only files "
                "encoded with the same model can be merged."
            )
        for what in ("assignment", "search_mode", "partition_levels"):
            if getattr(index, what) != getattr(first, what):
                raise ValueError(
                    f"{path} has {what}={getattr(index, what)!r} but {first_path} has "
                    f"{getattr(first, what)!r}; make them equal first (e.g. load, "
                    "repartition and save)."
                )
        labels, first_labels = index.labels, first.labels
        if (labels is None) != (first_labels is None) or (
            labels is not None
            and (labels.shape[1:] != first_labels.shape[1:] or labels.dtype != first_labels.dtype)
        ):
            raise ValueError(f"{path} and {first_path} have different kinds of labels.")
    shifts = [0] * len(indexes)
    if renumber_ids:
        shifts = np.concatenate([[0], np.cumsum([ix.next_id for ix in indexes])[:-1]]).tolist()
    else:
        all_ids = np.concatenate([ix.ids for ix in indexes])
        unique, counts = np.unique(all_ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(
                f"{int((counts > 1).sum())} id(s) appear in more than one input (first: "
                f"{int(unique[counts > 1][0])}); give the slices disjoint ids when encoding, "
                "or renumber them (`dpq index merge --renumber-ids`; Python: renumber_ids=True)."
            )
    sources = [_Source(ix, int(shift)) for ix, shift in zip(indexes, shifts, strict=True)]
    next_id = max(ix.next_id + int(shift) for ix, shift in zip(indexes, shifts, strict=True))
    metadata = {**first.metadata, "merged_from": [str(Path(p)) for p in paths]}
    return _write_merged(Path(out), sources, next_id, metadata)
