"""Encoding a collection on a Ray cluster: code shards on disk, merged into one index.

:func:`encode_on_ray` splits the items to encode into ``shards`` contiguous ranges and
encodes them with Ray Data: a dataset of shard numbers mapped by :class:`ShardEncoder`, a
callable class of which Ray keeps a fixed pool of actors
(``map_batches(ShardEncoder, compute=ActorPoolStrategy(size=actors))``), each loading the
model and opening the source once. Inside an actor a shard goes through the one-process
path (:func:`dpq.encode.build.build_index`), so its codes are those of ``dpq encode``.

On disk, in the shard folder (default ``<out>.shards/``):

- ``plan.json`` with ``plan-rows.npy``, ``plan-ids.npy`` (and ``plan-labels.npy``): which
  source rows are encoded, under which ids and labels, cut into which shards, with which
  model (its weights' SHA-256); a fingerprint of all that names the plan.
- ``shard-NNNNN.npz``, one per shard, written atomically: ``ids`` int64 (n,), ``codes``
  (n, L) uint8/uint16, ``norms`` float32 (n,) (squared norm of the full reconstruction, the
  per-item norm of faiss's ST_norm_float), ``labels`` when the items have them, and a JSON
  ``header`` (plan fingerprint, shard range, codebook SHA-256, checksum).

A shard already on disk for the same plan is not encoded again, so re-running the same
command after a failure (a corrupt image, a lost node, an interrupt) encodes only the
missing shards. A shard that fails does not stop the others; the error names it.
:func:`merge_shards` then adds the shards, in order, to one :class:`~dpq.index.DPQIndex`.

Every node must see the model, the source and the shard folder at the same paths (a shared
filesystem; on one machine that holds by itself), and must have dpq installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpq.atomic import atomic_writer, write_json_atomic

INSTALL_HINT = "pip install 'dpq[distributed]' (or pip install 'ray[data]')"
PLAN_FILE = "plan.json"
PLAN_FORMAT = "dpq-encode-plan"
SHARD_FORMAT = "dpq-code-shard"
FORMAT_VERSION = 1
_PLAN_ARRAYS = ("rows", "ids", "labels")


class ShardEncodingError(RuntimeError):
    """Some shards could not be encoded; the message names them, their first error, and
    says that re-running encodes only those."""


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or a ValueError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the part we use
    except ImportError as exc:
        raise ValueError(
            f"--engine ray needs Ray with Ray Data, which is not installed ({exc}); install "
            f"it with {INSTALL_HINT}, or encode in this process (leave out --engine ray)."
        ) from None
    return ray


# ---------------------------------------------------------------------------- the source


@dataclass(frozen=True)
class SourceSpec:
    """How every worker opens the items to encode: the arguments of
    :func:`dpq.data.load_source` (JSON-ready), or an .npy/.txt file of model inputs.

    Attributes:
        images: a :func:`~dpq.data.load_source` spec ("digits", CIFAR-10, a folder or zip of
            ``<class>/<image>``, a list file).
        features: instead of ``images``: float (N, F) model inputs (an 'identity' backbone).
        image_root, image_size, strip_prefix, skip_corrupt, cache_dir: as in ``load_source``.
    """

    images: str | None = None
    features: str | None = None
    image_root: str | None = None
    image_size: int | None = None
    strip_prefix: str | None = None
    skip_corrupt: bool = False
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if (self.images is None) == (self.features is None):
            raise ValueError("give exactly one of images (a data source) and features (.npy).")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return str(self.images if self.images is not None else self.features)

    def open(self) -> tuple[Any, np.ndarray | None, list[str] | None]:
        """(inputs, labels, classes): images read on demand where the source allows it
        (list files), a memory-mapped .npy of features; labels/classes None for features."""
        if self.features is not None:
            path = Path(self.features)
            if path.suffix.lower() == ".npy" and path.is_file():
                try:
                    return np.load(path, mmap_mode="r", allow_pickle=False), None, None
                except ValueError:
                    pass  # not a plain array: read_array says why
            from dpq.data import read_array

            return read_array(path, "--features"), None, None
        from dpq.data import load_source

        source = load_source(
            self.images,
            image_root=self.image_root,
            image_size=self.image_size,
            strip_prefix=self.strip_prefix,
            skip_corrupt=self.skip_corrupt,
            cache_dir=self.cache_dir,
            in_memory=False,
        )
        if source.kind == "features":  # pragma: no cover - load_source needs features=
            raise ValueError("images must be an image source; give saved features as features.")
        return source.inputs, source.labels, source.classes


def _take_rows(inputs: Any, rows: np.ndarray) -> Any:
    """The inputs at ``rows``: a subset reader for on-demand images, else an array."""
    subset = getattr(inputs, "subset", None)
    if callable(subset):
        return subset(rows)
    return np.asarray(inputs[rows])


# ---------------------------------------------------------------------------- the plan


def shard_bounds(num_items: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous (start, stop) ranges covering 0..num_items, sizes differing by
    at most one (the first ones larger)."""
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"--shards must be a positive integer; got {shards!r}.")
    if shards > num_items:
        raise ValueError(
            f"--shards {shards} is more than the {num_items} items to encode; use at most "
            f"{num_items} shards."
        )
    edges = [num_items * s // shards for s in range(shards + 1)]
    return [(edges[s], edges[s + 1]) for s in range(shards)]


def _check_ids(ids: np.ndarray, n: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.shape != (n,) or (n and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"ids must be int (n,) with n = {n} items; got {ids.dtype} {ids.shape}.")
    ids = ids.astype(np.int64)
    if n and ids.min() < 0:
        raise ValueError(f"ids must be >= 0 (-1 marks padding in results); got {ids.min()}.")
    if len(np.unique(ids)) != n:
        raise ValueError("ids must be unique; the given ids contain duplicates.")
    return ids


@dataclass(frozen=True)
class EncodePlan:
    """What a sharded encoding does; saved in the shard folder, read by every actor.

    Attributes:
        source: how the items are opened.
        model: the model checkpoint directory.
        weights_sha256: SHA-256 of the model's weights (a node with another file refuses).
        source_items: items in the source (checked on every node).
        rows: int64 (n,) source rows to encode, in order.
        ids: int64 (n,) the items' ids in the index.
        labels: int64 (n,) or uint8 (n, C) labels, or None.
        bounds: (start, stop) positions in ``rows`` of each shard.
        batch_size: inputs per forward pass.
    """

    source: SourceSpec
    model: str
    weights_sha256: str
    source_items: int
    rows: np.ndarray
    ids: np.ndarray
    labels: np.ndarray | None
    bounds: list[tuple[int, int]]
    batch_size: int = 256
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256()
        described = {
            "source": self.source.to_dict(),
            "weights_sha256": self.weights_sha256,
            "source_items": self.source_items,
            "bounds": [list(b) for b in self.bounds],
        }
        digest.update(json.dumps(described, sort_keys=True).encode())
        for array in (self.rows, self.ids, self.labels):
            if array is not None:
                digest.update(repr((array.dtype.str, array.shape)).encode())
                digest.update(np.ascontiguousarray(array).tobytes())
        object.__setattr__(self, "fingerprint", digest.hexdigest())

    @property
    def num_shards(self) -> int:
        return len(self.bounds)

    @property
    def num_items(self) -> int:
        return len(self.rows)

    def header(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "source": self.source.to_dict(),
            "model": self.model,
            "weights_sha256": self.weights_sha256,
            "source_items": self.source_items,
            "items": self.num_items,
            "bounds": [list(b) for b in self.bounds],
            "batch_size": self.batch_size,
            "has_labels": self.labels is not None,
        }

    def save(self, folder: Path) -> None:
        """The arrays first, ``plan.json`` last (each atomically)."""
        for name in _PLAN_ARRAYS:
            array = getattr(self, name)
            if array is not None:
                with atomic_writer(folder / f"plan-{name}.npy") as handle:
                    np.save(handle, array)
        write_json_atomic(folder / PLAN_FILE, self.header())

    @classmethod
    def load(cls, folder: Path, mmap: bool = True) -> EncodePlan:
        """Read a saved plan (arrays memory-mapped), checking its fingerprint."""
        path = folder / PLAN_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist; the shard folder must be shared by every node."
            )
        header = json.loads(path.read_text())
        if header.get("format") != PLAN_FORMAT or header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a dpq encode plan of version {FORMAT_VERSION}.")
        arrays = {}
        for name in _PLAN_ARRAYS:
            array_path = folder / f"plan-{name}.npy"
            if name == "labels" and not header["has_labels"]:
                arrays[name] = None
                continue
            arrays[name] = np.load(array_path, mmap_mode="r" if mmap else None, allow_pickle=False)
        plan = cls(
            SourceSpec(**header["source"]),
            header["model"],
            header["weights_sha256"],
            int(header["source_items"]),
            arrays["rows"],
            arrays["ids"],
            arrays["labels"],
            [tuple(b) for b in header["bounds"]],
            int(header["batch_size"]),
        )
        if plan.fingerprint != header["fingerprint"]:
            raise ValueError(
                f"the plan files in {folder} do not match {PLAN_FILE} (fingerprint); they were "
                "changed or half-replaced. Delete the folder and encode again."
            )
        return plan


def shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.npz"


# ---------------------------------------------------------------------------- shard files


def _shard_checksum(arrays: Mapping[str, np.ndarray], header_text: str) -> str:
    digest = hashlib.sha256(header_text.encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def write_shard(
    path: Path,
    header: Mapping[str, Any],
    ids: np.ndarray,
    codes: np.ndarray,
    norms: np.ndarray,
    labels: np.ndarray | None,
) -> Path:
    """Write one code shard (npz, no pickle) atomically, with a checksum in its header."""
    arrays = {"ids": ids, "codes": codes, "norms": norms}
    if labels is not None:
        arrays["labels"] = labels
    text = json.dumps(dict(header), sort_keys=True)
    full = {**header, "checksum_sha256": _shard_checksum(arrays, text)}
    with atomic_writer(path) as handle:
        np.savez(handle, header=np.array(json.dumps(full, sort_keys=True)), **arrays)
    return path


def read_shard_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a shard file, or None when it is absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return json.loads(str(npz["header"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def read_shard(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, arrays) of a shard file, its checksum verified (ValueError if it fails)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path} is not a readable code shard ({exc}); encode it again.") from None
    header = json.loads(str(arrays.pop("header")))
    stored = header.pop("checksum_sha256", None)
    if stored != _shard_checksum(arrays, json.dumps(header, sort_keys=True)):
        raise ValueError(f"{path} failed its checksum; delete it and run the command again.")
    return header, arrays


def shard_is_done(folder: Path, plan: EncodePlan, shard: int) -> bool:
    """Whether the shard's file is on disk and was written for this plan and range."""
    header = read_shard_header(shard_path(folder, shard))
    start, stop = plan.bounds[shard]
    return (
        header is not None
        and header.get("format") == SHARD_FORMAT
        and header.get("plan") == plan.fingerprint
        and header.get("shard") == shard
        and (header.get("start"), header.get("stop")) == (start, stop)
    )


def encode_shard(
    model: Any, inputs: Any, plan: EncodePlan, shard: int, folder: Path, workers: int = 0
) -> int:
    """Encode shard ``shard`` of ``plan`` with ``model`` into its file; returns its items.

    The one-process path: :func:`dpq.encode.build.build_index` over the shard's rows, images
    read on demand decoded by ``workers`` processes (0: the actor itself, which Ray gave
    one CPU)."""
    from dpq.encode.build import build_index

    start, stop = plan.bounds[shard]
    rows = np.asarray(plan.rows[start:stop])
    ids = np.asarray(plan.ids[start:stop])
    labels = None if plan.labels is None else np.asarray(plan.labels[start:stop])
    index = build_index(
        model,
        _take_rows(inputs, rows),
        ids=ids,
        labels=labels,
        batch_size=plan.batch_size,
        workers=workers,
    )
    codes = index.codes
    reconstruction = index.decode(codes)
    norms = np.einsum("nd,nd->n", reconstruction, reconstruction).astype(np.float32)
    header = {
        "format": SHARD_FORMAT,
        "format_version": FORMAT_VERSION,
        "plan": plan.fingerprint,
        "shard": shard,
        "start": start,
        "stop": stop,
        "codebook_sha256": index.codebook_sha256,
        "num_levels": index.num_levels,
        "codebook_size": index.codebook_size,
    }
    write_shard(shard_path(folder, shard), header, index.ids, codes, norms, index.labels)
    return stop - start


class ShardEncoder:
    """The Ray Data callable class: one model and one opened source per actor.

    Called with batches ``{"shard": int64 (b,)}``, it encodes and writes those shards and
    returns one row per shard: ``shard``, ``items``, ``seconds`` (wall), ``cpu_seconds``
    (this process's CPU time, all threads), ``host``, ``pid``, ``setup_cpu_seconds`` (CPU the
    actor spent before its first shard: worker start, imports, model and source) and
    ``error`` ("" on success, else the exception as text: a failing shard does not stop the
    others).
    """

    def __init__(self, folder: str, device: str = "cpu", workers: int = 0) -> None:
        self.folder = Path(folder)
        self.workers = workers
        self.host = socket.gethostname()
        self.setup_error = ""
        self.setup_cpu_seconds = 0.0
        try:
            from dpq.model.files import read_checkpoint_config
            from dpq.model.network import DPQModel

            self.plan = EncodePlan.load(self.folder)
            _config, record = read_checkpoint_config(self.plan.model)
            if record.get("weights_sha256") != self.plan.weights_sha256:
                raise ValueError(
                    f"the model {self.plan.model} on {self.host} is not the one the plan was "
                    "made with (another weights checksum); every node must see the same model."
                )
            self.model = DPQModel.from_checkpoint(self.plan.model, device=device)
            self.inputs, _labels, _classes = self.plan.source.open()
            if len(self.inputs) != self.plan.source_items:
                raise ValueError(
                    f"{self.plan.source.describe()} has {len(self.inputs)} items on {self.host} "
                    f"but {self.plan.source_items} where the plan was made; every node must see "
                    "the same files at the same path."
                )
        except Exception as exc:  # reported with each shard instead of failing the actor
            self.setup_error = f"{type(exc).__name__}: {exc}"
        self.setup_cpu_seconds = time.process_time()

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list[Any]] = {name: [] for name in _RESULT_COLUMNS}
        for shard in np.asarray(batch["shard"]).tolist():
            began, began_cpu = time.perf_counter(), time.process_time()
            items, error = 0, self.setup_error
            if not error:
                try:
                    items = encode_shard(
                        self.model, self.inputs, self.plan, shard, self.folder, self.workers
                    )
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
            done = {
                "shard": shard,
                "items": items,
                "seconds": time.perf_counter() - began,
                "cpu_seconds": time.process_time() - began_cpu,
                "host": self.host,
                "pid": os.getpid(),
                "setup_cpu_seconds": self.setup_cpu_seconds,
                "error": error,
            }
            for name, value in done.items():
                rows[name].append(value)
        return {
            name: np.asarray(values, dtype=_RESULT_COLUMNS[name]) for name, values in rows.items()
        }


_RESULT_COLUMNS: dict[str, Any] = {
    "shard": np.int64,
    "items": np.int64,
    "seconds": np.float64,
    "cpu_seconds": np.float64,
    "host": np.str_,
    "pid": np.int64,
    "setup_cpu_seconds": np.float64,
    "error": np.str_,
}


# ---------------------------------------------------------------------------- merging


def merge_shards(index: Any, folder: Path, plan: EncodePlan) -> Any:
    """Add every shard of ``plan`` (checksums verified), in order, to ``index``; returns it.

    Raises ValueError when a shard is missing, of another plan, or made with other codebooks.
    """
    for shard in range(plan.num_shards):
        path = shard_path(folder, shard)
        if not shard_is_done(folder, plan, shard):
            raise ValueError(f"{path} is missing or belongs to another plan; encode it again.")
        header, arrays = read_shard(path)
        if header["codebook_sha256"] != index.codebook_sha256:
            raise ValueError(
                f"{path} was encoded with other codebooks than the index's; encode it again."
            )
        index.add(arrays["codes"], ids=arrays["ids"], labels=arrays.get("labels"))
    return index


# ---------------------------------------------------------------------------- the driver


@dataclass
class RayEncodeResult:
    """What :func:`encode_on_ray` did.

    Attributes:
        index: the merged index (also saved to ``path``).
        path: the index file.
        shard_dir: the folder of the plan and the shards.
        encoded: shards encoded by this call; reused: shards already on disk.
        actors: Ray actors used (0 when nothing was left to encode).
        hosts: the machines that encoded shards in this call.
        seconds: wall time of the call; startup_seconds: connecting to / starting Ray;
            encode_seconds: the Ray Data stage (actor start, model load, encoding);
            shard_seconds: encoding wall time summed over shards (inside the actors);
            shard_cpu_seconds: their CPU time; setup_cpu_seconds: CPU time the actors spent
            before their first shard (worker start, imports, model, source), summed;
            merge_seconds: merging the shards and saving the index.
    """

    index: Any
    path: Path
    shard_dir: Path
    encoded: list[int]
    reused: list[int]
    actors: int
    hosts: list[str]
    seconds: float
    startup_seconds: float
    encode_seconds: float
    shard_seconds: float
    merge_seconds: float
    shard_cpu_seconds: float = 0.0
    setup_cpu_seconds: float = 0.0

    def summary(self) -> str:
        index = self.index
        bits = index.num_levels * int(np.log2(index.codebook_size))
        return (
            f"wrote {self.path}: {index.ntotal:,} items, {index.num_levels} levels x "
            f"{index.codebook_size} codewords (up to {bits} bits), search {index.search_mode}; "
            f"{len(self.encoded)} shard(s) encoded on Ray ({self.actors} actor(s), "
            f"{', '.join(self.hosts) or 'no host'}), {len(self.reused)} already in "
            f"{self.shard_dir}; {self.seconds:.1f} s ({index.ntotal / max(self.seconds, 1e-9):,.0f}"
            " items/s)"
        )


def connect(ray: Any, address: str | None, num_cpus: int | None) -> bool:
    """Connect to ``address`` or start a local cluster; True when this call started it."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if address is None:
        # local workers must import this dpq even when it is not installed (a source tree)
        package_parent = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
        options.update(
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
    ray.init(address=address, **options)
    return True


def _cluster_actors(ray: Any, cpus_per_actor: float, gpus_per_actor: float) -> int:
    resources = ray.cluster_resources()
    by_cpu = int(resources.get("CPU", 1) // max(cpus_per_actor, 1e-9)) if cpus_per_actor else 0
    if gpus_per_actor:
        by_gpu = int(resources.get("GPU", 0) // gpus_per_actor)
        if by_gpu < 1:
            raise ValueError(
                f"--gpus-per-actor {gpus_per_actor} but the Ray cluster has "
                f"{resources.get('GPU', 0)} GPUs; leave the flag out to encode on CPUs."
            )
        return by_gpu if not cpus_per_actor else max(1, min(by_cpu, by_gpu))
    return max(1, by_cpu)


def _make_plan(
    model_path: str | os.PathLike[str],
    source: SourceSpec,
    shards: int,
    rows: np.ndarray | None,
    ids: np.ndarray | None,
    labels: np.ndarray | None,
    batch_size: int,
) -> tuple[EncodePlan, list[str] | None]:
    from dpq.model.files import read_checkpoint_config

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"the batch size must be a positive integer; got {batch_size!r}.")
    _config, record = read_checkpoint_config(model_path)
    inputs, source_labels, classes = source.open()
    source_items = len(inputs)
    if rows is None:
        rows = np.arange(source_items, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= source_items)):
        raise ValueError(
            f"the rows to encode must be source positions in [0, {source_items}); make the "
            "split from the same source."
        )
    n = len(rows)
    if labels is None and source_labels is not None:
        labels = np.asarray(source_labels)[rows]
    elif labels is not None:
        labels = np.asarray(labels)
        if len(labels) != n:
            raise ValueError(
                f"labels has {len(labels)} rows but there are {n} items; give one per item, in "
                "the same order."
            )
    if ids is None:
        ids = rows
    elif len(ids) != n:
        raise ValueError(
            f"ids has {len(ids)} rows but there are {n} items; give one per item, in the same "
            "order."
        )
    plan = EncodePlan(
        source,
        str(Path(model_path).resolve()),
        record["weights_sha256"],
        source_items,
        rows,
        _check_ids(ids, n),
        labels,
        shard_bounds(n, shards),
        batch_size,
    )
    return plan, classes


def _prepare_folder(folder: Path, plan: EncodePlan) -> None:
    """Save the plan in ``folder``, unless the same plan is there; refuse to mix plans."""
    folder.mkdir(parents=True, exist_ok=True)
    plan_file = folder / PLAN_FILE
    if plan_file.is_file():
        try:
            existing = json.loads(plan_file.read_text()).get("fingerprint")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            existing = None
        if existing == plan.fingerprint:
            return
        if any(folder.glob("shard-*.npz")):
            raise ValueError(
                f"{folder} holds shards of another encoding (another model, source, selection "
                "of items or shard count); delete the folder or choose another --shard-dir."
            )
    plan.save(folder)


def encode_on_ray(
    model_path: str | os.PathLike[str],
    source: SourceSpec,
    out: str | os.PathLike[str],
    *,
    shards: int,
    rows: np.ndarray | None = None,
    ids: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    address: str | None = None,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    workers_per_actor: int = 0,
    num_cpus: int | None = None,
    shard_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 256,
    metadata: Mapping[str, Any] | None = None,
    search_mode: str | None = None,
    partition_levels: int = 0,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> RayEncodeResult:
    """Encode ``source`` with the model at ``model_path`` on a Ray cluster into ``out``.

    Args:
        model_path: a model checkpoint directory (the same path on every node).
        source: the items (the same path on every node).
        out: the index file to write (.npz).
        shards: number of code shards (units of work and of re-running).
        rows: int64 (n,) source rows to encode (default: all, in order), e.g. a split's.
        ids: int64 (n,) item ids (default: the source rows).
        labels: (n,) or (n, C) labels (default: the source's).
        address: a running cluster (``ray start --head`` printed it; "auto" finds a local
            one); None starts a local cluster for this call and stops it afterwards. A Ray
            session already open in this process is used as it is.
        actors: encoder actors (default: as many as the cluster's CPUs, or GPUs with
            ``gpus_per_actor``, allow, at most one per shard left).
        cpus_per_actor, gpus_per_actor: resources per actor (a GPU actor encodes on "cuda").
        workers_per_actor: processes decoding images read on demand inside each actor (0:
            the actor decodes; give a GPU actor a few, and the CPUs for them).
        num_cpus: CPUs of a local cluster (default: all).
        shard_dir: the plan and shard folder (default ``<out>.shards``).
        batch_size: inputs per forward pass.
        metadata: JSON-ready metadata of the index.
        search_mode: how the index is searched (default: the model's).
        partition_levels: group the merged index by its first 0, 1 or 2 codes (nprobe search).
        progress: Ray Data's progress bars and one line per shard on stderr.
        log: receives one-line messages (default: stderr when ``progress``).

    Raises:
        ValueError: missing Ray, bad arguments, a shard folder of another plan.
        ShardEncodingError: shards that failed (the others stay on disk for the re-run).
    """
    from dpq.atomic import check_writable_file
    from dpq.encode.build import empty_index
    from dpq.model.network import DPQModel

    began = time.perf_counter()
    say = log or (
        (lambda message: print(message, file=sys.stderr, flush=True))
        if progress
        else (lambda message: None)
    )
    ray = require_ray()
    out = check_writable_file(out, "--out")
    folder = Path(shard_dir) if shard_dir is not None else out.with_name(out.name + ".shards")
    if actors is not None and (not isinstance(actors, int) or actors < 1):
        raise ValueError(f"--actors must be a positive integer; got {actors!r}.")
    plan, classes = _make_plan(model_path, source, shards, rows, ids, labels, batch_size)
    _prepare_folder(folder, plan)
    missing = [s for s in range(plan.num_shards) if not shard_is_done(folder, plan, s)]
    reused = [s for s in range(plan.num_shards) if s not in missing]
    say(
        f"{plan.num_items:,} items in {plan.num_shards} shards ({folder}): {len(missing)} to "
        f"encode, {len(reused)} already done"
    )
    startup = encode_seconds = 0.0
    pool, stage = 0, _StageResult()
    if missing:
        started_here = False
        connecting = time.perf_counter()
        try:
            started_here = connect(ray, address, num_cpus)
            startup = time.perf_counter() - connecting
            pool = actors or _cluster_actors(ray, cpus_per_actor, gpus_per_actor)
            pool = min(pool, len(missing))
            running = time.perf_counter()
            resources = (cpus_per_actor, gpus_per_actor, workers_per_actor)
            stage = _run_shards(ray, folder, missing, pool, resources, progress, say)
            encode_seconds = time.perf_counter() - running
        finally:
            if started_here:
                ray.shutdown()
    if stage.failures:
        failures = sorted(stage.failures)
        shown = "; ".join(f"shard {s}: {error}" for s, error in failures[:3])
        raise ShardEncodingError(
            f"{len(failures)} of {plan.num_shards} shards failed ({shown}); the other "
            f"{plan.num_shards - len(failures)} are in {folder}. Fix the cause and run the same "
            "command again: only the missing shards are encoded."
        )
    merge_began = time.perf_counter()
    model = DPQModel.from_checkpoint(plan.model)
    meta = {
        "created_by": "dpq encode --engine ray",
        "source": source.describe(),
        **(metadata or {}),
    }
    meta.setdefault("model", str(model_path))
    if classes is not None and labels is None:
        meta.setdefault("classes", classes)
    index = merge_shards(empty_index(model, meta, search_mode, partition_levels), folder, plan)
    path = index.save(out)
    merge_seconds = time.perf_counter() - merge_began
    return RayEncodeResult(
        index=index,
        path=path,
        shard_dir=folder,
        encoded=missing,
        reused=reused,
        actors=pool,
        hosts=sorted(stage.hosts),
        seconds=time.perf_counter() - began,
        startup_seconds=startup,
        encode_seconds=encode_seconds,
        shard_seconds=stage.seconds,
        merge_seconds=merge_seconds,
        shard_cpu_seconds=stage.cpu_seconds,
        setup_cpu_seconds=sum(stage.setup_cpu.values()),
    )


@dataclass
class _StageResult:
    """What the actors reported: failures [(shard, error)], hosts, summed shard wall and
    CPU seconds, and each actor's setup CPU seconds ({(host, pid): seconds})."""

    failures: list[tuple[int, str]] = field(default_factory=list)
    hosts: set[str] = field(default_factory=set)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    setup_cpu: dict[tuple[str, int], float] = field(default_factory=dict)


def _run_shards(
    ray: Any,
    folder: Path,
    shards: Sequence[int],
    actors: int,
    resources: tuple[float, float, int],
    progress: bool,
    say: Callable[[str], None],
) -> _StageResult:
    """Encode ``shards`` with a pool of ``actors`` ShardEncoders (Ray Data); ``resources``:
    (CPUs, GPUs, decoding workers) per actor."""
    import ray.data

    cpus_per_actor, gpus_per_actor, workers = resources
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    if not progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    items = [{"shard": int(s)} for s in shards]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardEncoder,
        batch_size=1,
        fn_constructor_kwargs={
            "folder": str(folder.resolve()),
            "device": "cuda" if gpus_per_actor else "cpu",
            "workers": workers,
        },
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
    )
    stage = _StageResult()
    for row in dataset.iter_rows():
        shard, error, host = int(row["shard"]), str(row["error"]), str(row["host"])
        stage.seconds += float(row["seconds"])
        stage.cpu_seconds += float(row["cpu_seconds"])
        stage.hosts.add(host)
        stage.setup_cpu[(host, int(row["pid"]))] = float(row["setup_cpu_seconds"])
        if error:
            stage.failures.append((shard, error))
            say(f"shard {shard} failed on {host}: {error}")
        else:
            say(f"shard {shard}: {int(row['items']):,} items in {float(row['seconds']):.1f} s")
    return stage
