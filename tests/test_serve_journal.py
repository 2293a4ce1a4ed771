"""dpq.serve.journal: the journal file (torn tail dropped, damage refused, a failed append
cut back), the index state it continues, and its replay onto an index alone (no collection,
no HTTP): which records apply, what replay returns, which base it refuses."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")

from dpq.index import DPQIndex  # noqa: E402
from dpq.serve.journal import (  # noqa: E402
    METADATA_KEY,
    Journal,
    JournalError,
    WriteFailedError,
    index_state,
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


class FullDisk:
    """A writer (``Journal.writer``) that writes ``allow`` more bytes, then fails as a full
    disk does (ENOSPC); ``allow=None``: writes everything."""

    def __init__(self, allow: int | None = 0) -> None:
        self.allow = allow

    def __call__(self, fd: int, data) -> int:
        if self.allow is None:
            return os.write(fd, data)
        if self.allow <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = os.write(fd, bytes(data[: self.allow]))
        self.allow -= written
        return written


@pytest.mark.parametrize("allow", [0, 10, 60])
def test_a_failed_append_leaves_the_journal_exactly_as_before(tmp_path, allow):
    """ENOSPC at the start of a record or part-way through it (a torn record): the file is
    cut back to the last good record, nothing waits in a buffer to be written later, and the
    next append, once there is space, follows the last good record with the next seq."""
    disk = FullDisk(None)
    journal = Journal(tmp_path / "j", "abc", writer=disk)
    journal.reset({"items": 0, "ids_sha256": "x"})
    journal.append("add", {"ids": [1], "codes": [[0]]})
    before = journal.path.read_bytes()
    disk.allow = allow
    for _ in range(3):  # the service keeps trying while the disk is full
        with pytest.raises(WriteFailedError, match="No space left on device.*nothing was changed"):
            journal.append("add", {"ids": [2], "codes": [[1]]})
        assert journal.path.read_bytes() == before
    disk.allow = None  # space is back
    assert journal.append("add", {"ids": [3], "codes": [[2]]}) == 2
    journal.close()
    _, records = Journal(journal.path, "abc").read()
    assert [(r.seq, r.payload["ids"]) for r in records] == [(1, [1]), (2, [3])]


def test_a_journal_refuses_to_replay_onto_another_state_unless_forced(tmp_path):
    """Issue 24: an older index file restored beside a newer journal took the journal's
    writes silently (ids 1797-2419 missing, 2420+ present). The header names the state it
    continues; another one is refused naming both; forcing replays all the same."""
    index = _index()
    journal = Journal(tmp_path / "j", index.codebook_sha256, fsync=False)
    newer = _index()
    newer.add(np.zeros((3, LEVELS), np.uint8), ids=[10, 11, 12], labels=np.zeros(3, np.int64))
    journal.reset(index_state(newer))  # the journal continues the 13-item index
    _add(journal, [13], code=1, label=1, name="after")
    journal.close()
    older = _index()  # the 10-item index file restored
    with pytest.raises(JournalError, match=r"continues an index of 13 items .* holds 10 items"):
        replay_journal(Journal(journal.path, older.codebook_sha256), older)
    assert older.ntotal == 10  # nothing was applied
    replay = replay_journal(Journal(journal.path, older.codebook_sha256), older, force=True)
    assert replay.applied == 1 and older.contains(13)
    right = _index()
    right.add(np.zeros((3, LEVELS), np.uint8), ids=[10, 11, 12], labels=np.zeros(3, np.int64))
    assert replay_journal(Journal(journal.path, right.codebook_sha256), right).applied == 1


def test_index_state_follows_the_ids_not_their_order():
    index = _index()
    state = index_state(index)
    assert state["items"] == 10 and len(state["ids_sha256"]) == 64
    shuffled = DPQIndex(index.codebooks)
    order = np.random.default_rng(1).permutation(10)
    shuffled.add(index.codes[order], ids=index.ids[order], labels=index.labels[order])
    assert index_state(shuffled) == state
    index.remove([4])
    assert index_state(index)["items"] == 9 and index_state(index) != state


def test_a_version_1_journal_is_still_read(tmp_path):
    """Journals written before the header named its base: read, replayed without the check."""
    index = _index()
    header = {"format": "dpq-serve-journal", "version": 1, "journal_id": "old",
              "codebook_sha256": index.codebook_sha256}  # fmt: skip
    header["sha256"] = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()
    record = {"seq": 1, "op": "remove", "ids": [3]}
    record["sha256"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    path = tmp_path / "j"
    path.write_text(json.dumps(header) + "\n" + json.dumps(record) + "\n")
    replay = replay_journal(Journal(path, index.codebook_sha256), index)
    assert replay.applied == 1 and not index.contains(3)
