"""What the ranks of a multi-process run agree on, step by step of the training loop (the
primitives are :mod:`dpq.training.ddp`). Without a context (one process) each function does
the plain thing.

- Joining: the run torchrun describes and this rank's device (:func:`joined_run`).
- Rank 0 decides, the others follow: whether the run folder may be used
  (:func:`claim_run_folder`), the checkpoint to resume from (:func:`chosen_checkpoint`), the
  time plan and its revisions (:func:`agreed_first_plan`, :func:`agreed_revision`).
- Every step: the model and loss run inside DistributedDataParallel
  (:func:`wrap_for_ddp` around a :class:`StepModule`; steps outside it average their gradients by
  :func:`agreed_gradients`), and the logged loss parts are means over the ranks
  (:func:`agreed_parts`, :func:`agreed_accuracy`), so all ranks see the same values and
  stop together on a non-finite one.
- Every epoch: BatchNorm statistics (and their weight average) are averaged over the ranks
  and the ranks are checked to hold the same model (:func:`end_epoch_in_sync`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpq.methods.base import RetrievalMethod, Step
from dpq.training import ddp
from dpq.training.budget import EpochPlanner
from dpq.training.checkpoints import CheckpointStore, RunDirectory, RunInProgressError
from dpq.training.ddp import DistributedContext
from dpq.training.optim import WeightAverage
from dpq.training.resume import RunState


def joined_run(
    distributed: DistributedContext | None | str, device: torch.device
) -> tuple[DistributedContext | None, torch.device]:
    """(the run's context, this rank's device): ``distributed="auto"`` joins the run torchrun
    describes (None for one process); on CUDA each rank trains on its ``LOCAL_RANK`` GPU."""
    if distributed == "auto":
        distributed = ddp.init_from_environment(device.type)
    if distributed is None:
        return None, device
    if not isinstance(distributed, DistributedContext):
        raise TypeError(
            f"distributed must be a DistributedContext, None or 'auto'; got {distributed!r}."
        )
    return distributed, distributed.device_for(device)


def claim_run_folder(
    run_dir: RunDirectory,
    resume: bool,
    stack: contextlib.ExitStack,
    dist: DistributedContext | None,
) -> None:
    """Rank 0 takes the run folder's lock for the life of ``stack``, checks that the run may
    start (:meth:`RunDirectory.check_can_start`) and removes what a crashed writer left;
    every rank raises the same error when it may not."""

    def claim() -> bool:
        stack.enter_context(run_dir.lock())
        run_dir.check_can_start(resume)
        run_dir.checkpoints.remove_temporaries()
        return True

    ddp.rank0_decides(
        dist,
        claim,
        "checking the run folder",
        kinds=(RunInProgressError, ValueError, FileNotFoundError),
    )


def chosen_checkpoint(store: CheckpointStore, dist: DistributedContext | None) -> Path:
    """The newest checkpoint as rank 0 sees it (the run folder was checked to hold one)."""
    return Path(ddp.rank0_decides(dist, lambda: str(store.latest()), "choosing the checkpoint"))


def agreed_first_plan(
    planner: EpochPlanner,
    seconds_per_step: Callable[[], float],
    dist: DistributedContext | None,
) -> tuple[int, dict[str, Any]]:
    """The first plan; under a time budget rank 0 times its steps and decides."""
    if planner.budget is None:
        return planner.first_plan(seconds_per_step)
    epochs, plan = ddp.rank0_decides(
        dist, lambda: planner.first_plan(seconds_per_step), "the time plan"
    )
    return int(epochs), plan


def agreed_revision(
    planner: EpochPlanner,
    run: RunState,
    epoch_wall: float,
    epoch_seconds: float,
    dist: DistributedContext | None,
) -> None:
    """:meth:`EpochPlanner.revise`, decided by rank 0 (its wall time and budget), the
    result applied on every rank."""

    def revise() -> dict[str, Any]:
        planner.revise(run, epoch_wall, epoch_seconds)
        return {"epochs": run.epochs, "plan": run.plan, "switch_epoch": run.switch_epoch}

    decided = ddp.rank0_decides(dist, revise, "revising the time plan")
    run.epochs, run.plan = int(decided["epochs"]), decided["plan"]
    run.switch_epoch = int(decided["switch_epoch"])


def agreed_parts(parts: dict[str, float], dist: DistributedContext | None) -> dict[str, float]:
    """A step's logged loss parts averaged over the ranks (the global batch's means)."""
    return parts if dist is None else ddp.mean_over_ranks(parts, dist)


def agreed_gradients(parameters: list[nn.Parameter], dist: DistributedContext | None) -> None:
    """Average the gradients of ``parameters`` over the ranks in place (for steps that do
    not run through DistributedDataParallel, e.g. codebooks on a frozen network's features)."""
    if dist is not None:
        grads = [p.grad for p in parameters if p.grad is not None]
        ddp.all_reduce_mean_(grads, dist, "all-reducing codebook gradients")


def agreed_accuracy(correct: int, seen: int, dist: DistributedContext | None) -> float | None:
    """Training accuracy over every rank's items (None when no item was counted)."""
    if dist is not None:
        counted = ddp.mean_over_ranks({"correct": correct, "seen": seen}, dist)
        correct, seen = counted["correct"], counted["seen"]  # means: the ratio is the same
    return correct / seen if seen else None


class StepModule(nn.Module):
    """A method's forward pass and loss as one module, for DistributedDataParallel: it
    returns the loss tensor, the logits detached (or None) and the float parts, so DDP finds
    the used parameters by following the graph of the loss alone."""

    def __init__(
        self, method: RetrievalMethod, model: nn.Module, loss_fn: nn.Module, precision: str
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.method = method
        self.precision = precision

    def forward(
        self, x: torch.Tensor, targets: torch.Tensor, step: Step
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        out = self.method.forward_loss(
            self.model,  # type: ignore[arg-type]
            self.loss_fn,
            x,
            targets,
            step,
            self.precision,
        )
        logits = out.logits.detach() if out.logits is not None else None
        return out.loss.total, logits, out.loss.parts


def wrap_for_ddp(
    module: nn.Module, device: torch.device, dist: DistributedContext | None
) -> nn.Module | None:
    """DistributedDataParallel around ``module`` (the model and its loss: its constructor
    makes every rank start from rank 0's weights), or None without a context. It follows the
    graph from the loss, so a parameter a phase leaves out (the codebooks before their phase,
    a head whose loss is off) counts as unused instead of being waited for. Buffers are not
    broadcast every step (that would discard the other ranks' BatchNorm statistics); they
    are averaged per epoch (:func:`end_epoch_in_sync`)."""
    if dist is None:
        return None
    from torch.nn.parallel import DistributedDataParallel

    # buffers synced from rank 0 once, at the start, not before every forward pass
    options = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}  # torch before forward_sync_buffers
    )
    with ddp.collective_guard(dist, "starting DistributedDataParallel"):
        return DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
            **options,
        )


def end_epoch_in_sync(
    model: nn.Module,
    ema: WeightAverage | None,
    record: dict[str, Any],
    dist: DistributedContext | None,
) -> None:
    """Average BatchNorm statistics (and their EMA) over the ranks, then check that every
    rank holds the same model; the model's digest goes into the epoch ``record``."""
    if dist is None:
        return
    ddp.average_buffers_(model, dist)
    if ema is not None:
        buffers = {name for name, _ in model.named_buffers()}
        averaged = [v for k, v in ema.state.items() if k in buffers and v.is_floating_point()]
        ddp.all_reduce_mean_(averaged, dist, "averaging the EMA's BatchNorm")
    record["state_sha256"] = ddp.check_in_sync(model, dist, f"after epoch {record['epoch']}")
