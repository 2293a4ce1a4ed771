"""dpq.distributed.ddp: process groups from torchrun's environment, rank-0 decisions,
gathered rows, averaged buffers, per-rank batches, and a dead rank that fails with a clear
message instead of a hang. Two gloo processes on 127.0.0.1 (torch.multiprocessing)."""

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from dpq.distributed import ddp
from dpq.distributed.ddp import DistributedContext


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun_environment(rank: int, world: int, port: int, timeout: float = 60.0) -> dict:
    """The variables torchrun sets for one process, on the loopback interface."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        ddp.TIMEOUT_ENV: str(timeout),
    }


# ---------------------------------------------------------------------------- one process


def test_a_single_process_has_no_context_and_bad_environments_are_named():
    assert ddp.environment_context({}) is None
    assert ddp.environment_context({"WORLD_SIZE": "1"}) is None
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT are not"):
        ddp.environment_context({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    env = torchrun_environment(1, 2, 1234, timeout=30)
    context = ddp.environment_context(env, device_type="cuda")
    assert (context.rank, context.world_size, context.backend) == (1, 2, "nccl")
    assert context.timeout_seconds == 30 and not context.is_main
    assert context.device_for("cuda") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="RANK=2 is outside"):
        ddp.environment_context({**env, "RANK": "2"})
    with pytest.raises(ValueError, match="must be a positive number"):
        ddp.collective_timeout({ddp.TIMEOUT_ENV: "soon"})


def test_rank_batches_split_each_global_batch_across_the_ranks():
    order = np.random.default_rng(0).permutation(24).reshape(3, 8)
    parts = [ddp.rank_batches(order, DistributedContext(r, 2)) for r in range(2)]
    assert parts[0].shape == (3, 4)
    for step in range(3):
        assert sorted(np.concatenate([p[step] for p in parts])) == sorted(order[step])
    assert ddp.rank_batches(order, None) is order
    with pytest.raises(ValueError, match="does not split evenly across 3 processes"):
        ddp.rank_batches(order, DistributedContext(0, 3))
    np.testing.assert_array_equal(ddp.rank_rows(7, DistributedContext(1, 3)), [1, 4])


# ---------------------------------------------------------------------------- two processes


def _collectives(rank: int, port: int, out: str) -> None:
    os.environ.update(torchrun_environment(rank, 2, port))
    torch.set_num_threads(1)
    context = ddp.init_from_environment()
    result: dict = {"rank": context.rank, "world": context.world_size}
    result["plan"] = ddp.broadcast_json({"epochs": 3 + rank, "why": "rank 0"}, context)

    def decide():
        raise ValueError("the run folder holds another run")

    try:
        ddp.rank0_decides(context, decide)
    except ValueError as exc:
        result["decision_error"] = str(exc)
    result["decided"] = ddp.rank0_decides(context, lambda: {"resume_from": "epoch-0002"})
    rows = np.arange(3 + rank * 2, dtype=np.float32)[:, None] * (rank + 1)
    result["gathered"] = ddp.all_gather_rows(rows, context).ravel().tolist()
    codebooks = torch.full((2, 3), float(rank))
    ddp.broadcast_tensors_([codebooks], context)
    result["codebooks"] = codebooks.ravel().tolist()
    norm = torch.nn.BatchNorm1d(2)
    norm.running_mean.fill_(rank * 2.0)
    ddp.average_buffers_(norm, context)
    result["running_mean"] = norm.running_mean.tolist()
    ddp.check_in_sync(norm, context, "after averaging")
    norm.weight.data.fill_(float(rank))
    try:
        ddp.check_in_sync(norm, context, "after a rank-local change")
    except RuntimeError as exc:
        result["out_of_sync"] = str(exc)
    result["losses"] = ddp.mean_over_ranks({"total": 1.0 + rank, "E": 2.0 * rank}, context)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    ddp.shutdown()


def test_two_ranks_agree_on_rank_0s_decisions_gathered_rows_and_averaged_buffers(tmp_path):
    mp.start_processes(_collectives, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(results):
        assert (result["rank"], result["world"]) == (rank, 2)
        assert result["plan"] == {"epochs": 3, "why": "rank 0"}
        assert result["decision_error"] == "the run folder holds another run"
        assert result["decided"] == {"resume_from": "epoch-0002"}
        assert result["gathered"] == [0.0, 1.0, 2.0, 0.0, 2.0, 4.0, 6.0, 8.0]
        assert result["codebooks"] == [0.0] * 6
        assert result["running_mean"] == [1.0, 1.0]
        assert "rank(s) [1] differs from rank 0's" in result["out_of_sync"]
        assert result["losses"] == {"E": 1.0, "total": 1.5}


def _failing_rank(rank: int, port: int, out: str, how: str) -> None:
    os.environ.update(torchrun_environment(rank, 2, port, timeout=3.0))
    context = ddp.init_from_environment()
    ddp.broadcast_json("started", context)
    if rank == 1:
        if how == "hangs":
            time.sleep(5)  # never joins the next collective in time
        os._exit(17)  # dies without a word, between two collectives
    began = time.monotonic()
    try:
        ddp.broadcast_json({"epochs": 4}, context, what="the time plan")
        message = "no error"
    except ddp.CollectiveFailure as exc:
        message = str(exc)
    Path(out, "rank0.txt").write_text(f"{time.monotonic() - began:.1f}\n{message}")
    os._exit(0)  # the group is broken: leave without the collective of a clean shutdown


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_fails_the_others_with_a_clear_message(tmp_path, how):
    context = mp.start_processes(
        _failing_rank, args=(free_port(), str(tmp_path), how), nprocs=2, join=False
    )
    for process in context.processes:  # joined one by one: join() would kill rank 0
        process.join(timeout=60)
    assert [p.exitcode for p in context.processes] == [0, 17]
    seconds, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    # a death is seen at once (the connection closes); a hang when the 3 s timeout expires
    assert float(seconds) < (1.5 if how == "dies" else 6.0)
    assert message.startswith("rank 0 of 2: the time plan failed waiting for the other ranks")
    assert "(timeout 3 s, DPQ_COLLECTIVE_TIMEOUT)" in message and "--resume" in message
