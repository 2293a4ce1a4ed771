"""Training on several processes or machines: the pieces DDP training needs around torch.

``torchrun --nproc-per-node N -m dpq train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set;
:func:`init_from_environment` turns them into a process group (gloo on CPUs, NCCL on
GPUs) whose collectives time out (``DPQ_COLLECTIVE_TIMEOUT`` seconds, default 600), so a
rank that dies or hangs takes the job down with a :class:`CollectiveFailure` naming it,
instead of a hang. The trainer then:

- splits every global batch of the one-process order across the ranks
  (:func:`rank_batches`), so N x (B / N) sees the same items per step as 1 x B;
- lets rank 0 decide what must agree (the time plan, the checkpoint to resume from, whether
  the run folder may be used) and broadcasts it (:func:`broadcast_json`,
  :func:`rank0_decides`) as JSON, never pickle;
- initialises the codebooks by k-means on rank 0 over features gathered from every rank
  (:func:`all_gather_rows`) and broadcasts them (:func:`broadcast_tensors_`), so every rank
  starts from the same codebooks;
- lets DistributedDataParallel all-reduce every gradient, codebooks included, and averages
  the BatchNorm statistics across ranks at the end of every epoch (:func:`average_buffers_`)
  instead of overwriting them with rank 0's.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import hashlib
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

TIMEOUT_ENV = "DPQ_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 600.0
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
T = TypeVar("T")


class CollectiveFailure(RuntimeError):
    """A collective operation failed or timed out: another rank died, hung or disagreed."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a multi-process run.

    Attributes:
        rank: this process, 0..world_size-1 (rank 0 writes checkpoints, logs, the model).
        world_size: processes in the run (all machines).
        local_rank: this process on its machine (its GPU with NCCL).
        local_world_size: processes on this machine.
        backend: "gloo" (CPU tensors) or "nccl" (CUDA tensors).
        timeout_seconds: how long a collective waits for the other ranks.
    """

    rank: int
    world_size: int
    local_rank: int = 0
    local_world_size: int = 1
    backend: str = "gloo"
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tensor_device(self) -> torch.device:
        """Where collective tensors live: the CPU for gloo, this rank's GPU for NCCL."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def device_for(self, requested: str | torch.device) -> torch.device:
        """The device this rank trains on: any CUDA device means this rank's GPU
        (``LOCAL_RANK``: one process per GPU), anything else is kept."""
        device = torch.device(requested)
        if device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device


def _env_int(name: str, environ: dict[str, str]) -> int:
    value = environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"the environment variable {name}={value!r} is not an integer; start the run with "
            "torchrun, which sets it."
        ) from None


def collective_timeout(environ: dict[str, str] | None = None) -> float:
    """Seconds a collective waits (``DPQ_COLLECTIVE_TIMEOUT``, default 600)."""
    environ = os.environ if environ is None else environ
    text = environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds.")
    return seconds


def environment_context(
    environ: dict[str, str] | None = None, device_type: str = "cpu"
) -> DistributedContext | None:
    """The context torchrun's environment describes, or None for a single process
    (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``). ValueError when the variables are incomplete."""
    environ = dict(os.environ if environ is None else environ)
    if "WORLD_SIZE" not in environ or _env_int("WORLD_SIZE", environ) == 1:
        return None
    missing = [name for name in _ENV if name not in environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE is set but {', '.join(missing)} are not; start multi-process training "
            "with torchrun (torchrun --nproc-per-node N -m dpq train ...)."
        )
    world = _env_int("WORLD_SIZE", environ)
    rank = _env_int("RANK", environ)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside 0..WORLD_SIZE-1 = 0..{world - 1}.")
    local_world = _env_int("LOCAL_WORLD_SIZE", environ) if "LOCAL_WORLD_SIZE" in environ else 1
    return DistributedContext(
        rank=rank,
        world_size=world,
        local_rank=_env_int("LOCAL_RANK", environ),
        local_world_size=local_world,
        backend="nccl" if device_type == "cuda" else "gloo",
        timeout_seconds=collective_timeout(environ),
    )


def init_from_environment(device_type: str = "cpu") -> DistributedContext | None:
    """Join the process group torchrun describes (None for a single process); a group made
    here is destroyed when the process exits (:func:`shutdown`, registered with atexit).

    gloo for CPU training, NCCL for CUDA (and the rank's GPU becomes the current one);
    collectives time out after :func:`collective_timeout` seconds. A group that is already
    initialised (by the caller) is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())),
            backend=str(dist.get_backend()),
            timeout_seconds=collective_timeout(),
        )
    context = environment_context(device_type=device_type)
    if context is None:
        return None
    if not dist.is_available():  # pragma: no cover - every official build has it
        raise ValueError("this torch build has no torch.distributed; install a standard build.")
    if context.backend == "nccl":
        torch.cuda.set_device(context.local_rank)
    dist.init_process_group(
        context.backend,
        rank=context.rank,
        world_size=context.world_size,
        timeout=datetime.timedelta(seconds=context.timeout_seconds),
    )
    # The group dpq made is left before the interpreter tears down: a gloo group still alive
    # at exit can abort the process ("terminate called without an active exception", seen
    # once in tests/test_ddp.py after a resumed run had saved its model).
    atexit.register(shutdown)
    return context


SHUTDOWN_BARRIER_SECONDS = 60.0
"""How long :func:`shutdown` waits for the other ranks before leaving anyway."""


def shutdown(barrier_seconds: float = SHUTDOWN_BARRIER_SECONDS) -> None:
    """Leave the process group (no-op when none is initialised), in an order that lets
    every rank tear gloo down safely:

    1. ``gc.collect()``: a DistributedDataParallel wrapper that is no longer used but sits
       in a reference cycle still holds the group's C++ backend (its reducer). Collected
       here, while the interpreter is whole; left to interpreter teardown, destroying a
       gloo backend aborts the process ("terminate called without an active exception").
    2. A barrier (bounded by ``barrier_seconds``): no rank destroys its end of the
       connections while another is still inside, or just leaving, a collective; a rank that
       never arrives (it died) is waited for that long at most, then the group is left.
    3. ``destroy_process_group()``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    with contextlib.suppress(RuntimeError):  # a dead or hung peer: leave anyway
        timeout = datetime.timedelta(seconds=barrier_seconds)
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timeout)
        else:
            dist.barrier()
    dist.destroy_process_group()


@contextlib.contextmanager
def collective_guard(context: DistributedContext, what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into a :class:`CollectiveFailure` that says
    which rank saw it, during what, and what to do."""
    try:
        yield
    except CollectiveFailure:
        raise
    except RuntimeError as exc:  # torch.distributed.DistError and its kinds included
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CollectiveFailure(
            f"rank {context.rank} of {context.world_size}: {what} failed waiting for the other "
            f"ranks (timeout {context.timeout_seconds:g} s, {TIMEOUT_ENV}): {first}. Another "
            "rank probably died or hung (see its error above); torchrun stops the job. Fix the "
            "cause and start the same command with --resume."
        ) from exc


# ---------------------------------------------------------------------------- agreement


def broadcast_json(value: Any, context: DistributedContext, what: str = "a broadcast") -> Any:
    """Rank 0's ``value`` (JSON-ready) on every rank, sent as UTF-8 bytes (never pickle)."""
    device = context.tensor_device
    with collective_guard(context, what):
        if context.is_main:
            payload = json.dumps(value, allow_nan=False).encode()
            size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
        else:
            size = torch.zeros(1, dtype=torch.int64, device=device)
        dist.broadcast(size, src=0)
        if context.is_main:
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
        else:
            data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
        dist.broadcast(data, src=0)
    return value if context.is_main else json.loads(bytes(data.cpu().numpy()).decode())


def rank0_decides(
    context: DistributedContext | None,
    decide: Callable[[], T],
    what: str = "a decision",
    kinds: tuple[type[Exception], ...] = (ValueError, FileNotFoundError),
) -> T:
    """Run ``decide`` on rank 0 only and give its JSON-ready result to every rank.

    An exception on rank 0 is re-raised there, and every other rank raises an exception of
    the first of ``kinds`` it is an instance of (else RuntimeError) with the same message,
    so all ranks stop together with the same words. Without a context ``decide`` simply runs.
    """
    if context is None:
        return decide()
    outcome: dict[str, Any] = {}
    error: BaseException | None = None
    if context.is_main:
        try:
            outcome = {"value": decide()}
        except Exception as exc:  # told to the other ranks, then re-raised here
            error = exc
            kind = next((k for k in kinds if isinstance(exc, k)), RuntimeError)
            outcome = {"error": str(exc), "kind": kind.__name__}
    outcome = broadcast_json(outcome, context, what)
    if error is not None:
        raise error
    if "error" in outcome:
        by_name = {kind.__name__: kind for kind in kinds}
        raise by_name.get(outcome["kind"], RuntimeError)(outcome["error"])
    return outcome["value"]


# ---------------------------------------------------------------------------- tensors


def all_gather_rows(
    rows: np.ndarray, context: DistributedContext, what: str = "gathering features"
) -> np.ndarray:
    """Every rank's (n_r, ...) array concatenated in rank order (the same on all ranks);
    ranks may hold different row counts. float32/int64 etc. kept."""
    device = context.tensor_device
    rows = np.ascontiguousarray(rows)
    with collective_guard(context, what):
        count = torch.tensor([len(rows)], dtype=torch.int64, device=device)
        counts = [torch.zeros_like(count) for _ in range(context.world_size)]
        dist.all_gather(counts, count)
        sizes = [int(c.item()) for c in counts]
        longest = max(sizes)
        padded = np.zeros((longest, *rows.shape[1:]), dtype=rows.dtype)
        padded[: len(rows)] = rows
        local = torch.from_numpy(padded).to(device)
        gathered = [torch.empty_like(local) for _ in range(context.world_size)]
        dist.all_gather(gathered, local)
    return np.concatenate([g.cpu().numpy()[:n] for g, n in zip(gathered, sizes, strict=True)])


def broadcast_tensors_(
    tensors: Iterable[torch.Tensor], context: DistributedContext, what: str = "a broadcast"
) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values, in place."""
    with collective_guard(context, what):
        for tensor in tensors:
            staged = tensor.detach().to(context.tensor_device).contiguous()
            dist.broadcast(staged, src=0)
            with torch.no_grad():
                tensor.copy_(staged.to(tensor.device))


def all_reduce_mean_(
    tensors: Iterable[torch.Tensor], context: DistributedContext, what: str = "an average"
) -> None:
    """Replace floating ``tensors`` by their mean over the ranks, in place."""
    with collective_guard(context, what):
        for tensor in tensors:
            staged = tensor.detach().to(context.tensor_device, torch.float64).contiguous()
            dist.all_reduce(staged, op=dist.ReduceOp.SUM)
            with torch.no_grad():
                tensor.copy_((staged / context.world_size).to(tensor.device, tensor.dtype))


def mean_over_ranks(
    values: dict[str, float], context: DistributedContext, what: str = "averaging losses"
) -> dict[str, float]:
    """Each value averaged over the ranks (every rank must pass the same keys)."""
    names = sorted(values)
    stacked = torch.tensor([values[name] for name in names], dtype=torch.float64)
    all_reduce_mean_([stacked], context, what)
    return {name: float(v) for name, v in zip(names, stacked.tolist(), strict=True)}


def average_buffers_(
    module: torch.nn.Module, context: DistributedContext, what: str = "averaging BatchNorm"
) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the ranks;
    integer buffers (batch counters) are the same on every rank and left alone."""
    floating = [b for b in module.buffers() if b.dtype.is_floating_point]
    all_reduce_mean_(floating, context, what)


def state_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of named tensors' bytes: equal digests mean bit-identical states."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_in_sync(module: torch.nn.Module, context: DistributedContext, what: str) -> str:
    """The SHA-256 of the module's state (parameters and buffers), checked to be the same on
    every rank: RuntimeError naming the ranks whose state differs from rank 0's."""
    local = state_digest(module.state_dict().items())
    digests = all_gather_rows(
        np.frombuffer(bytes.fromhex(local), dtype=np.uint8)[None], context, what
    )
    differing = [r for r in range(context.world_size) if not np.array_equal(digests[r], digests[0])]
    if differing:
        raise RuntimeError(f"{what}: the model on rank(s) {differing} differs from rank 0's.")
    return local


# ---------------------------------------------------------------------------- batches


def rank_batches(order: np.ndarray, context: DistributedContext | None) -> np.ndarray:
    """This rank's part of an epoch's global batches: int (steps, B) -> (steps, B / N).

    Rank r takes every N-th item of each global batch (as DistributedSampler strides the
    items), so over the ranks a step covers exactly the one-process batch.
    """
    if context is None or context.world_size == 1:
        return order
    batch = order.shape[1]
    if batch % context.world_size:
        raise ValueError(
            f"the batch size {batch} does not split evenly across {context.world_size} "
            f"processes; use a multiple of {context.world_size} (the batch size is the global "
            "one, shared by all processes)."
        )
    return order[:, context.rank :: context.world_size]


def rank_rows(num_items: int, context: DistributedContext | None) -> np.ndarray:
    """int64 rows 0..num_items-1 this rank handles in a pass over the data (every N-th)."""
    if context is None:
        return np.arange(num_items, dtype=np.int64)
    return np.arange(context.rank, num_items, context.world_size, dtype=np.int64)


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a one-machine rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_torchrun_command(dpq_args: list[str], processes: int) -> list[str]:
    """argv of ``torchrun --nproc-per-node processes -m dpq ...`` on this machine only
    (rendezvous on 127.0.0.1 at a free port), with this Python."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
        "--nproc-per-node", str(processes), "--master-addr", "127.0.0.1",
        "--master-port", str(free_loopback_port()), "-m", "dpq", *dpq_args,
    ]  # fmt: skip
