"""A served collection: an index with its write journal, and optionally a model and images.

Thread safety: searches hold a read lock, writes are serialized by a mutex and change the
index under the write lock, so a search sees a whole batch of adds or none of it. Writes are
durable before they return (see :mod:`dpq.serve.journal`). No HTTP here: the routes in
:mod:`dpq.serve.routes` are a thin layer over this class, and scripts may use it directly
(``open_collection(ServeSettings(index=path))``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpq.index import DPQIndex
from dpq.index.usage import CodeUsage, code_usage
from dpq.serve.bounds import CodeLengths, check_search_bounds
from dpq.serve.encoder import BatchingEncoder, load_served_model
from dpq.serve.item_images import ItemImages
from dpq.serve.journal import (
    METADATA_KEY,
    Journal,
    index_state,
    journal_path,
    replay_journal,
    saved_position,
)
from dpq.serve.labels import LabelFilter, labels_from_json, labels_to_json
from dpq.serve.locks import ReadWriteLock
from dpq.serve.ranking import TieGroup, search_pages
from dpq.serve.settings import DEFAULT_COMPACT_BYTES, ServeSettings
from dpq.serve.sources import ImageSource, image_source_for

__all__ = [
    "Collection",
    "SearchHits",
    "UnknownItemError",
    "open_collection",
]


@dataclass
class SearchHits:
    """One query's page: ``ids`` int64 (n,), ``distances`` float32 (n,) (smaller is closer;
    for inner-product indexes the negative inner product), JSON-ready ``labels`` (or None),
    the code length ``bits``, ``total`` items in the collection, the page's ``offset``, its
    ``tie_groups`` (:class:`~dpq.serve.ranking.TieGroup`), ``codes`` (n, L) when asked for,
    and ``matching``: items that pass the filter (None without one)."""

    ids: np.ndarray
    distances: np.ndarray
    labels: list[Any] | None
    bits: int
    total: int
    offset: int = 0
    tie_groups: list[TieGroup] = field(default_factory=list)
    codes: np.ndarray | None = None
    matching: int | None = None


class UnknownItemError(LookupError):
    """An id that is not in the collection (the service answers 404)."""

    def __init__(self, item_id: int) -> None:
        self.item_id = int(item_id)
        super().__init__(f"no item with id {self.item_id} in this collection.")


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
        max_image_pixels: the largest full-size image :meth:`full_image` decodes.
        log: where to say what went wrong in the background (a compaction that failed).
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
        max_image_pixels: int = 40_000_000,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if model is not None and image_size is None:
            raise ValueError("a model needs image_size (height, width): the size it reads.")
        self.index = index
        self.index_path = Path(index_path)
        self.journal = journal
        self.source = source
        self.image_size = image_size
        self.model_info = model_info
        self.compact_bytes = int(compact_bytes)
        self.images = ItemImages(
            self.index_path.with_name(self.index_path.name + ".items"),
            source,
            thumbnail_size,
            max_image_pixels,
        )
        self._log = log or (lambda _message: None)
        self._encoder = BatchingEncoder(model) if model is not None else None
        self._lock = ReadWriteLock()
        self._write_mutex = threading.Lock()
        self._next_id = int(next_id)
        self._added = _Added(dict(added or {}))
        self.lengths = CodeLengths.of(index.num_levels, index.codebook_size)
        self.classes: list[str] | None = None
        meta_classes = index.metadata.get("classes")
        if isinstance(meta_classes, list):
            self.classes = [str(c) for c in meta_classes]
        elif source is not None:
            self.classes = source.classes
        self.last_compaction_seconds: float | None = None
        self._compact_at = self.compact_bytes  # journal size that triggers a compaction
        self._version = 0  # bumped by every write: keys the caches below
        self._sorted_ids: tuple[int, np.ndarray] | None = None
        self._usage: tuple[int, CodeUsage] | None = None

    # ---- facts ------------------------------------------------------------------------------

    @property
    def accepts_images(self) -> bool:
        return self._encoder is not None

    @property
    def code_lengths(self) -> list[int]:
        """The bits a search may use: l * log2(K) for l = 1..L."""
        return self.lengths.bits

    def __len__(self) -> int:
        return self.index.ntotal

    def code_usage(self) -> CodeUsage:
        """How the items use their codes (:func:`dpq.index.usage.code_usage`), computed again
        only after writes."""
        cached = self._usage
        if cached is not None and cached[0] == self._version:
            return cached[1]
        with self._lock.reading():
            version = self._version
            usage = code_usage(self.index.codes, self.index.codebook_size)
        self._usage = (version, usage)
        return usage

    # ---- rows, labels, images -------------------------------------------------------------------

    def _label_values(self, ids: np.ndarray) -> list[Any] | None:
        """JSON-ready labels of items (:func:`labels_to_json`); None for a label-less index."""
        if self.index.label_shape is None:
            return None
        return labels_to_json(self.index.labels_of(ids), self.classes)

    def has_image(self, item_id: int) -> bool:
        """Whether ``GET /items/{id}/image`` can answer for this id (assumed in the index)."""
        info = self._added.info.get(item_id)
        if info is not None:  # added over HTTP: an image when one was uploaded
            return bool(info.get("image"))
        return self.images.in_source(item_id)

    def has_full_image(self, item_id: int) -> bool:
        """Whether ``GET /items/{id}/image/full`` can answer: items of the source only (an
        upload keeps only its thumbnail)."""
        return item_id not in self._added.info and self.images.in_source(item_id)

    def thumbnail(self, item_id: int) -> bytes | None:
        """PNG bytes of the item's image as a thumbnail; None for an unknown id or an item
        without an image (an index built from features, a vector added over HTTP)."""
        with self._lock.reading():
            if not self.index.contains(item_id) or not self.has_image(item_id):
                return None
            if item_id in self._added.info:
                return self.images.stored_thumbnail(item_id)
        return self.images.source_thumbnail(item_id)

    def full_image(self, item_id: int) -> bytes | None:
        """PNG bytes of the item's image at its own size (its file decoded anew); None for an
        unknown id or an item without one."""
        with self._lock.reading():
            if not self.index.contains(item_id) or not self.has_full_image(item_id):
                return None
        return self.images.source_full(item_id)

    def item(self, item_id: int) -> dict[str, Any] | None:
        """JSON-ready facts of one item (id, label, metadata, has_image, has_full_image);
        None if unknown."""
        with self._lock.reading():
            if not self.index.contains(item_id):
                return None
            labels = self._label_values(np.array([item_id]))
            return self._facts(item_id, None if labels is None else labels[0])

    def _facts(self, item_id: int, label: Any) -> dict[str, Any]:
        meta: dict[str, Any]
        if item_id in self._added.info:
            meta = {"added_over_http": True, **self._added.info[item_id]}
            meta.pop("image", None)
        elif self.images.in_source(item_id):
            meta = self.images.source_facts(item_id)
        else:
            meta = {}
        return {
            "id": int(item_id),
            "label": label,
            "metadata": meta,
            "has_image": self.has_image(item_id),
            "has_full_image": self.has_full_image(item_id),
        }

    def items(self, offset: int, limit: int) -> tuple[list[dict[str, Any]], int]:
        """(facts of the items at offset..offset+limit-1 in id order, items in all)."""
        with self._lock.reading():
            cached = self._sorted_ids
            if cached is None or cached[0] != self._version:
                cached = (self._version, np.sort(self.index.ids))
                self._sorted_ids = cached
            ids = cached[1][offset : offset + limit]
            labels = self._label_values(ids)
            facts = [
                self._facts(int(item_id), None if labels is None else labels[i])
                for i, item_id in enumerate(ids.tolist())
            ]
            return facts, len(cached[1])

    def random_id(self, rng: np.random.Generator) -> int | None:
        """A uniformly drawn item id (None for an empty index)."""
        with self._lock.writing():  # index order may group the latest adds
            ids = self.index.ids
            return int(ids[rng.integers(len(ids))]) if len(ids) else None

    # ---- queries ------------------------------------------------------------------------------

    def model(self) -> BatchingEncoder:
        """The model that turns images into features (and predictions); ValueError when the
        service has none."""
        if self._encoder is None:
            raise ValueError(
                "this service has no model, so it cannot turn images into features; query "
                "with a vector or an id, or restart it with --model."
            )
        return self._encoder

    def vectors_of(self, item_ids: Sequence[int]) -> np.ndarray:
        """float32 (n, D) reconstructions of items from their full codes; a search "by id"
        searches with this vector. Raises UnknownItemError naming the first unknown id."""
        with self._lock.reading():
            known = self.index.contains(np.asarray(item_ids, np.int64))
            if not np.all(known):
                raise UnknownItemError(int(np.asarray(item_ids)[~known][0]))
            return self.index.decode(self.index.codes_of(list(item_ids)))

    def label_of(self, item_id: int) -> Any:
        with self._lock.reading():
            known = self.index.contains(item_id)
            labels = self._label_values(np.array([item_id])) if known else None
            return None if labels is None else labels[0]

    def search(self, vector: np.ndarray, k: int = 20, **options: Any) -> SearchHits:
        """One float (D,) query: :meth:`search_many` with ``exclude`` a list of ids."""
        exclude = options.pop("exclude", None)
        return self.search_many(
            np.asarray(vector, np.float32).reshape(1, -1),
            k,
            exclude=None if exclude is None else [exclude],
            **options,
        )[0]

    def search_many(
        self,
        vectors: np.ndarray,
        k: int = 20,
        bits: int | None = None,
        offset: int = 0,
        rerank: int | None = None,
        rerank_candidates: int | None = None,
        label_filter: LabelFilter | None = None,
        exclude: Sequence[Sequence[int]] | None = None,
        with_codes: bool = False,
        **options: Any,
    ) -> list[SearchHits]:
        """Ranks offset..offset+k-1 for each float (nq, D) query at a code length of ``bits``,
        answered by one index search (more only for queries that need more results: see
        :func:`dpq.serve.ranking.rank_pages`); ties in an order of their own, tie groups
        reported.

        ``rerank`` (bits): shortlist with that shorter code, then re-rank with ``bits``.
        ``label_filter``: only items that pass it; ``exclude``: per query ids never to
        return; ``with_codes``: give the results' codes. Further ``options`` (e.g.
        ``nprobe`` of a partitioned index) go to ``DPQIndex.search`` when it takes them;
        ValueError otherwise.
        """
        extra = {name: value for name, value in options.items() if value is not None}
        check_search_bounds(k, offset, rerank_candidates, extra.get("nprobe"))
        levels = self.lengths.levels(bits)
        rerank_from = self.lengths.rerank_levels(rerank, levels)
        queries = np.asarray(vectors, dtype=np.float32)
        if exclude is not None and len(exclude) != len(queries):
            raise ValueError(f"give one exclusion list per query: {len(queries)} queries.")
        excluded = (
            None if exclude is None else [np.unique(np.asarray(e, np.int64)) for e in exclude]
        )
        with self._lock.reading():
            total = self.index.ntotal
            pages, matching = search_pages(
                self.index,
                queries,
                k,
                offset,
                levels=levels,
                rerank_from=rerank_from,
                rerank_candidates=rerank_candidates,
                label_filter=label_filter,
                excluded=excluded,
                options=extra,
            )
            bits_used = levels * self.lengths.bits_per_level
            return [
                SearchHits(
                    page.ids,
                    page.distances,
                    self._label_values(page.ids),
                    bits_used,
                    total,
                    offset,
                    page.tie_groups,
                    self.index.codes_of(page.ids) if with_codes and len(page.ids) else None,
                    matching,
                )
                for page in pages
            ]

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
        Raises WriteFailedError when it could not be stored (nothing of it is kept).
        """
        features = np.asarray(features, np.float32)
        n = len(features)
        if n == 0:
            raise ValueError("nothing to add: give at least one item.")
        codes = self.index.encode(features)  # reads only the codebooks: no lock needed
        thumbs = self.images.thumbnails_of(images, n)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self._write_mutex:
            label_array = labels_from_json(
                labels, n, self.index.label_shape, self.classes, has_items=bool(self.index.ntotal)
            )
            ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
            infos = []
            for i in range(n):
                info: dict[str, Any] = {"added_at": stamp, "image": thumbs[i] is not None}
                if names and names[i]:
                    info["name"] = str(names[i])
                infos.append(info)
            self.images.store(ids.tolist(), thumbs)  # before the journal: an orphan is harmless
            with self._lock.writing():
                self.index.add(codes, ids=ids, labels=label_array)
                self.index.group_added(only_if_large=True)  # so that no search regroups
                self._version += 1
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
                    self._version += 1
                raise
            self._next_id += n
            self._added.info.update({int(i): info for i, info in zip(ids, infos, strict=True)})
            self._maybe_compact()
        return ids

    def remove(self, item_id: int) -> bool:
        """Remove one item (durable once this returns True); False if the id is unknown.
        Raises WriteFailedError when the removal could not be stored (the item stays)."""
        with self._write_mutex:
            with self._lock.reading():
                if not self.index.contains(item_id):
                    return False
            self.journal.append("remove", {"ids": [int(item_id)]})
            with self._lock.writing():
                self.index.remove([item_id])
                self._version += 1
            if self._added.info.pop(int(item_id), None) is not None:
                self.images.forget(int(item_id))
            self._maybe_compact()
        return True

    def _maybe_compact(self) -> None:
        """Compact once the journal outgrows compact_bytes. A compaction that fails (a full
        disk) is logged, not raised: the writes stay durable in the journal, and the next
        try waits until the journal has grown by another eighth of compact_bytes."""
        if self.journal.size_bytes() <= self._compact_at:
            return
        try:
            self._compact_locked()
        except OSError as exc:
            self._compact_at = self.journal.size_bytes() + max(1, self.compact_bytes // 8)
            self._log(
                f"could not save the index ({exc.strerror or exc}); the writes stay in the "
                f"journal {self.journal.path.name}, and saving is tried again later"
            )
        else:
            self._compact_at = self.compact_bytes

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
        self.journal.reset(base=index_state(self.index))
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
            "partition_levels": index.partition_levels,
            "codebook_sha256": index.codebook_sha256,
            "labels": index.label_shape is not None,
            "multi_label": index.label_shape is not None and len(index.label_shape) == 1,
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
            "code_usage": self.code_usage().to_json(),
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
        """Compact (when anything was written) and close the journal and the model thread.
        A compaction that fails is logged; the writes stay in the journal for the next start."""
        if compact and self.journal.records_since_reset:
            try:
                self.compact()
            except OSError as exc:
                self._log(
                    f"could not save the index at shutdown ({exc.strerror or exc}); the "
                    f"writes stay in {self.journal.path.name} and are replayed at the next start"
                )
        self.journal.close()
        if self._encoder is not None:
            self._encoder.close()


def open_collection(
    settings: ServeSettings, log: Callable[[str], None] | None = None
) -> Collection:
    """Load the index of ``settings.index``, replay its journal (``<index>.journal``,
    :func:`dpq.serve.journal.replay_journal`; compacting when it held writes), and the model
    (checked against the index's codebooks) and image source the settings name.

    Uses index, model, images, image_root, image_size, device, model_threads,
    thumbnail_size, compact_bytes, fsync, force_journal and max_image_pixels of
    ``settings``; ``log`` gets a line about what was replayed, and the code usage of the
    index with its warnings (default: nowhere).
    """
    say = log or (lambda _message: None)
    index = DPQIndex.load(settings.index)
    journal = Journal(journal_path(settings.index), index.codebook_sha256, fsync=settings.fsync)
    replay = replay_journal(journal, index, force=settings.force_journal)
    if replay.dropped_tail:
        say(
            f"{journal.path}: dropped a last record cut short by a crash (it was never acknowledged)"
        )
    source = image_source_for(settings, index, replay.added)
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
        max_image_pixels=settings.max_image_pixels,
        log=say,
    )
    if replay.applied:
        say(f"{journal.path}: replayed {replay.applied} write(s); saving the index")
        collection.compact()
    else:
        journal.reset(base=index_state(index))
    for line in collection.code_usage().report_lines():
        say(line)
    return collection
