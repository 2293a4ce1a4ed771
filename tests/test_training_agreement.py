"""dpq.training.agreement: what the ranks agree on in the loop. One process: each function is
the plain thing; two gloo processes on 127.0.0.1: means over the ranks, rank 0's plan, the
same BatchNorm statistics after an epoch, DistributedDataParallel around a module."""

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import FakeClock
from dpq.config import TrainConfig
from dpq.training import ddp
from dpq.training.agreement import (
    agreed_accuracy,
    agreed_first_plan,
    agreed_gradients,
    agreed_parts,
    agreed_revision,
    chosen_checkpoint,
    claim_run_folder,
    end_epoch_in_sync,
    wrap_for_ddp,
)
from dpq.training.budget import EpochPlanner
from dpq.training.checkpoints import RunDirectory, RunInProgressError
from test_ddp import run_ranks, torchrun_environment


def _planner(clock, minutes):
    config = TrainConfig(epochs=7, time_budget_minutes=minutes, warmup_fraction=0.0)
    return EpochPlanner(config, 10, lambda n: n // 2, True, clock, clock())


def test_one_process_decides_alone(tmp_path):
    run_dir = RunDirectory(tmp_path / "run")
    with contextlib.ExitStack() as stack:
        claim_run_folder(run_dir, False, stack, None)
        with pytest.raises(RunInProgressError, match="in use by a training run"):
            claim_run_folder(RunDirectory(tmp_path / "run"), False, contextlib.ExitStack(), None)
    (tmp_path / "run" / "checkpoints" / "epoch-0003").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "epoch-0003" / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a training run"):
        claim_run_folder(run_dir, False, contextlib.ExitStack(), None)
    assert chosen_checkpoint(run_dir.checkpoints, None).name == "epoch-0003"

    clock = FakeClock()
    assert agreed_first_plan(_planner(clock, None), lambda: 1.0, None)[0] == 7
    epochs, plan = agreed_first_plan(_planner(clock, 1.0), lambda: 0.05, None)
    assert epochs == 96 and plan["source"] == "time_budget"
    parts = {"total": 1.5}
    assert agreed_parts(parts, None) is parts and agreed_accuracy(3, 4, None) == 0.75
    assert agreed_accuracy(0, 0, None) is None
    layer = nn.Linear(2, 2)
    layer(torch.ones(1, 2)).sum().backward()
    grad = layer.weight.grad.clone()
    agreed_gradients([layer.weight], None)
    torch.testing.assert_close(layer.weight.grad, grad)
    assert wrap_for_ddp(layer, torch.device("cpu"), None) is None
    record = {"epoch": 1}
    end_epoch_in_sync(layer, None, record, None)
    assert record == {"epoch": 1}


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(torchrun_environment(rank, 2, port))
    context = ddp.init_from_environment()
    report = {"parts": agreed_parts({"total": float(rank), "E": 2.0 * rank}, context)}
    report["accuracy"] = agreed_accuracy([3, 1][rank], [4, 4][rank], context)
    layer = nn.Linear(2, 2)
    layer.weight.grad = torch.full_like(layer.weight, float(rank + 1))
    agreed_gradients([layer.weight], context)
    report["grad"] = layer.weight.grad.tolist()
    # rank 1's clock says each epoch took 10x longer: both follow rank 0's revision
    clock = FakeClock()
    planner = _planner(clock, 1.0)
    epochs, plan = agreed_first_plan(planner, lambda: 0.05 if rank == 0 else 5.0, context)
    run = planner.new_run(epochs, plan)
    run.epoch = 1
    clock.advance(0.5 if rank == 0 else 50.0)
    agreed_revision(planner, run, clock.now, clock.now, context)
    report["plan"] = [run.epochs, run.switch_epoch, run.plan]
    torch.manual_seed(rank)  # different weights: DDP starts every rank from rank 0's
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    wrapped = wrap_for_ddp(model, torch.device("cpu"), context)
    report["wrapped"] = type(wrapped).__name__
    wrapped(torch.randn(8, 3) + 4 * rank).sum().backward()  # each rank its own statistics
    record = {"epoch": 1}
    end_epoch_in_sync(model, None, record, context)
    report["running_mean"] = model[1].running_mean.tolist()
    report["digest"] = record["state_sha256"]
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    ddp.shutdown()


def test_two_ranks_agree_on_means_plans_and_statistics(tmp_path):
    run_ranks(_rank, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in ranks:
        assert report["parts"] == {"total": 0.5, "E": 1.0}
        assert report["accuracy"] == pytest.approx(0.5)  # (3 + 1) / (4 + 4)
        assert report["grad"] == [[1.5, 1.5], [1.5, 1.5]]
        assert report["wrapped"] == "DistributedDataParallel"
    assert ranks[0]["plan"] == ranks[1]["plan"] and ranks[0]["plan"][0] == 96
    assert ranks[0]["running_mean"] == ranks[1]["running_mean"]
    assert ranks[0]["digest"] == ranks[1]["digest"]
