"""A served collection: an index with its write journal, and optionally a model and images.

Thread safety: searches hold a read lock, writes are serialized by a mutex and change the
index under the write lock, so a search sees a whole batch of adds or none of it. Writes are
durable before they return (see :mod:`dpq.serve.journal`). No HTTP here: the routes in
:mod:`dpq.serve.routes` are a thin layer over this class, and scripts may use it directly
(``open_collection(ServeSettings(index=path))``).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from dpq.atomic import write_bytes_atomic
from dpq.index import DPQIndex
from dpq.serve.bounds import check_search_bounds
from dpq.serve.encoder import BatchingEncoder, load_served_model
from dpq.serve.images import thumbnail_png
from dpq.serve.journal import (
    METADATA_KEY,
    Journal,
    journal_path,
    replay_journal,
    saved_position,
)
from dpq.serve.labels import labels_from_json, labels_to_json
from dpq.serve.settings import DEFAULT_COMPACT_BYTES, ServeSettings

__all__ = [
    "Collection",
    "ImageSource",
    "ReadWriteLock",
    "SearchHits",
    "load_image_source",
    "open_collection",
]


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
        self._encoder = BatchingEncoder(model) if model is not None else None
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
        """JSON-ready labels of items (:func:`labels_to_json`); None for a label-less index."""
        if self.index.label_shape is None:
            return None
        return labels_to_json(self.index.labels_of(ids), self.classes)

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
        check_search_bounds(k, offset, rerank_candidates, extra.get("nprobe"))
        levels = self.levels_for_bits(bits)
        rerank_from = None if rerank is None else self.levels_for_bits(rerank, "rerank")
        if rerank_from is not None and rerank_from >= levels:
            raise ValueError(
                f"rerank must be shorter than bits={levels * self._bits_per_level} (it is the "
                f"code length of the shortlist); got {rerank}."
            )
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
            label_array = labels_from_json(
                labels, n, self.index.label_shape, self.classes, has_items=bool(self.index.ntotal)
            )
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
        self.index.metadata[METADATA_KEY] = saved_position(
            self.journal, self._next_id, self._added.info
        )
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


def _image_source_for(
    settings: ServeSettings, index: DPQIndex, added: dict[int, Any]
) -> ImageSource | None:
    """The image source of ``settings.images`` (None without one), checked to hold a row
    for every id of the index that was not added through the service."""
    if settings.images is None:
        return None
    source = load_image_source(
        settings.images, image_root=settings.image_root, image_size=settings.image_size
    )
    from_source = np.setdiff1d(index.ids, np.fromiter(added, np.int64, len(added)))
    if from_source.size and from_source.max() >= len(source.images):
        raise ValueError(
            f"the index has item ids up to {int(from_source.max())} but {settings.images} has "
            f"{len(source.images)} images; ids are row numbers of the source the index was "
            "encoded from: pass that source."
        )
    return source


def open_collection(
    settings: ServeSettings, log: Callable[[str], None] | None = None
) -> Collection:
    """Load the index of ``settings.index``, replay its journal (``<index>.journal``,
    :func:`dpq.serve.journal.replay_journal`; compacting when it held writes), and the model
    (checked against the index's codebooks) and image source the settings name.

    Uses index, model, images, image_root, image_size, device, model_threads,
    thumbnail_size, compact_bytes and fsync of ``settings``; ``log`` gets a line about what
    was replayed (default: nowhere).
    """
    say = log or (lambda _message: None)
    index = DPQIndex.load(settings.index)
    journal = Journal(journal_path(settings.index), index.codebook_sha256, fsync=settings.fsync)
    replay = replay_journal(journal, index)
    if replay.dropped_tail:
        say(
            f"{journal.path}: dropped a last record cut short by a crash (it was never acknowledged)"
        )
    source = _image_source_for(settings, index, replay.added)
    next_id = replay.next_id
    if source is not None:
        next_id = max(next_id, len(source.images))
    if index.ntotal:
        next_id = max(next_id, int(index.ids.max()) + 1)
    served = None
    if settings.model is not None:
        source_size = None
        if source is not None:
            source_size = (int(source.images.shape[1]), int(source.images.shape[2]))
        served = load_served_model(settings, index, source_size)
    collection = Collection(
        index,
        settings.index,
        journal,
        model=None if served is None else served.model,
        source=source,
        image_size=None if served is None else served.image_size,
        model_info=None if served is None else served.info,
        thumbnail_size=settings.thumbnail_size,
        compact_bytes=settings.compact_bytes,
        next_id=next_id,
        added=replay.added,
    )
    if replay.applied:
        say(f"{journal.path}: replayed {replay.applied} write(s); saving the index")
        collection.compact()
    else:
        journal.reset()
    return collection
