"""dpq.serve.journal: the journal file (torn tail dropped, damage refused) and its replay onto
an index alone (no collection, no HTTP): which records apply, what replay returns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")

from dpq.index import DPQIndex  # noqa: E402
from dpq.serve.journal import (  # noqa: E402
    METADATA_KEY,
    Journal,
    JournalError,
    journal_path,
    replay_journal,
    saved_position,
)

LEVELS, K, DIM = 2, 4, 3


def test_journal_torn_tail_dropped_and_damage_refused(tmp_path):
    path = tmp_path / "x.index.npz.journal"
    journal = Journal(path, "abc")
    journal.reset()
    journal.append("add", {"ids": [1], "codes": [[0]]})
    journal.append("remove", {"ids": [1]})
    journal.close()
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])  # the last record cut short by a crash
    reader = Journal(path, "abc")
    _, records = reader.read()
    assert [r.op for r in records] == ["add"] and reader.dropped_tail
    lines = whole.split(b"\n")
    lines[1] = lines[1].replace(b'"ids": [1]', b'"ids": [2]')  # tampered, with a line after it
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(JournalError, match="line 2 is damaged"):
        Journal(path, "abc").read()
    with pytest.raises(JournalError, match="other codebooks"):
        path.write_bytes(whole)
        Journal(path, "def").read()
    assert journal_path("a/b.npz") == Path("a/b.npz.journal")


def _index(labelled: bool = True) -> DPQIndex:
    """Ten items (ids 0..9, labels id % 3) over fixed random codebooks."""
    rng = np.random.default_rng(0)
    index = DPQIndex(rng.normal(size=(LEVELS, K, DIM)).astype(np.float32))
    features = rng.normal(size=(10, DIM)).astype(np.float32)
    index.add_features(features, labels=np.arange(10) % 3 if labelled else None)
    return index


def _add(journal: Journal, ids: list[int], code: int, label: int, name: str) -> int:
    items = [{"added_at": "2026-01-01T00:00:00Z", "image": False, "name": name}] * len(ids)
    payload = {"ids": ids, "codes": [[code] * LEVELS] * len(ids), "labels": [label] * len(ids)}
    return journal.append("add", {**payload, "items": items})


def test_replay_applies_adds_and_removes_in_order(tmp_path):
    journal = Journal(tmp_path / "j", _index().codebook_sha256, fsync=False)
    journal.reset()
    _add(journal, [10, 11], code=1, label=2, name="a")
    journal.append("remove", {"ids": [3, 10]})
    _add(journal, [12], code=3, label=0, name="b")
    journal.close()
    index = _index()
    replay = replay_journal(Journal(journal.path, index.codebook_sha256), index)
    assert (replay.applied, replay.next_id, replay.dropped_tail) == (3, 13, False)
    assert sorted(index.ids.tolist()) == [0, 1, 2, 4, 5, 6, 7, 8, 9, 11, 12]
    assert index.codes_of([11]).tolist() == [[1, 1]] and index.codes_of([12]).tolist() == [[3, 3]]
    assert index.labels_of([11, 12]).tolist() == [2, 0]
    assert {i: info["name"] for i, info in replay.added.items()} == {11: "a", 12: "b"}


def test_replay_skips_what_the_saved_index_holds(tmp_path):
    index = _index()
    journal = Journal(tmp_path / "j", index.codebook_sha256, fsync=False)
    journal.reset()
    _add(journal, [10], code=1, label=1, name="held")
    index.add(np.ones((1, LEVELS), np.uint8), ids=[10], labels=np.array([1]))  # as applied live
    index.metadata[METADATA_KEY] = saved_position(journal, 11, {10: {"name": "held"}})
    _add(journal, [11], code=2, label=1, name="new")
    journal.close()
    replay = replay_journal(Journal(journal.path, index.codebook_sha256), index)
    assert replay.applied == 1 and index.ntotal == 12 and replay.next_id == 12
    assert replay.added[10] == {"name": "held"} and replay.added[11]["name"] == "new"
    assert index.metadata[METADATA_KEY]["journal_seq"] == 1


def test_a_journal_of_another_id_is_replayed_whole(tmp_path):
    """A journal whose id the index's metadata does not name is applied from its first
    record (the index holds none of it)."""
    index = _index(labelled=False)
    journal = Journal(tmp_path / "j", index.codebook_sha256, fsync=False)
    journal.reset()
    index.metadata[METADATA_KEY] = saved_position(journal, 10, {})
    journal.reset()  # a new id, unknown to the index's metadata
    journal.append("add", {"ids": [10], "codes": [[0, 0]], "labels": None, "items": []})
    journal.close()
    replay = replay_journal(Journal(journal.path, index.codebook_sha256), index)
    assert replay.applied == 1 and index.contains(10) and replay.added == {}


def test_replay_without_a_journal_and_with_a_torn_tail(tmp_path):
    index = _index()
    replay = replay_journal(Journal(tmp_path / "none", index.codebook_sha256), index)
    assert (replay.applied, replay.added, replay.next_id, replay.dropped_tail) == (0, {}, 0, False)
    journal = Journal(tmp_path / "j", index.codebook_sha256, fsync=False)
    journal.reset()
    _add(journal, [10], code=1, label=1, name="kept")
    _add(journal, [11], code=1, label=1, name="torn")
    journal.close()
    journal.path.write_bytes(journal.path.read_bytes()[:-5])
    replay = replay_journal(Journal(journal.path, index.codebook_sha256), index)
    assert replay.applied == 1 and replay.dropped_tail and not index.contains(11)


def test_replay_refuses_an_unknown_operation(tmp_path):
    index = _index()
    journal = Journal(tmp_path / "j", index.codebook_sha256, fsync=False)
    journal.reset()
    journal.append("rename", {"ids": [1]})
    journal.close()
    with pytest.raises(JournalError, match="unknown operation 'rename'"):
        replay_journal(Journal(journal.path, index.codebook_sha256), index)
