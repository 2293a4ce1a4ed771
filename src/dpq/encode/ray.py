"""Where shards run on a Ray cluster: :class:`RayRunner`.

The runner decides only where the shards of a plan (:mod:`dpq.encode.shards`) are encoded:
a Ray Data dataset of shard numbers mapped by :class:`ShardEncoder`, a callable class of
which Ray keeps a fixed pool of actors (``map_batches(ShardEncoder,
compute=ActorPoolStrategy(size=actors))``), each loading the model and opening the source
once. Inside an actor a shard goes through :func:`dpq.encode.shards.encode_shard`, i.e. the
one-process :func:`dpq.encode.build.build_index`, so its codes are those of ``dpq encode``.
Everything else (the plan, the shard files, the merge) is :func:`dpq.encode.job.encode_collection`'s::

    settings = EncodeSettings(out, SourceSpec(images="digits"), model=path,
                              runner=RayRunner(actors=2), shards=4)
    encode_collection(settings)

Every node must see the model, the source and the shard folder at the same paths (a shared
filesystem; on one machine that holds by itself), and must have dpq installed.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dpq.encode.shards import EncodePlan, ShardRun, encode_shard

__all__ = ["RayRunner", "ShardEncoder"]

INSTALL_HINT = "pip install 'dpq[distributed]' (or pip install 'ray[data]')"


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or a ValueError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the part we use
    except ImportError as exc:
        raise ValueError(
            f"--runner ray needs Ray with Ray Data, which is not installed ({exc}); install "
            f"it with {INSTALL_HINT}, or encode in this process (leave out --runner ray)."
        ) from None
    return ray


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


@dataclass(frozen=True)
class RayRunner:
    """Shards encoded by a pool of Ray Data actors (a :class:`~dpq.encode.shards.ShardRunner`).

    Attributes:
        address: a running cluster (``ray start --head`` printed it; "auto" finds a local
            one); None starts a local cluster for each run and stops it afterwards. A Ray
            session already open in this process is used as it is.
        actors: encoder actors (default: as many as the cluster's CPUs, or GPUs with
            ``gpus_per_actor``, allow; never more than the shards to encode).
        cpus_per_actor, gpus_per_actor: resources per actor (a GPU actor encodes on "cuda").
        workers_per_actor: processes decoding images read on demand inside each actor (0:
            the actor decodes; give a GPU actor a few, and the CPUs for them).
        num_cpus: CPUs of a local cluster (default: all).

    Raises ValueError when Ray is not installed (saying how to install it) or ``actors`` is
    not a positive integer.
    """

    address: str | None = None
    actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    workers_per_actor: int = 0
    num_cpus: int | None = None
    name: ClassVar[str] = "Ray"

    def __post_init__(self) -> None:
        require_ray()
        if self.actors is not None and (not isinstance(self.actors, int) or self.actors < 1):
            raise ValueError(f"--actors must be a positive integer; got {self.actors!r}.")

    def run(
        self, folder: Path, shards: Sequence[int], progress: bool, log: Callable[[str], None]
    ) -> ShardRun:
        """Encode ``shards`` of the plan in ``folder`` on the cluster; see the class doc."""
        ray = require_ray()
        started_here = False
        connecting = time.perf_counter()
        try:
            started_here = connect(ray, self.address, self.num_cpus)
            startup = time.perf_counter() - connecting
            actors = min(self.actors or self._cluster_actors(ray), len(shards))
            running = time.perf_counter()
            run = self._run_stage(folder, shards, actors, progress, log)
            run.startup_seconds, run.stage_seconds = startup, time.perf_counter() - running
        finally:
            if started_here:
                ray.shutdown()
        return run

    def _cluster_actors(self, ray: Any) -> int:
        resources = ray.cluster_resources()
        cpus, gpus = self.cpus_per_actor, self.gpus_per_actor
        by_cpu = int(resources.get("CPU", 1) // max(cpus, 1e-9)) if cpus else 0
        if not gpus:
            return max(1, by_cpu)
        by_gpu = int(resources.get("GPU", 0) // gpus)
        if by_gpu < 1:
            raise ValueError(
                f"--gpus-per-actor {gpus} but the Ray cluster has {resources.get('GPU', 0)} "
                "GPUs; leave the flag out to encode on CPUs."
            )
        return by_gpu if not cpus else max(1, min(by_cpu, by_gpu))

    def _run_stage(
        self,
        folder: Path,
        shards: Sequence[int],
        actors: int,
        progress: bool,
        say: Callable[[str], None],
    ) -> ShardRun:
        """The Ray Data stage: ``shards`` mapped by a pool of ``actors`` ShardEncoders."""
        import ray.data

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
                "device": "cuda" if self.gpus_per_actor else "cpu",
                "workers": self.workers_per_actor,
            },
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
            num_cpus=self.cpus_per_actor,
            num_gpus=self.gpus_per_actor or None,
        )
        run, setup_cpu = ShardRun(actors=actors), {}
        for row in dataset.iter_rows():
            shard, error, host = int(row["shard"]), str(row["error"]), str(row["host"])
            run.shard_seconds += float(row["seconds"])
            run.shard_cpu_seconds += float(row["cpu_seconds"])
            run.hosts.add(host)
            setup_cpu[(host, int(row["pid"]))] = float(row["setup_cpu_seconds"])
            if error:
                run.failures.append((shard, error))
                say(f"shard {shard} failed on {host}: {error}")
            else:
                say(f"shard {shard}: {int(row['items']):,} items in {float(row['seconds']):.1f} s")
        run.setup_cpu_seconds = sum(setup_cpu.values())
        return run


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
        try:
            self._open(device)
        except Exception as exc:  # reported with each shard instead of failing the actor
            self.setup_error = f"{type(exc).__name__}: {exc}"
        self.setup_cpu_seconds = time.process_time()

    def _open(self, device: str) -> None:
        from dpq.methods import load_network
        from dpq.model.files import read_checkpoint_config

        self.plan = EncodePlan.load(self.folder)
        _config, record = read_checkpoint_config(self.plan.model)
        if record.get("weights_sha256") != self.plan.weights_sha256:
            raise ValueError(
                f"the model {self.plan.model} on {self.host} is not the one the plan was "
                "made with (another weights checksum); every node must see the same model."
            )
        self.model = load_network(self.plan.model, device=device)
        self.inputs, _labels, _classes = self.plan.source.open(progress=False)
        if len(self.inputs) != self.plan.source_items:
            raise ValueError(
                f"{self.plan.source.describe()} has {len(self.inputs)} items on {self.host} "
                f"but {self.plan.source_items} where the plan was made; every node must see "
                "the same files at the same path."
            )

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
