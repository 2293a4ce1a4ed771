"""Encoding in shards: the plan, the shard files, and their merge into one index.

A sharded encoding cuts the items to encode into ``shards`` contiguous ranges. In its
shard folder (default ``<out>.shards/``):

- ``plan.json`` with ``plan-rows.npy``, ``plan-ids.npy`` (and ``plan-labels.npy``): which
  source rows are encoded, under which ids and labels, cut into which shards, with which
  model (its weights' SHA-256); a fingerprint of all that names the plan.
- ``shard-NNNNN.npz``, one per shard: an index file in the index's own format
  (``index.save`` of a DPQ or binary index: checksummed, written atomically) holding the shard's
  items, encoded by :func:`dpq.encode.build.build_index`; its metadata ``encode_shard``
  names the plan and the shard's range.

A shard already on disk for the same plan is not encoded again, so running the same
encoding again after a failure (a corrupt image, a lost node, an interrupt) encodes only
the missing shards. :func:`merge_shards` adds the shards, in order, to one index, which is
then the index one process would have built. Where the shards run is the business of a
:class:`ShardRunner` (:class:`dpq.encode.ray.RayRunner`: Ray Data actors).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dpq.atomic import atomic_writer, write_json_atomic
from dpq.data.spec import SourceSpec
from dpq.encode.build import build_index
from dpq.index.kinds import AnyIndex, load_any, same_codes

PLAN_FILE = "plan.json"
PLAN_FORMAT = "dpq-encode-plan"
PLAN_VERSION = 2  # 1: shards in a format of their own
SHARD_KEY = "encode_shard"
_PLAN_ARRAYS = ("rows", "ids", "labels")


class ShardEncodingError(RuntimeError):
    """Some shards could not be encoded; the message names them, their first error, and
    says that running again encodes only those."""


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


@dataclass(frozen=True)
class EncodePlan:
    """What a sharded encoding does; saved in the shard folder, read by every worker.

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
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"the batch size must be a positive integer; got {self.batch_size!r}.")
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
            "format_version": PLAN_VERSION,
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
        """The arrays, then ``plan.json`` (each atomically): a plan file names whole arrays."""
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
        if header.get("format") != PLAN_FORMAT or header.get("format_version") != PLAN_VERSION:
            raise ValueError(f"{path} is not a dpq encode plan of version {PLAN_VERSION}.")
        arrays = {}
        for name in _PLAN_ARRAYS:
            if name == "labels" and not header["has_labels"]:
                arrays[name] = None
                continue
            arrays[name] = np.load(
                folder / f"plan-{name}.npy", mmap_mode="r" if mmap else None, allow_pickle=False
            )
        plan = cls(
            SourceSpec.from_dict(header["source"]),
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


def prepare_folder(folder: Path, plan: EncodePlan) -> None:
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


# ---------------------------------------------------------------------------- shard files


def shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.npz"


def shard_identity(plan: EncodePlan, shard: int) -> dict[str, Any]:
    """What a shard file's metadata says it holds: the plan and the range of its rows."""
    start, stop = plan.bounds[shard]
    return {"plan": plan.fingerprint, "shard": shard, "start": start, "stop": stop}


def shard_is_done(folder: Path, plan: EncodePlan, shard: int) -> bool:
    """Whether the shard's file is on disk, readable as an index file (its header checksum
    and array sizes; the merge verifies the arrays), and written for this plan and range."""
    try:
        index = load_any(shard_path(folder, shard), mmap=True, verify=False)
    except (OSError, ValueError):  # absent, truncated, of another format
        return False
    return index.metadata.get(SHARD_KEY) == shard_identity(plan, shard)


def encode_shard(
    model: Any, inputs: Any, plan: EncodePlan, shard: int, folder: Path, workers: int = 0
) -> int:
    """Encode shard ``shard`` of ``plan`` with ``model`` into its index file; returns its
    items.

    The one-process path: :func:`dpq.encode.build.build_index` over the shard's rows of
    ``inputs`` (the whole source, as :meth:`dpq.data.SourceSpec.open` gives it), images read
    on demand decoded by ``workers`` processes (0: this process)."""
    start, stop = plan.bounds[shard]
    rows = np.asarray(plan.rows[start:stop])
    index = build_index(
        model,
        take_rows(inputs, rows),
        ids=np.asarray(plan.ids[start:stop]),
        labels=None if plan.labels is None else np.asarray(plan.labels[start:stop]),
        batch_size=plan.batch_size,
        metadata={SHARD_KEY: shard_identity(plan, shard)},
        workers=workers,
    )
    index.save(shard_path(folder, shard))
    return stop - start


def take_rows(inputs: Any, rows: np.ndarray) -> Any:
    """The inputs at ``rows`` (int64 (n,)): a subset reader for images read on demand, else
    an array."""
    subset = getattr(inputs, "subset", None)
    if callable(subset):
        return subset(rows)
    return np.asarray(inputs[rows])


def merge_shards(index: AnyIndex, folder: Path, plan: EncodePlan) -> AnyIndex:
    """Add every shard of ``plan`` (checksums verified), in order, to ``index``; returns it.

    Raises ValueError when a shard is missing, of another plan, damaged (an
    :class:`~dpq.index.IndexFileError` naming the file) or made with other codebooks (or
    codes of another kind or length).
    """
    for shard in range(plan.num_shards):
        path = shard_path(folder, shard)
        if not shard_is_done(folder, plan, shard):
            raise ValueError(f"{path} is missing or belongs to another plan; encode it again.")
        part = load_any(path, mmap=True)
        if not same_codes(index, part):
            raise ValueError(
                f"{path} was encoded with other codebooks than the index's; encode it again."
            )
        index.add(part.codes, ids=part.ids, labels=part.labels)
    return index


# ---------------------------------------------------------------------------- runners


@dataclass
class ShardRun:
    """What a runner reports about the shards it was given.

    Attributes:
        failures: (shard, error) of each shard that failed (the others are on disk).
        actors: workers used (0 when nothing was run); hosts: the machines they ran on.
        startup_seconds: connecting to / starting the cluster; stage_seconds: the encoding
            stage (worker start, model load, encoding); shard_seconds and
            shard_cpu_seconds: wall and CPU time of encoding, summed over shards;
            setup_cpu_seconds: CPU time the workers spent before their first shard
            (start, imports, model, source), summed.
    """

    failures: list[tuple[int, str]] = field(default_factory=list)
    actors: int = 0
    hosts: set[str] = field(default_factory=set)
    startup_seconds: float = 0.0
    stage_seconds: float = 0.0
    shard_seconds: float = 0.0
    shard_cpu_seconds: float = 0.0
    setup_cpu_seconds: float = 0.0


class ShardRunner(Protocol):
    """Where the shards of a plan are encoded (the distributor; it decides nothing else).

    ``run`` encodes ``shards`` of the plan saved in ``folder``, each with
    :func:`encode_shard`, and reports; a failing shard does not stop the others. ``name``
    says where, in messages ("Ray").
    """

    name: str

    def run(
        self, folder: Path, shards: Sequence[int], progress: bool, log: Callable[[str], None]
    ) -> ShardRun: ...


def check_failures(run: ShardRun, plan: EncodePlan, folder: Path) -> None:
    """Raise :class:`ShardEncodingError` naming the failed shards, if any."""
    if not run.failures:
        return
    failures = sorted(run.failures)
    shown = "; ".join(f"shard {s}: {error}" for s, error in failures[:3])
    raise ShardEncodingError(
        f"{len(failures)} of {plan.num_shards} shards failed ({shown}); the other "
        f"{plan.num_shards - len(failures)} are in {folder}. Fix the cause and run the same "
        "command again: only the missing shards are encoded."
    )


@dataclass
class ShardReport:
    """What a sharded encoding did: where (``runner``), the shard folder, the shards
    encoded by this call and those reused from disk, the runner's report and the seconds
    spent merging the shards."""

    runner: str
    shard_dir: Path
    encoded: list[int]
    reused: list[int]
    run: ShardRun
    merge_seconds: float = 0.0

    def summary(self) -> str:
        hosts = ", ".join(sorted(self.run.hosts)) or "no host"
        return (
            f"{len(self.encoded)} shard(s) encoded on {self.runner} ({self.run.actors} "
            f"actor(s), {hosts}), {len(self.reused)} already in {self.shard_dir}"
        )
