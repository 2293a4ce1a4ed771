"""A served collection: an index with its write journal, and optionally a model and images.

Thread safety: searches hold a read lock, writes are serialized by a mutex and change the
index under the write lock, so a search sees a whole batch of adds or none of it. Writes are
durable before they return (see :mod:`dpq.serve.journal`). No HTTP here: the app in
:mod:`dpq.serve.app` is a thin layer over this class, and scripts may use it directly.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from dpq.atomic import write_bytes_atomic
from dpq.index import DPQIndex
from dpq.serve.images import thumbnail_png
from dpq.serve.journal import Journal, journal_path

__all__ = [
    "Collection",
    "ImageSource",
    "ReadWriteLock",
    "SearchHits",
    "load_image_source",
    "open_collection",
]

# Compact (save the index, start a new journal) once the journal grows past this.
DEFAULT_COMPACT_BYTES = 64 * 2**20
# Upper bound on offset + k: ranks beyond this are not served.
MAX_RANK = 11_000


class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds off new readers (no starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass(frozen=True)
class ImageSource:
    """The images an index was encoded from: ``images`` uint8 (N, H, W, 3) (an array, or an
    on-demand reader with the same indexing) whose row numbers are the item ids (as ``dpq
    encode --images`` assigns them), ``labels``, ``classes``."""

    name: str
    images: Any
    labels: np.ndarray | None
    classes: list[str]


def load_image_source(
    source: str,
    image_root: str | None = None,
    image_size: int | None = None,
    strip_prefix: str | None = None,
    skip_corrupt: bool = False,
) -> ImageSource:
    """A labelled image source for thumbnails and labels (:func:`dpq.data.load_source`: any
    source ``dpq encode`` reads; list files are read on demand). The one place the service
    reads sources."""
    from dpq.data import load_source

    loaded = load_source(
        source,
        image_root=image_root,
        image_size=image_size,
        strip_prefix=strip_prefix,
        skip_corrupt=skip_corrupt,
        in_memory=False,
        progress=False,
    )
    if loaded.kind == "features":
        raise ValueError(f"{source} holds features, not images; --images needs an image source.")
    return ImageSource(str(source), loaded.inputs, loaded.labels, list(loaded.classes))


@dataclass
class SearchHits:
    """One query's results: ``ids`` int64 (n,), ``distances`` float32 (n,) (smaller is
    closer; for inner-product indexes the negative inner product), JSON-ready ``labels``
    (or None), the code length ``bits``, and ``total`` items searched."""

    ids: np.ndarray
    distances: np.ndarray
    labels: list[Any] | None
    bits: int
    total: int


class _BatchingEncoder:
    """Runs the model on one thread, batching the images of every request waiting for it.

    Concurrent requests each put their images in a queue; the thread takes what is queued
    (up to ``max_batch`` images) and runs one forward pass for all of them, so 50 clients
    cost a few large batches instead of 50 small ones, without any waiting window.
    """

    def __init__(self, model: Any, max_batch: int = 64) -> None:
        self._model = model
        self._max_batch = max_batch
        self._queue: queue.Queue[tuple[np.ndarray, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="dpq-encoder", daemon=True)
        self._thread.start()

    def features(self, images: np.ndarray) -> np.ndarray:
        """float32 (n, D) features of uint8 (n, H, W, 3) images."""
        done: Future = Future()
        self._queue.put((images, done))
        return done.result()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            count = len(first[0])
            while count < self._max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)
                    break
                jobs.append(job)
                count += len(job[0])
            try:
                batch = np.concatenate([images for images, _ in jobs])
                feats = self._model.extract_features(batch, batch_size=max(len(batch), 1))
            except BaseException as exc:  # hand the error to every waiting request
                for _, done in jobs:
                    done.set_exception(exc)
                continue
            start = 0
            for images, done in jobs:
                done.set_result(feats[start : start + len(images)])
                start += len(images)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)


@dataclass
class _Added:
    """Bookkeeping of items added through the service: ``info`` per id (name, time)."""

    info: dict[int, dict[str, Any]] = field(default_factory=dict)


class Collection:
    """An index being served (see the module docstring). Build it with :func:`open_collection`.

    Args:
        index: the loaded index (journal already replayed).
        index_path: where it is saved on compaction.
        journal: its open journal.
        model: a DPQModel (or anything with ``extract_features(uint8 (N,H,W,3))`` and
            ``codebooks()``), or None: then queries are vectors or ids only.
        source: the images the index was encoded from (thumbnails, ``GET /items/{id}/image``).
        image_size: (height, width) the model reads; required with a model.
        model_info: JSON-ready facts about the model for :meth:`stats`.
        thumbnail_size: longer side of thumbnails in pixels.
        compact_bytes: compact once the journal is larger than this.
        next_id: the first id to give to added items.
        added: info of items added through the service, by id.
    """

    def __init__(
        self,
        index: DPQIndex,
        index_path: Path,
        journal: Journal,
        model: Any = None,
        source: ImageSource | None = None,
        image_size: tuple[int, int] | None = None,
        model_info: dict[str, Any] | None = None,
        thumbnail_size: int = 128,
        compact_bytes: int = DEFAULT_COMPACT_BYTES,
        next_id: int = 0,
        added: dict[int, dict[str, Any]] | None = None,
    ) -> None:
        if model is not None and image_size is None:
            raise ValueError("a model needs image_size (height, width): the size it reads.")
        self.index = index
        self.index_path = Path(index_path)
        self.journal = journal
        self.source = source
        self.image_size = image_size
        self.model_info = model_info
        self.thumbnail_size = int(thumbnail_size)
        self.compact_bytes = int(compact_bytes)
        self.items_dir = self.index_path.with_name(self.index_path.name + ".items")
        self._encoder = _BatchingEncoder(model) if model is not None else None
        self._model = model
        self._lock = ReadWriteLock()
        self._write_mutex = threading.Lock()
        self._next_id = int(next_id)
        self._added = _Added(dict(added or {}))
        self._bits_per_level = max(1, (index.codebook_size - 1).bit_length())
        self._search_params = set(inspect.signature(index.search).parameters)
        self.classes: list[str] | None = None
        meta_classes = index.metadata.get("classes")
        if isinstance(meta_classes, list):
            self.classes = [str(c) for c in meta_classes]
        elif source is not None:
            self.classes = source.classes
        self._thumbnail = lru_cache(maxsize=4096)(self._source_thumbnail)
        self.last_compaction_seconds: float | None = None

    # ---- facts ------------------------------------------------------------------------------

    @property
    def accepts_images(self) -> bool:
        return self._encoder is not None

    @property
    def code_lengths(self) -> list[int]:
        """The bits a search may use: l * log2(K) for l = 1..L."""
        return [level * self._bits_per_level for level in range(1, self.index.num_levels + 1)]

    def levels_for_bits(self, bits: int | None, name: str = "bits") -> int:
        """num_levels of a code length in bits (None: all levels). ValueError if not offered."""
        if bits is None:
            return self.index.num_levels
        if isinstance(bits, bool) or not isinstance(bits, int | np.integer):
            raise ValueError(
                f"{name} must be an integer, one of {self.code_lengths}; got {bits!r}."
            )
        if bits not in self.code_lengths:
            raise ValueError(
                f"{name} must be one of {self.code_lengths} (this index has "
                f"{self.index.num_levels} levels of {self._bits_per_level} bits); got {bits}."
            )
        return int(bits) // self._bits_per_level

    def __len__(self) -> int:
        return self.index.ntotal

    # ---- rows, labels, images -------------------------------------------------------------------

    def _label_values(self, ids: np.ndarray) -> list[Any] | None:
        """JSON-ready labels of items: class names when known, else class indices; multi-hot
        labels as lists; None for an unlabelled item (label -1) or a label-less index."""
        if self.index.label_shape is None:
            return None
        labels = self.index.labels_of(ids)
        out: list[Any] = []
        for value in labels:
            if labels.ndim == 1:
                out.append(self._label_name(int(value)) if value >= 0 else None)
            else:
                out.append([self._label_name(int(i)) for i in np.flatnonzero(value)])
        return out

    def _label_name(self, label: int) -> Any:
        if self.classes is not None and 0 <= label < len(self.classes):
            return self.classes[label]
        return label

    def _has_source_image(self, item_id: int) -> bool:
        return self.source is not None and 0 <= item_id < len(self.source.images)

    def _thumbnail_path(self, item_id: int) -> Path:
        return self.items_dir / f"{item_id}.png"

    def has_image(self, item_id: int) -> bool:
        """Whether ``GET /items/{id}/image`` can answer for this id (assumed in the index)."""
        info = self._added.info.get(item_id)
        if info is not None:  # added over HTTP: an image when one was uploaded
            return bool(info.get("image"))
        return self._has_source_image(item_id)

    def _source_thumbnail(self, item_id: int) -> bytes:
        assert self.source is not None
        return thumbnail_png(self.source.images[item_id], self.thumbnail_size)

    def thumbnail(self, item_id: int) -> bytes | None:
        """PNG bytes of the item's image as a thumbnail; None for an unknown id or an item
        without an image (an index built from features, a vector added over HTTP)."""
        with self._lock.reading():
            if not self.index.contains(item_id) or not self.has_image(item_id):
                return None
            if item_id in self._added.info:
                try:
                    return self._thumbnail_path(item_id).read_bytes()
                except FileNotFoundError:
                    return None
        return self._thumbnail(item_id)

    def item(self, item_id: int) -> dict[str, Any] | None:
        """JSON-ready facts of one item (id, label, metadata, has_image); None if unknown."""
        with self._lock.reading():
            if not self.index.contains(item_id):
                return None
            labels = self._label_values(np.array([item_id]))
            meta: dict[str, Any]
            if item_id in self._added.info:
                meta = {"added_over_http": True, **self._added.info[item_id]}
                meta.pop("image", None)
            elif self._has_source_image(item_id):
                meta = {"source": Path(self.source.name).name, "row": item_id}  # type: ignore[union-attr]
            else:
                meta = {}
            return {
                "id": int(item_id),
                "label": None if labels is None else labels[0],
                "metadata": meta,
                "has_image": self.has_image(item_id),
            }

    def random_id(self, rng: np.random.Generator) -> int | None:
        """A uniformly drawn item id (None for an empty index)."""
        with self._lock.writing():  # index order may group the latest adds
            ids = self.index.ids
            return int(ids[rng.integers(len(ids))]) if len(ids) else None

    # ---- queries ------------------------------------------------------------------------------

    def features_of_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """float32 (n, D) model features of uint8 (H, W, 3) images at :attr:`image_size`."""
        if self._encoder is None:
            raise ValueError(
                "this service has no model, so it cannot turn images into features; query "
                "with a vector or an id, or restart it with --model."
            )
        return self._encoder.features(np.stack(images))

    def vector_of(self, item_id: int) -> np.ndarray | None:
        """float32 (D,) reconstruction of an item from its full code (None if unknown).

        A search "by id" searches with this vector."""
        with self._lock.reading():
            if not self.index.contains(item_id):
                return None
            return self.index.decode(self.index.codes_of([item_id]))[0]

    def label_of(self, item_id: int) -> Any:
        with self._lock.reading():
            known = self.index.contains(item_id)
            labels = self._label_values(np.array([item_id])) if known else None
            return None if labels is None else labels[0]

    def search(
        self,
        vector: np.ndarray,
        k: int = 20,
        bits: int | None = None,
        offset: int = 0,
        rerank: int | None = None,
        rerank_candidates: int | None = None,
        **options: Any,
    ) -> SearchHits:
        """Ranks offset..offset+k-1 for one float (D,) query at a code length of ``bits``.

        ``rerank`` (bits): shortlist with that shorter code, then re-rank with ``bits``.
        Further ``options`` (e.g. ``nprobe`` of a partitioned index) go to
        ``DPQIndex.search`` when it takes them; ValueError otherwise.
        """
        extra = {name: value for name, value in options.items() if value is not None}
        for name in extra:
            if name not in self._search_params:
                raise ValueError(f"this index does not take the search option {name!r}.")
        levels = self.levels_for_bits(bits)
        rerank_from = None if rerank is None else self.levels_for_bits(rerank, "rerank")
        if rerank_from is not None and rerank_from >= levels:
            raise ValueError(
                f"rerank must be shorter than bits={levels * self._bits_per_level} (it is the "
                f"code length of the shortlist); got {rerank}."
            )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer; got {k!r}.")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative integer; got {offset!r}.")
        if offset + k > MAX_RANK:
            raise ValueError(f"offset + k must be at most {MAX_RANK}; got {offset + k}.")
        query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        with self._lock.reading():
            distances, ids = self.index.search(
                query,
                offset + k,
                num_levels=levels,
                rerank_from=rerank_from,
                rerank_candidates=rerank_candidates,
                **extra,
            )
            ids, distances = ids[0, offset:], distances[0, offset:]
            keep = ids >= 0
            ids, distances = ids[keep], distances[keep]
            labels = self._label_values(ids)
            total = self.index.ntotal
        return SearchHits(ids, distances, labels, levels * self._bits_per_level, total)

    # ---- writes -------------------------------------------------------------------------------

    def _label_array(self, labels: Sequence[Any] | None, n: int) -> np.ndarray | None:
        """Index labels for n new items from ints, class names or None (unknown: -1)."""
        shape = self.index.label_shape
        if labels is None:
            if shape is None:
                return None
            return np.full(n, -1, np.int64) if shape == () else np.zeros((n, *shape))
        if len(labels) != n:
            raise ValueError(f"give one label per item: {n} items but {len(labels)} labels.")
        if shape is None and self.index.ntotal:
            raise ValueError("this index has no labels; add the items without labels.")
        if shape is not None and len(shape) == 1:
            rows = np.zeros((n, shape[0]), np.uint8)
            for i, value in enumerate(labels):
                for one in [] if value is None else value if isinstance(value, list) else [value]:
                    rows[i, self._label_index(one, shape[0])] = 1
            return rows
        count = len(self.classes) if self.classes is not None else None
        return np.array(
            [-1 if value is None else self._label_index(value, count) for value in labels],
            np.int64,
        )

    def _label_index(self, value: Any, count: int | None) -> int:
        if isinstance(value, str) and not value.lstrip("-").isdigit():
            if self.classes is None or value not in self.classes:
                known = f"one of {self.classes}" if self.classes else "a class index"
                raise ValueError(f"unknown label {value!r}; use {known}.")
            return self.classes.index(value)
        try:
            label = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"a label must be a class name or index; got {value!r}.") from None
        if label < 0 or (count is not None and label >= count):
            raise ValueError(f"label {label} is out of range 0..{(count or 1) - 1}.")
        return label

    def add(
        self,
        features: np.ndarray,
        labels: Sequence[Any] | None = None,
        images: Sequence[Any] | None = None,
        names: Sequence[str | None] | None = None,
    ) -> np.ndarray:
        """Encode float (n, D) features with the index's codebooks and add them as one batch.

        labels: per item an int, a class name or None; images: per item a Pillow image or
        uint8 array kept as its thumbnail (or None); names: per item a name for its metadata.
        Returns the new int64 (n,) ids once the batch is durable (journal fsynced).
        """
        features = np.asarray(features, np.float32)
        n = len(features)
        if n == 0:
            raise ValueError("nothing to add: give at least one item.")
        codes = self.index.encode(features)  # reads only the codebooks: no lock needed
        thumbs = [
            None if img is None else thumbnail_png(img, self.thumbnail_size)
            for img in images or [None] * n
        ]
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self._write_mutex:
            label_array = self._label_array(labels, n)
            ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
            infos = []
            for i, item_id in enumerate(ids):
                info: dict[str, Any] = {"added_at": stamp, "image": thumbs[i] is not None}
                if names and names[i]:
                    info["name"] = str(names[i])
                infos.append(info)
                if thumbs[i] is not None:  # before the journal: an orphan file is harmless
                    write_bytes_atomic(self._thumbnail_path(int(item_id)), thumbs[i])
            with self._lock.writing():
                self.index.add(codes, ids=ids, labels=label_array)
                self.index.group_added(only_if_large=True)  # so that no search regroups
            payload = {
                "ids": ids.tolist(),
                "codes": codes.tolist(),
                "labels": None if label_array is None else label_array.tolist(),
                "items": infos,
            }
            try:
                self.journal.append("add", payload)
            except BaseException:
                with self._lock.writing():  # not durable: take it back before anyone relies on it
                    self.index.remove(ids)
                raise
            self._next_id += n
            self._added.info.update({int(i): info for i, info in zip(ids, infos, strict=True)})
            self._maybe_compact()
        return ids

    def remove(self, item_id: int) -> bool:
        """Remove one item (durable once this returns True); False if the id is unknown."""
        with self._write_mutex:
            with self._lock.reading():
                if not self.index.contains(item_id):
                    return False
            self.journal.append("remove", {"ids": [int(item_id)]})
            with self._lock.writing():
                self.index.remove([item_id])
            if self._added.info.pop(int(item_id), None) is not None:
                self._thumbnail_path(int(item_id)).unlink(missing_ok=True)
            self._maybe_compact()
        return True

    def _maybe_compact(self) -> None:
        if self.journal.size_bytes() > self.compact_bytes:
            self._compact_locked()

    def compact(self) -> None:
        """Save the index atomically (with the journal position it holds) and start an
        empty journal. Searches go on meanwhile; writes wait."""
        with self._write_mutex:
            self._compact_locked()

    def _compact_locked(self) -> None:
        started = time.perf_counter()
        self.index.metadata["serve"] = {
            "journal_id": self.journal.journal_id,
            "journal_seq": self.journal.last_seq,
            "next_id": self._next_id,
            "added": {str(i): info for i, info in sorted(self._added.info.items())},
        }
        with self._lock.writing():  # saving groups the latest adds; searches see either order
            self.index.group_added()
        self.index.save(self.index_path)
        self.journal.reset()
        self.last_compaction_seconds = time.perf_counter() - started

    # ---- stats and shutdown ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        index = self.index
        with self._lock.reading():
            items = index.ntotal
        return {
            "items": items,
            "code_lengths": self.code_lengths,
            "default_bits": self.code_lengths[-1],
            "bytes_per_item": {
                str(bits): index.bytes_per_item(level)
                for level, bits in enumerate(self.code_lengths, start=1)
            },
            "num_levels": index.num_levels,
            "codebook_size": index.codebook_size,
            "dim": index.dim,
            "search_mode": index.search_mode,
            "codebook_sha256": index.codebook_sha256,
            "labels": index.label_shape is not None,
            "classes": self.classes,
            "model": self.model_info,
            "accepts": ["vector", "id"] + (["image"] if self.accepts_images else []),
            "images": self.source is not None,
            "image_size": None if self.image_size is None else list(self.image_size),
            "index_file": self.index_path.name,
            "journal": {
                "records": self.journal.records_since_reset,
                "bytes": self.journal.size_bytes(),
            },
            "added_over_http": len(self._added.info),
        }

    def warm_up(self) -> None:
        """Compile the scan and compute the norms of every prefix now rather than on the
        first queries (and run the model once)."""
        if self.index.ntotal:
            probe = np.zeros((1, self.index.dim), np.float32)
            with self._lock.reading():
                for level in range(1, self.index.num_levels + 1):
                    self.index.search(probe, 1, num_levels=level)
        if self._encoder is not None and self.image_size is not None:
            self._encoder.features(np.zeros((1, *self.image_size, 3), np.uint8))

    def close(self, compact: bool = True) -> None:
        """Compact (when anything was written) and close the journal and the model thread."""
        if compact and self.journal.records_since_reset:
            self.compact()
        self.journal.close()
        if self._encoder is not None:
            self._encoder.close()


def _model_facts(model_path: Path) -> dict[str, Any]:
    facts: dict[str, Any] = {"name": model_path.name}
    try:
        record = json.loads((model_path / "config.json").read_text())
        facts["weights_sha256"] = record["checkpoint"]["weights_sha256"]
        facts["backbone"] = record["model"]["backbone"]
        facts["feature"] = record["model"].get("feature")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return facts


def open_collection(
    index_path: str | os.PathLike[str],
    model_path: str | os.PathLike[str] | None = None,
    images: str | None = None,
    image_root: str | None = None,
    image_size: int | None = None,
    thumbnail_size: int = 128,
    compact_bytes: int = DEFAULT_COMPACT_BYTES,
    fsync: bool = True,
    model_threads: int | None = None,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> Collection:
    """Load an index, replay its journal (compacting when it held writes), and optionally
    a model (checked against the index's codebooks) and the images it was encoded from.

    Args:
        index_path: an index file (``dpq encode``); its journal is ``<index_path>.journal``.
        model_path: a DPQ checkpoint directory: queries and adds may then be images.
        images: the source the index was encoded from (ids are its row numbers): thumbnails.
        image_root: list-file sources: the folder or zip of the images.
        image_size: the square size the model reads (default: the source's image size).
        thumbnail_size: longer side of thumbnails.
        compact_bytes: compact once the journal grows past this.
        fsync: fsync every journal append (keep on; off only for throw-away data).
        model_threads: torch threads of this process (``torch.set_num_threads``); None
            leaves torch's default. The model thread batches concurrent requests already,
            and on a busy machine one thread per forward pass can beat several.
        device: where the model runs ("auto", "cpu", "cuda", "cuda:N", "mps";
            :func:`dpq.devices.resolve_device`).
        log: where to report what was replayed (default: nowhere).
    """
    say = log or (lambda _message: None)
    path = Path(index_path)
    index = DPQIndex.load(path)
    serve_meta = (
        index.metadata.get("serve") if isinstance(index.metadata.get("serve"), dict) else {}
    )
    added = {int(k): dict(v) for k, v in (serve_meta.get("added") or {}).items()}
    next_id = int(serve_meta.get("next_id", 0))
    journal = Journal(journal_path(path), index.codebook_sha256, fsync=fsync)
    journal_id, records = journal.read()
    skip = (
        int(serve_meta.get("journal_seq", 0)) if journal_id == serve_meta.get("journal_id") else 0
    )
    replayed = 0
    for record in records:
        if record.seq <= skip:
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
            raise ValueError(f"{journal.path} holds an unknown operation {record.op!r}.")
        replayed += 1
    if journal.dropped_tail:
        say(
            f"{journal.path}: dropped a last record cut short by a crash (it was never acknowledged)"
        )
    source = None
    if images is not None:
        source = load_image_source(images, image_root=image_root, image_size=image_size)
        from_source = np.setdiff1d(index.ids, np.fromiter(added, np.int64, len(added)))
        if from_source.size and from_source.max() >= len(source.images):
            raise ValueError(
                f"the index has item ids up to {int(from_source.max())} but {images} has "
                f"{len(source.images)} images; ids are row numbers of the source the index was "
                "encoded from: pass that source."
            )
        next_id = max(next_id, len(source.images))
    if index.ntotal:
        next_id = max(next_id, int(index.ids.max()) + 1)
    model = None
    model_info = None
    size = None
    if model_path is not None:
        from dpq.devices import resolve_device
        from dpq.model.network import DPQModel

        model = DPQModel.from_checkpoint(model_path, device=resolve_device(device))
        if model_threads is not None:
            import torch

            torch.set_num_threads(int(model_threads))
        if model.input_kind != "images":
            raise ValueError(
                f"{model_path} reads feature vectors, not images; serve its index without "
                "--model and query with vectors."
            )
        index.check_compatible(model.codebooks(), source=f"model {model_path}")
        model_info = _model_facts(Path(model_path))
        trained_size = model.config.model.image_size
        if image_size is not None:
            size = (int(image_size), int(image_size))
        elif trained_size is not None:  # the model resizes to it anyway
            size = (int(trained_size), int(trained_size))
        elif source is not None:
            size = (int(source.images.shape[1]), int(source.images.shape[2]))
        else:
            raise ValueError(
                "with --model and no --images, give --image-size: the size the model was "
                "trained on (e.g. 32 for CIFAR-10)."
            )
    collection = Collection(
        index,
        path,
        journal,
        model=model,
        source=source,
        image_size=size,
        model_info=model_info,
        thumbnail_size=thumbnail_size,
        compact_bytes=compact_bytes,
        next_id=next_id,
        added=added,
    )
    if replayed:
        say(f"{journal.path}: replayed {replayed} write(s); saving the index")
        collection.compact()
    else:
        journal.reset()
    return collection
