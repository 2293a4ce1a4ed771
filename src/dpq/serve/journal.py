"""The write journal: acknowledged adds and deletes, appended and fsynced before the answer.

An index file is rewritten only as a whole (``DPQIndex.save``: temp file, rename), which at a
million items costs far more than one add. So the service appends each write to a journal
beside the index (``<index>.journal``), fsyncs it, and only then acknowledges; on start it
replays the journal onto the loaded index, and from time to time (and at shutdown) it
*compacts*: saves the index atomically and starts a fresh journal.

Format: JSON lines, no pickle. The first line is a header ``{"format": "dpq-serve-journal",
"version": 2, "journal_id": ..., "codebook_sha256": ..., "base": {"items", "ids_sha256"}}``
(``base``: :func:`index_state` of the index the journal continues); every further line is one record
``{"seq", "op": "add" | "remove", "ids", ...payload, "sha256"}`` whose sha256 covers the
record's other fields. A record cut short by a crash (the last line, unterminated or failing
its checksum) was never acknowledged and is dropped; a damaged line before the last one is
an error.

Which records a saved index already holds: compaction writes
``metadata["serve"] = {"journal_id", "journal_seq"}`` into the index before saving it, then
replaces the journal by an empty one with a new id. On start, records of the journal named
in the index's metadata up to that seq are skipped; a journal with another id is replayed
whole (a crash between the two steps leaves the old journal, whose records are all skipped).
:func:`saved_position` builds that metadata, :func:`replay_journal` reads it and applies
the rest of the journal. A journal replayed whole must continue the index it is replayed
onto: its header's ``base`` must equal :func:`index_state` of the loaded index, else replay
is refused naming both (an older index file restored beside a newer journal would otherwise
take writes made to another state), unless forced.

Durability: a record is written with ``os.write`` on an unbuffered descriptor and fsynced
before :meth:`Journal.append` returns. When either fails (a full disk: ENOSPC), the file is
truncated back to the end of the last good record and :class:`WriteFailedError` raised:
the journal is exactly as before, nothing is left in a buffer to be written later, and the
next append (once space returns) follows the last good record.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dpq.atomic import write_text_atomic

if TYPE_CHECKING:
    from dpq.index import DPQIndex

__all__ = [
    "Journal",
    "JournalError",
    "JournalRecord",
    "Replay",
    "WriteFailedError",
    "index_state",
    "journal_path",
    "replay_journal",
    "saved_position",
]

FORMAT_NAME = "dpq-serve-journal"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 headers have no "base"
# The key of the index metadata that says which journal records the saved index holds.
METADATA_KEY = "serve"


class JournalError(ValueError):
    """A journal that cannot be replayed (damaged before its last line, or of another index)."""


class WriteFailedError(RuntimeError):
    """A write that could not be stored (e.g. the disk is full): nothing of it was kept (the
    journal is as it was before), and it must not be acknowledged (the service answers 503)."""


def index_state(index: DPQIndex) -> dict[str, Any]:
    """What identifies the items an index holds: ``{"items": n, "ids_sha256": sha256 of its
    ids sorted, as int64 little-endian}``. A journal header records it for the index the
    journal continues."""
    ids = np.sort(np.asarray(index.ids, dtype="<i8"))
    return {"items": int(len(ids)), "ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest()}


def _describe_state(state: Any) -> str:
    if not isinstance(state, dict):
        return "an unknown state"
    digest = str(state.get("ids_sha256", "?"))[:12]
    return f"{int(state.get('items', 0)):,} items (ids sha256 {digest})"


def journal_path(index_path: str | os.PathLike[str]) -> Path:
    """The journal beside an index file: ``<index path>.journal``."""
    path = Path(index_path)
    return path.with_name(path.name + ".journal")


@dataclass(frozen=True)
class JournalRecord:
    """One acknowledged write: ``op`` "add" or "remove", its ``seq`` and its JSON payload."""

    seq: int
    op: str
    payload: dict[str, Any]


def _digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class Journal:
    """An append-only JSON-lines journal (see the module docstring).

    Not thread-safe: the service appends from one writer at a time.

    Args:
        path: the journal file (see :func:`journal_path`).
        codebook_sha256: the index's codebook hash; a journal of other codebooks is refused.
        fsync: fsync after every append (on by default; off only for throw-away data).
        writer: writes bytes to a file descriptor and returns how many it wrote (``os.write``;
            tests inject one that fails as a full disk does). Also the attribute ``writer``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        codebook_sha256: str,
        fsync: bool = True,
        writer: Callable[[int, bytes], int] = os.write,
    ):
        self.path = Path(path)
        self.codebook_sha256 = codebook_sha256
        self.fsync = fsync
        self.journal_id = ""
        self.base: dict[str, Any] | None = None
        self.last_seq = 0
        self.records_since_reset = 0
        self.dropped_tail = False
        self.writer = writer
        self._fd: int | None = None
        self._good_size = 0  # bytes of the file up to the end of the last good record
        self._torn = False  # a failed append could not be cut off: refuse appends until it is

    # ---- reading ------------------------------------------------------------------------------

    def read(self) -> tuple[str, list[JournalRecord]]:
        """(journal_id, records) of the file on disk; ("", []) when there is none.

        Raises JournalError for a file of another format or codebooks, or a damaged line that
        is not the last one. A damaged last line (a write cut by a crash) is dropped and
        :attr:`dropped_tail` set.
        """
        if not self.path.is_file():
            return "", []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        # a complete file ends with "\n": the last element is then empty
        complete, tail = lines[:-1], lines[-1]
        self.dropped_tail = bool(tail.strip())
        if not complete:  # the header is written atomically: this is no journal of ours
            raise JournalError(
                f"{self.path} has no header line; it is not a dpq serve journal. Move it away."
            )
        header = self._parse(complete[0], 1, last=False)
        if header.get("format") != FORMAT_NAME or header.get("version") not in READABLE_VERSIONS:
            raise JournalError(
                f"{self.path} is not a dpq serve journal of version {FORMAT_VERSION} "
                f"(header {header!r}); move it away to start without it."
            )
        self.base = header.get("base") if isinstance(header.get("base"), dict) else None
        if header.get("codebook_sha256") != self.codebook_sha256:
            raise JournalError(
                f"{self.path} belongs to an index with other codebooks (sha256 "
                f"{str(header.get('codebook_sha256'))[:12]}, this index "
                f"{self.codebook_sha256[:12]}); its writes cannot be applied here. Use the index "
                "it was written for, or move the journal away."
            )
        records = []
        for number, line in enumerate(complete[1:], start=2):
            fields = self._parse(line, number, last=number == len(complete))
            if fields is None:
                self.dropped_tail = True
                break
            seq, op = fields.pop("seq"), fields.pop("op")
            records.append(JournalRecord(int(seq), str(op), fields))
        return str(header["journal_id"]), records

    def _parse(self, line: bytes, number: int, last: bool) -> dict[str, Any] | None:
        """The fields of one line with its checksum verified; None for a torn last line."""
        try:
            fields = json.loads(line)
            stored = fields.pop("sha256")
            if stored != _digest(fields):
                raise ValueError("checksum mismatch")
            if number > 1 and not {"seq", "op"} <= fields.keys():
                raise ValueError("no seq/op")
            return fields
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if last:
                return None
            raise JournalError(
                f"{self.path} line {number} is damaged ({exc}) and later lines follow it: the "
                "file was modified. Restore it from a backup or move it away (its writes are lost)."
            ) from None

    # ---- writing ------------------------------------------------------------------------------

    def reset(self, base: dict[str, Any] | None = None) -> str:
        """Replace the file by an empty journal with a new id (atomically) that continues the
        index state ``base`` (:func:`index_state`); open it for appending. Returns the new
        journal id. When the new file cannot be written (a full disk), the journal stays as
        it was, open, and the OSError propagates."""
        journal_id = uuid.uuid4().hex
        header: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "journal_id": journal_id,
            "codebook_sha256": self.codebook_sha256,
            "base": None if base is None else dict(base),
        }
        header["sha256"] = _digest(header)
        write_text_atomic(self.path, json.dumps(header, sort_keys=True) + "\n")
        self.close()
        self.journal_id, self.base = journal_id, header["base"]
        self.last_seq = 0
        self.records_since_reset = 0
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._good_size = os.fstat(self._fd).st_size
        self._torn = False
        return journal_id

    def _cut_back(self) -> None:
        """Truncate the file to the end of the last good record (and fsync that)."""
        assert self._fd is not None
        os.ftruncate(self._fd, self._good_size)
        if self.fsync:
            os.fsync(self._fd)
        self._torn = False

    def append(self, op: str, payload: dict[str, Any]) -> int:
        """Write one record and (by default) fsync it; returns its seq. After this returns the
        write survives a crash of the process (and, with fsync, of the machine).

        Raises WriteFailedError when the record could not be written or synced; the file
        is then cut back to the last good record (see the module docstring)."""
        if self._fd is None:
            raise RuntimeError("the journal is not open; call reset() first.")
        seq = self.last_seq + 1
        fields = {"seq": seq, "op": op, **payload}
        fields["sha256"] = _digest(fields)
        data = (json.dumps(fields, sort_keys=True) + "\n").encode()
        try:
            if self._torn:
                self._cut_back()
            view = memoryview(data)
            while view:
                written = self.writer(self._fd, view)
                if written <= 0:
                    raise OSError(errno.EIO, "the write made no progress")
                view = view[written:]
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            self._torn = True
            try:
                self._cut_back()
            except OSError:
                pass  # still torn: the next append cuts it back first, or refuses
            raise WriteFailedError(
                f"the write could not be stored in the journal ({exc.strerror or exc}), so "
                "nothing was changed; retry once the disk has space again."
            ) from None
        self._good_size += len(data)
        self.last_seq = seq
        self.records_since_reset += 1
        return seq

    def size_bytes(self) -> int:
        """Bytes of the journal file now (0 when absent)."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------- the index and its journal


@dataclass(frozen=True)
class Replay:
    """What :func:`replay_journal` did: ``applied`` records (adds and removes) of the
    journal, ``added`` the info (name, time, ...) by id of the items added through the
    service that the index now holds, ``next_id`` the first id no add has used, and
    ``dropped_tail`` whether a last record cut short by a crash was dropped."""

    applied: int
    added: dict[int, dict[str, Any]]
    next_id: int
    dropped_tail: bool


def saved_position(
    journal: Journal, next_id: int, added: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """The index metadata (under ``metadata["serve"]``) to save with an index that holds
    every record of ``journal`` so far: the journal's id and last seq, the next id to give
    and the info of items added through the service."""
    return {
        "journal_id": journal.journal_id,
        "journal_seq": journal.last_seq,
        "next_id": int(next_id),
        "added": {str(i): info for i, info in sorted(added.items())},
    }


def replay_journal(journal: Journal, index: DPQIndex, force: bool = False) -> Replay:
    """Apply onto ``index`` (as loaded from its file) the records of ``journal`` it does not
    hold yet, in order (see the module docstring); the journal file is left as it is.

    Raises JournalError for a journal that cannot be read (:meth:`Journal.read`), holds a
    record of an unknown operation, or continues another state of the index than the one
    loaded (unless ``force``: then its records are applied all the same).
    """
    position = index.metadata.get(METADATA_KEY)
    position = position if isinstance(position, dict) else {}
    added = {int(k): dict(v) for k, v in (position.get("added") or {}).items()}
    next_id = int(position.get("next_id", 0))
    journal_id, records = journal.read()
    same_journal = journal_id == position.get("journal_id")
    held = int(position.get("journal_seq", 0)) if same_journal else 0
    if records and not same_journal and journal.base is not None and not force:
        state = index_state(index)
        if state != journal.base:
            raise JournalError(
                f"{journal.path} continues an index of {_describe_state(journal.base)}, but "
                f"the index file holds {_describe_state(state)}: its {len(records)} write(s) "
                "were made to another state of the index (an older or newer index file?). "
                "Restore the index file the journal belongs to, move the journal away (its "
                "writes are lost), or replay it anyway with --force-journal."
            )
    applied = 0
    for record in records:
        if record.seq <= held:
            continue
        ids = np.asarray(record.payload["ids"], np.int64)
        if record.op == "add":
            labels = record.payload.get("labels")
            index.add(
                np.asarray(record.payload["codes"]).reshape(len(ids), index.num_levels),
                ids=ids,
                labels=None if labels is None else np.asarray(labels),
            )
            for item_id, info in zip(ids, record.payload.get("items") or [], strict=False):
                added[int(item_id)] = dict(info)
            next_id = max(next_id, int(ids.max()) + 1)
        elif record.op == "remove":
            index.remove(ids)
            for item_id in ids:
                added.pop(int(item_id), None)
        else:
            raise JournalError(
                f"{journal.path} holds an unknown operation {record.op!r}; it was written by "
                "another program: move it away to start without it."
            )
        applied += 1
    return Replay(applied, added, next_id, journal.dropped_tail)
