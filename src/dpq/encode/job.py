"""One encode path: a collection and a model (or codebooks) become an index file.

:func:`encode_collection` is what ``dpq encode`` does, whatever the settings:

1. read: open the source (:class:`~dpq.data.SourceSpec`), choose the rows, their ids and
   labels (:func:`select_items`);
2. encode: in this process, in one piece (:func:`dpq.encode.build.build_index`, the network
   run by the inference engine the settings name; with codebooks, the index's own encoder),
   timing each stage (:class:`~dpq.encode.stages.StageTimes`), or in shards placed by a
   :class:`~dpq.encode.shards.ShardRunner`, each shard through the same ``build_index``,
   written as an index file and merged (:mod:`dpq.encode.shards`);
3. write: a new index file, or the items appended to an existing one.

All settings travel in one :class:`EncodeSettings`; the answer is an :class:`EncodeResult`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dpq.atomic import check_writable_file
from dpq.data.features import read_array, read_labels
from dpq.data.spec import SourceSpec
from dpq.encode.build import build_index, check_rows, empty_index
from dpq.encode.shards import (
    EncodePlan,
    ShardReport,
    ShardRun,
    ShardRunner,
    check_failures,
    merge_shards,
    prepare_folder,
    shard_bounds,
    shard_is_done,
    take_rows,
)
from dpq.encode.stages import StageTimes
from dpq.index import DPQIndex, append_to_index_file
from dpq.index.checks import check_ids
from dpq.index.kinds import AnyIndex, check_compatible, load_any
from dpq.inference.names import check_engine, check_precision

DEFAULT_SHARDS = 8
ArrayOrPath = np.ndarray | str | os.PathLike[str]


@dataclass(frozen=True)
class EncodeSettings:
    """Everything one encoding needs.

    Attributes:
        out: the index file to write (.npz), or to grow with ``append``.
        source: the items: images, or a features file (model inputs with ``model``,
            semantic features (N, D) with ``codebooks``).
        model: a checkpoint directory of any method (with a runner: the same path on every
            node); its method encodes the items into its kind of index (a DPQ index, or a
            binary index of a hashing method).
        codebooks: instead of ``model``: float32 (L, K, D) codebooks, an array or a file.
        assignment: with ``codebooks``: the hard assignment rule (default "euclidean").
        rows: int (n,) source rows to encode, in order (e.g. ``Split.load(p).database``);
            default every row. Image sources only.
        ids: int64 (n,) item ids, an array or a .npy/.txt file (default: ``rows`` when
            given or with a runner, else the index's counter, which ``append`` continues).
        labels: int (n,) or multi-hot (n, C) labels, an array or a file (default: the
            source's).
        append: add the items to the existing index file ``out`` (its codebooks, or code
            length, checked).
        batch_size: inputs per forward pass.
        device: where the model runs in this process ("auto", "cpu", "cuda", "cuda:N", "mps").
        engine: who runs the network in this process: "torch" (the checkpoint in eager
            PyTorch), "onnxruntime" or "openvino" (its ONNX export on the CPU: ``onnx``, or
            exported once into ``MODEL_DIR/engine-cache/``; :func:`dpq.inference.engine_for`).
        onnx: with an ONNX engine: an export of ``model`` (``dpq export --onnx``), checked
            against it; None: the cached export.
        engine_precision: the engine's arithmetic, "fp32", "bf16" (torch autocast,
            OpenVINO's bfloat16 inference) or "int8" (an ONNX engine running the int8
            export given as ``onnx``); :data:`dpq.inference.names.PRECISIONS`.
        workers: processes decoding images read on demand in this process (default: one
            per core, up to 8; 0: this process).
        search_mode: how a new DPQ index is searched (default: the model's; "aqd" with
            codebooks).
        partition_levels: a new DPQ index's items grouped by their first 0, 1 or 2 codes.
        metadata: more JSON-ready metadata of a new index.
        runner: where the shards are encoded (e.g. :class:`dpq.encode.ray.RayRunner`); None:
            in this process, in one piece.
        shards: with a runner: how many shards (default 8).
        shard_dir: with a runner: the plan and shard folder (default ``<out>.shards``).
        progress: progress and one line per step on stderr.
    """

    out: str | os.PathLike[str]
    source: SourceSpec
    model: str | os.PathLike[str] | None = None
    codebooks: ArrayOrPath | None = None
    assignment: str | None = None
    rows: np.ndarray | None = None
    ids: ArrayOrPath | None = None
    labels: ArrayOrPath | None = None
    append: bool = False
    batch_size: int = 256
    device: str = "auto"
    engine: str = "torch"
    onnx: str | os.PathLike[str] | None = None
    engine_precision: str = "fp32"
    workers: int | None = None
    search_mode: str | None = None
    partition_levels: int = 0
    metadata: Mapping[str, Any] | None = None
    runner: ShardRunner | None = None
    shards: int | None = None
    shard_dir: str | os.PathLike[str] | None = None
    progress: bool = False

    def check(self) -> None:
        """ValueError for settings that do not go together, naming the flags."""
        if (self.model is None) == (self.codebooks is None):
            raise ValueError("give one of --model (a checkpoint) and --codebooks.")
        check_engine(self.engine, self.onnx)
        check_precision(self.engine, self.engine_precision)
        if self.engine != "torch" and self.model is None:
            raise ValueError(
                f"--engine {self.engine} runs a model's network; --codebooks encode features "
                "without one: leave --engine out."
            )
        if self.engine != "torch" and self.device not in ("auto", "cpu"):
            raise ValueError(
                f"--engine {self.engine} runs on the CPU, not on --device {self.device}; leave "
                "--device out, or use --engine torch."
            )
        if self.source.images is not None and self.model is None:
            raise ValueError(
                "--images needs --model: the checkpoint that turns images into features."
            )
        if self.model is not None and self.assignment is not None:
            raise ValueError("--assignment applies to --codebooks; a model encodes with its rule.")
        if self.rows is not None and self.source.features is not None:
            raise ValueError("--split applies to --images, not to --features.")
        if self.append and (self.search_mode is not None or self.partition_levels):
            raise ValueError(
                "--search-mode and --partition-levels are the existing index's with --append."
            )
        if self.runner is None:
            if self.shards is not None or self.shard_dir is not None:
                raise ValueError("--shards and --shard-dir apply to --runner ray.")
            return
        if self.model is None:
            raise ValueError("--runner ray needs --model (a checkpoint every node can read).")
        if self.engine != "torch":
            raise ValueError(
                f"--engine {self.engine} applies to --runner local; the Ray actors run the "
                "checkpoint in torch."
            )
        if self.engine_precision != "fp32":
            raise ValueError(
                f"--engine-precision {self.engine_precision} applies to --runner local; the Ray "
                "actors run the checkpoint in fp32."
            )
        if self.append:
            raise ValueError(
                "--append applies to --runner local; with --runner ray, encode into a new file "
                "and join the two with `dpq index merge OLD NEW --out MERGED`."
            )


@dataclass
class EncodeResult:
    """What :func:`encode_collection` did.

    Attributes:
        index: the items encoded by this call (in memory; after ``append`` the file holds
            the earlier items too).
        path: the index file written.
        ids: int64 (n,) ids of the items encoded by this call.
        total: items in the file now.
        appended: whether the items were added to an existing file.
        seconds: wall time: in this process, loading the model and encoding (not reading
            the source up front, not writing the file); with a runner, the whole call.
        shards: what the runner did (None in this process).
        stages: in this process: seconds and items/s of each stage (decode, network, codes,
            file); None with a runner.
    """

    index: AnyIndex
    path: Path
    ids: np.ndarray
    total: int
    appended: bool
    seconds: float
    shards: ShardReport | None = None
    stages: StageTimes | None = None

    def summary(self) -> str:
        """One line for the terminal."""
        added, rate = len(self.ids), len(self.ids) / max(self.seconds, 1e-9)
        timing = f"encoded in {self.seconds:.1f} s ({rate:,.0f} items/s)"
        if self.appended:
            span = f"ids {int(self.ids.min())}..{int(self.ids.max())}" if added else "no ids"
            return (
                f"appended {added:,} items to {self.path} ({span}): {self.total:,} items now; "
                f"{timing}"
            )
        index = self.index
        if not isinstance(index, DPQIndex):
            line = (
                f"wrote {self.path}: {index.ntotal:,} items, {index.bits}-bit binary codes, "
                f"search Hamming, labels {'yes' if index.labels is not None else 'no'}; {timing}"
            )
            return line if self.shards is None else f"{line}; {self.shards.summary()}"
        bits = index.num_levels * int(np.log2(index.codebook_size))
        line = (
            f"wrote {self.path}: {index.ntotal:,} items, {index.num_levels} levels x "
            f"{index.codebook_size} codewords (up to {bits} bits), dim {index.dim}, assignment "
            f"{index.assignment}, search {index.search_mode}, labels "
            f"{'yes' if index.labels is not None else 'no'}; {timing}"
        )
        return line if self.shards is None else f"{line}; {self.shards.summary()}"


@dataclass(frozen=True)
class Items:
    """The items of an encoding.

    Attributes:
        inputs: every row of the source (an array, a memory map or an on-demand reader).
        rows: int64 (n,) source rows to encode, in order; None: all of them.
        ids: int64 (n,) ids, or None (the index's counter).
        labels: int64 (n,) or uint8 (n, C) labels of the rows, or None.
        classes: the source's class names (index metadata), or None.
    """

    inputs: Any
    rows: np.ndarray | None
    ids: np.ndarray | None
    labels: np.ndarray | None
    classes: list[str] | None

    @property
    def source_items(self) -> int:
        return len(self.inputs)

    @property
    def num_items(self) -> int:
        return self.source_items if self.rows is None else len(self.rows)

    def selected(self) -> Any:
        """The inputs of the rows to encode."""
        return self.inputs if self.rows is None else take_rows(self.inputs, self.rows)


def _array(value: ArrayOrPath | None, read: Callable[[Any, str], np.ndarray], what: str) -> Any:
    """An array as given, or read from its file."""
    if value is None or isinstance(value, np.ndarray):
        return value
    if isinstance(value, (str, os.PathLike)):
        return read(value, what)
    return np.asarray(value)


def select_items(settings: EncodeSettings, source: SourceSpec | None = None) -> Items:
    """Open ``source`` (default: the settings') and choose the rows, ids and labels."""
    source = source or settings.source
    inputs, source_labels, classes = source.open(progress=settings.progress)
    rows = None
    if settings.rows is not None:
        rows = np.asarray(settings.rows)
        count = len(inputs)
        if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
            raise ValueError(
                f"rows must be int (n,) source positions; got {rows.dtype} {rows.shape}."
            )
        rows = rows.astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= count):
            raise ValueError(
                f"the rows to encode must be positions in [0, {count}) of {source.describe()}; "
                "make the split from the same source (`dpq data split`)."
            )
    num_items = len(inputs) if rows is None else len(rows)
    if num_items == 0:
        raise ValueError(
            "nothing to encode: "
            + (
                "the split holds no rows of that subset"
                if rows is not None
                else "the source holds no items"
            )
            + "; an empty index is refused. Check the split (`dpq data info`) or the source."
        )
    labels = _array(settings.labels, read_labels, "--labels")
    if labels is not None:
        check_rows("labels", labels, num_items)
        classes = None  # the given labels are not the source's classes
    elif source_labels is not None:
        labels = source_labels if rows is None else np.asarray(source_labels)[rows]
    ids = _array(settings.ids, read_array, "--ids")
    if ids is not None:
        check_rows("ids", ids, num_items)
    return Items(inputs, rows, rows if ids is None else ids, labels, classes)


def encode_collection(settings: EncodeSettings) -> EncodeResult:
    """Encode the items ``settings`` name into an index file; see the module doc.

    Raises:
        ValueError: settings that do not go together, unreadable inputs, codebooks that
            differ from those of the file to append to, a shard folder of another plan.
        FileNotFoundError: a missing source, model, or file to append to.
        ShardEncodingError: shards that failed (the others stay on disk for the next run).
    """
    began = time.perf_counter()
    settings.check()
    out = check_writable_file(settings.out, "--out")
    existing = load_any(out, mmap=True) if settings.append else None
    source = settings.source
    if settings.runner is not None and source.images is not None and source.loading == "auto":
        source = replace(source, loading="stream")  # each worker reads only its shards' images
    stages = StageTimes() if settings.runner is None else None
    with stages.stage("decode") if stages is not None else nullcontext():
        items = select_items(settings, source)
    metadata = _metadata(settings, source, items)
    report = None
    if stages is not None:
        began = time.perf_counter()
        index = _encode_here(settings, items, metadata, existing, stages)
    else:  # settings.check(): a runner has a model
        index, report = _encode_in_shards(
            settings, settings.runner, settings.model, source, items, metadata, out
        )
    seconds = time.perf_counter() - began
    with stages.stage("file") if stages is not None else nullcontext():
        if existing is not None:
            before = existing.ntotal
            added = _append(existing, out, index, items.ids)
        else:
            path = index.save(out)
    if existing is not None:
        return EncodeResult(index, out, added, before + len(added), True, seconds, stages=stages)
    if report is not None:
        seconds = time.perf_counter() - began  # with a runner: the whole call
    return EncodeResult(
        index, path, np.asarray(index.ids), index.ntotal, False, seconds, report, stages
    )


def _metadata(settings: EncodeSettings, source: SourceSpec, items: Items) -> dict[str, Any]:
    runner = settings.runner
    metadata: dict[str, Any] = {
        "created_by": "dpq encode" if runner is None else f"dpq encode, shards on {runner.name}",
        "source": source.describe(),
    }
    if items.classes is not None:
        metadata["classes"] = items.classes
    if settings.model is not None:
        metadata["model"] = str(settings.model)
    elif not isinstance(settings.codebooks, np.ndarray):
        metadata["codebooks"] = str(settings.codebooks)
    return {**metadata, **(settings.metadata or {})}


def _append(existing: AnyIndex, out: Path, index: AnyIndex, ids: np.ndarray | None) -> np.ndarray:
    """Add the items of ``index`` to the file ``out`` that ``existing`` was loaded from;
    returns their ids."""
    if isinstance(existing, DPQIndex):  # grows the file in place, memory-mapped
        return append_to_index_file(out, index.codes, ids=ids, labels=index.labels)
    added = existing.add(index.codes, ids=ids, labels=index.labels)  # held in memory
    existing.save(out)
    return added


def _encode_here(
    settings: EncodeSettings,
    items: Items,
    metadata: dict[str, Any],
    existing: AnyIndex | None,
    stages: StageTimes,
) -> AnyIndex:
    """The items encoded in this process, in one piece."""
    if settings.model is not None:
        from dpq.devices import resolve_device
        from dpq.inference.engines import engine_for
        from dpq.methods import load_network, method_for

        device = "cpu" if settings.engine != "torch" else settings.device
        model = load_network(settings.model, device=resolve_device(device))
        if existing is not None:
            fresh = method_for(model.config).new_index(model)
            check_compatible(existing, fresh, source=f"model {settings.model}")
        inputs = items.selected()
        engine = engine_for(
            model,
            settings.model,
            settings.engine,
            settings.onnx,
            inputs=inputs,
            batch_size=settings.batch_size,
            precision=settings.engine_precision,
        )
        try:
            return build_index(
                model,
                inputs,
                ids=items.ids,
                labels=items.labels,
                metadata=metadata,
                progress=settings.progress,
                search_mode=settings.search_mode,
                workers=settings.workers,
                partition_levels=settings.partition_levels,
                engine=engine,
                stages=stages,
            )
        finally:
            engine.close()
    codebooks = _array(settings.codebooks, read_array, "--codebooks")
    if not isinstance(existing, DPQIndex | None):
        raise ValueError(
            f"{settings.out} holds binary codes; --codebooks encode into a DPQ index: write a "
            "new file."
        )
    if existing is not None:
        existing.check_compatible(codebooks, source=f"--codebooks {settings.codebooks}")
    index = DPQIndex(
        codebooks,
        assignment=(settings.assignment or "euclidean")
        if existing is None
        else existing.assignment,
        metadata=metadata,
        search_mode=settings.search_mode or "aqd",
        partition_levels=settings.partition_levels,
    )
    with stages.stage("codes"):
        index.add_features(np.asarray(items.selected()), ids=items.ids, labels=items.labels)
    stages.items += items.num_items
    return index


def _encode_in_shards(
    settings: EncodeSettings,
    runner: ShardRunner,
    model_path: str | os.PathLike[str],
    source: SourceSpec,
    items: Items,
    metadata: dict[str, Any],
    out: Path,
) -> tuple[AnyIndex, ShardReport]:
    """The items encoded in shards where ``settings.runner`` places them, then merged."""
    from dpq.methods import load_network
    from dpq.model.files import read_checkpoint_config

    _config, record = read_checkpoint_config(model_path)
    rows = items.rows if items.rows is not None else np.arange(items.source_items, dtype=np.int64)
    plan = EncodePlan(
        source,
        str(Path(model_path).resolve()),
        record["weights_sha256"],
        items.source_items,
        rows,
        check_ids(rows if items.ids is None else items.ids, len(rows)),
        items.labels,
        shard_bounds(len(rows), DEFAULT_SHARDS if settings.shards is None else settings.shards),
        settings.batch_size,
    )
    folder = Path(settings.shard_dir or out.with_name(out.name + ".shards"))
    prepare_folder(folder, plan)
    missing = [s for s in range(plan.num_shards) if not shard_is_done(folder, plan, s)]
    reused = [s for s in range(plan.num_shards) if s not in missing]
    say = _log(settings.progress)
    say(
        f"{plan.num_items:,} items in {plan.num_shards} shards ({folder}): {len(missing)} to "
        f"encode, {len(reused)} already done"
    )
    run = runner.run(folder, missing, settings.progress, say) if missing else ShardRun()
    check_failures(run, plan, folder)
    merging = time.perf_counter()
    model = load_network(plan.model)
    empty = empty_index(model, metadata, settings.search_mode, settings.partition_levels)
    index = merge_shards(empty, folder, plan)
    merge_seconds = time.perf_counter() - merging
    return index, ShardReport(runner.name, folder, missing, reused, run, merge_seconds)


def _log(progress: bool) -> Callable[[str], None]:
    if not progress:
        return lambda message: None
    return lambda message: print(message, file=sys.stderr, flush=True)
