"""dpq.training.ddp: process groups from torchrun's environment, rank-0 decisions,
gathered rows, averaged buffers, per-rank batches, and a dead rank that fails with a clear
message instead of a hang. Two gloo processes on 127.0.0.1 (torch.multiprocessing)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import feature_config, feature_data, wait_until
from dpq.training import ddp
from dpq.training.ddp import DistributedContext, free_loopback_port, local_torchrun_command

free_port = free_loopback_port
PORT_TAKEN = ("EADDRINUSE", "address already in use")
"""What a rendezvous says when its port was taken between choosing and binding it."""


def run_ranks(function, *args, timeout: float = 300.0, attempts: int = 3) -> None:
    """Run ``function(rank, port, *args)`` in two processes (torch.multiprocessing) at a
    free loopback port and wait for both, at most ``timeout`` s (AssertionError naming the
    function; the ranks are killed). A rank's exception is raised here as
    torch.multiprocessing's join raises it; a rendezvous whose port another process took
    in the meantime (EADDRINUSE) is tried again at another port, ``attempts`` times in all."""
    for attempt in range(1, attempts + 1):
        context = mp.start_processes(function, args=(free_port(), *args), nprocs=2, join=False)
        try:
            wait_until(
                lambda context=context: context.join(timeout=0.2),
                timeout,
                f"both ranks of {function.__name__} to finish",
            )
            return
        except mp.ProcessRaisedException as exc:
            if attempt == attempts or not any(text in str(exc) for text in PORT_TAKEN):
                raise
        finally:
            _end_ranks(context)


def _end_ranks(context) -> None:
    """Kill the ranks of ``context`` still running (after a failed wait) and reap them."""
    for process in context.processes:
        if process.is_alive():
            process.kill()
        process.join(10)


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


def test_a_group_dpq_joins_is_left_before_the_process_exits():
    """The group init_from_environment makes is destroyed at exit (atexit), before the
    interpreter tears it down; a probe registered earlier runs after that and sees none."""
    code = (
        "import atexit, sys, torch.distributed as dist\n"
        "atexit.register(lambda: print('group at exit:', dist.is_initialized(), flush=True))\n"
        "from dpq.training import ddp\n"
        "context = ddp.init_from_environment('cpu')\n"
        "print('ranks:', ddp.broadcast_json(context.world_size, context), flush=True)\n"
    )
    port = free_port()
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, **torchrun_environment(rank, 2, port, timeout=30)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for job in jobs:
        out, err = job.communicate(timeout=120)
        assert job.returncode == 0, err[-2000:]
        assert out.splitlines() == ["ranks: 2", "group at exit: False"]


def _leaving_rank(rank: int, port: int, out: str) -> None:
    """Train a DistributedDataParallel model a few steps, leave it in a reference cycle
    (as a finished trainer can), and leave the group; rank 0 arrives late."""
    import gc

    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(torchrun_environment(rank, 2, port))
    torch.set_num_threads(1)
    ddp.init_from_environment()
    net = DistributedDataParallel(torch.nn.Linear(4, 1))
    for _ in range(3):
        net(torch.randn(8, 4)).pow(2).mean().backward()
    cycle: dict = {"net": net}
    cycle["cycle"] = cycle
    del net, cycle
    if rank == 0:
        time.sleep(1.0)
        Path(out, "rank0-leaving").write_text("")
    ddp.shutdown()
    alive = [o for o in gc.get_objects() if isinstance(o, DistributedDataParallel)]
    arrived = Path(out, "rank0-leaving").exists()
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"ddp_alive": len(alive), "rank0": arrived})
    )


def test_leaving_the_group_waits_for_every_rank_and_frees_unused_ddp_wrappers(tmp_path):
    """ddp.shutdown: a DistributedDataParallel wrapper left in a reference cycle is freed
    before the group is destroyed (not at interpreter teardown, where destroying the gloo
    backend it holds aborts the process), and no rank leaves before the others arrive."""
    run_ranks(_leaving_rank, str(tmp_path))
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"ddp_alive": 0, "rank0": True}, rank


def _orphaned_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(torchrun_environment(rank, 2, port, timeout=30.0))
    context = ddp.init_from_environment()
    ddp.broadcast_json("started", context)
    if rank == 1:
        os._exit(17)  # dies without leaving the group
    ddp.shutdown(barrier_seconds=2.0)
    Path(out, "rank0.txt").write_text(f"left: {not torch.distributed.is_initialized()}")


def test_leaving_the_group_after_a_rank_died_does_not_wait_for_it_forever(tmp_path):
    context = mp.start_processes(
        _orphaned_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=False
    )
    try:
        for process in context.processes:
            process.join(timeout=60)
            assert process.exitcode is not None, "a rank was still running after 60 s"
    finally:
        _end_ranks(context)
    assert [p.exitcode for p in context.processes] == [0, 17]
    assert (tmp_path / "rank0.txt").read_text() == "left: True"


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
    run_ranks(_collectives, str(tmp_path))
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
    os.environ.update(torchrun_environment(rank, 2, port, timeout=2.0))
    context = ddp.init_from_environment()
    ddp.broadcast_json("started", context)
    if rank == 1:
        if how == "hangs":
            time.sleep(3.5)  # never joins the next collective in time
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
    try:
        for process in context.processes:  # joined one by one: join() would kill rank 0
            process.join(timeout=60)
            assert process.exitcode is not None, "a rank was still running after 60 s"
    finally:
        _end_ranks(context)
    assert [p.exitcode for p in context.processes] == [0, 17]
    seconds, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    # a death is seen at once (the connection closes); a hang when the 2 s timeout expires
    assert float(seconds) < (1.5 if how == "dies" else 3.4)
    assert message.startswith("rank 0 of 2: the time plan failed waiting for the other ranks")
    assert "(timeout 2 s, DPQ_COLLECTIVE_TIMEOUT)" in message and "--resume" in message


# ---------------------------------------------------------------------------- training


REPO_SRC = Path(__file__).resolve().parents[1] / "src"


def _blobs(n: int = 512):
    """conftest's Gaussian blobs: float32 (n, 12) features and int64 (n,) labels."""
    data = feature_data(n=n)
    return data.images, data.labels


def _blob_config(**train):
    """conftest's blob config (identity backbone, L=2, K=8, D=6; k-means codebooks from
    epoch 3 of 4) with 64 items per batch."""
    return feature_config(**{"batch_size": 64, **train})


def _state(model) -> dict:
    return {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}


class TickingClock:
    """A clock that moves ``tick`` seconds every time it is read (a deterministic, fast or
    slow machine for the time planner)."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def _train_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(torchrun_environment(rank, 2, port))
    from dpq.training.loop import ArrayDataset, train_model

    features, labels = _blobs()
    result = train_model(
        _blob_config(),
        ArrayDataset(features, labels),
        None,
        Path(out) / "run",
        progress=False,
        log=lambda message: None,
    )
    report = {
        "rank": result.rank,
        "history": result.history,
        "codebooks": result.model.codebooks().tolist(),
        "model_dir": str(result.model_dir),
    }
    np.savez(Path(out, f"state{rank}.npz"), **_state(result.model))

    # a time budget, with clocks that disagree: rank 1's says every read costs 5 s (alone,
    # it would plan a single epoch), rank 0's 0.02 s
    from dpq.model.network import DPQModel
    from dpq.training.loop import Trainer, seed_everything

    config = _blob_config(epochs=1, time_budget_minutes=0.2)
    seed_everything(config.train.seed)
    budgeted = Trainer(
        config,
        DPQModel(config),
        ArrayDataset(features, labels),
        None,
        Path(out) / "budget",
        progress=False,
        log=lambda message: None,
        clock=TickingClock(0.02 if rank == 0 else 5.0),
    ).train()
    report["budget"] = {"plan": budgeted.planned, "history": budgeted.history}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    ddp.shutdown()


def test_two_ranks_of_batch_32_stay_identical_and_train_like_one_process_of_batch_64(tmp_path):
    """2 x 32 with DDP against 1 x 64: the same model on both ranks after every epoch
    (parameters, BatchNorm-free here, and the codebooks, k-means-initialised at epoch 3 and
    trained after), and the loss curve and final weights of the one process, within a
    relative 1e-5 per epoch mean (observed: about 1e-7) and 1e-5 per weight. Then a time
    budget with clocks that disagree across the ranks: both train rank 0's plan."""
    from dpq.training.loop import ArrayDataset, train_model

    run_ranks(_train_rank, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    digests = [[record["state_sha256"] for record in r["history"]] for r in ranks]
    assert digests[0] == digests[1] and len(set(digests[0])) == 4  # equal, and changing
    assert ranks[0]["codebooks"] == ranks[1]["codebooks"]
    assert [r["history"][2]["phase"] for r in ranks] == ["quantization"] * 2
    assert ranks[1]["model_dir"] == ranks[0]["model_dir"] == str(tmp_path / "run" / "model")
    # only rank 0 wrote the run: one log line per epoch, its checkpoints, the model
    log = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2, 3, 4]
    assert (tmp_path / "run" / "checkpoints" / "epoch-0004").is_dir()

    features, labels = _blobs()
    single = train_model(
        _blob_config(),
        ArrayDataset(features, labels),
        None,
        tmp_path / "one",
        progress=False,
        log=lambda message: None,
        distributed=None,
    )
    for one, two in zip(single.history, ranks[0]["history"], strict=True):
        for term in ("total", "cls", "E", "train_accuracy"):
            if term in one:
                assert two[term] == pytest.approx(one[term], rel=1e-5), (one["epoch"], term)
    with np.load(tmp_path / "state0.npz") as saved:
        for name, value in _state(single.model).items():
            np.testing.assert_allclose(saved[name], value, rtol=0, atol=1e-5, err_msg=name)

    # the time plan (and every revision of it) is rank 0's on both ranks
    budgets = [r["budget"] for r in ranks]
    assert budgets[0]["plan"]["source"] == "time_budget" and len(budgets[0]["history"]) > 1
    assert budgets[1]["plan"] == budgets[0]["plan"]
    digests = [[record["state_sha256"] for record in b["history"]] for b in budgets]
    assert digests[0] == digests[1]


def _torchrun(args: list[str], processes: int = 2) -> list[str]:
    return local_torchrun_command(args, processes)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc children lists)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def test_a_killed_torchrun_run_resumes_under_torchrun(tmp_path):
    """`torchrun -m dpq train` killed (SIGKILL to the launcher and its workers) after its second epoch's
    checkpoint, then the same command with --resume: it continues from the newest checkpoint
    and ends with the model of an uninterrupted one-process run (within 1e-5)."""
    from dpq.training.loop import ArrayDataset, train_model

    features, labels = _blobs(n=2048)
    np.save(tmp_path / "x.npy", features)
    np.save(tmp_path / "y.npy", labels)
    config = _blob_config(epochs=6, keep_checkpoints=2)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    run = tmp_path / "run"
    args = ["train", "--features", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy")]
    args += ["--split", "all", "--config", str(tmp_path / "config.json"), "--out", str(run)]
    path = os.pathsep.join(p for p in (str(REPO_SRC), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "first.log"
    for attempt in range(1, 4):  # another port when the rendezvous's was taken meanwhile
        with log.open("w") as handle:
            job = subprocess.Popen(
                _torchrun(args), env=env, start_new_session=True, stdout=handle, stderr=handle
            )
        try:
            wait_until(
                lambda job=job: (
                    (run / "checkpoints" / "epoch-0002").is_dir() or job.poll() is not None
                ),
                120,
                "epoch 2's checkpoint under torchrun",
            )
            ended = job.poll() is not None
            if ended and attempt < 3 and any(text in log.read_text() for text in PORT_TAKEN):
                continue
            assert not ended, f"the run ended before it could be killed:\n{log.read_text()}"
        finally:
            for pid in [job.pid, *_descendants(job.pid)]:  # the launcher and its workers
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            job.wait(timeout=30)
        break
    assert not (run / "model").exists()
    done = sorted(p.name for p in (run / "checkpoints").glob("epoch-*"))

    for _ in range(3):
        resumed = subprocess.run(
            _torchrun([*args, "--resume"]), env=env, capture_output=True, text=True, timeout=300
        )
        if resumed.returncode == 0 or not any(text in resumed.stderr for text in PORT_TAKEN):
            break
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / done[-1]}" in resumed.stderr
    assert "trained 6 epochs" in resumed.stdout and resumed.stdout.count("trained") == 1

    single = train_model(
        config,
        ArrayDataset(features, labels),
        None,
        tmp_path / "one",
        progress=False,
        log=lambda message: None,
        distributed=None,
    )
    from dpq.model.network import DPQModel

    continued = DPQModel.from_checkpoint(run / "model")
    for name, value in _state(single.model).items():
        np.testing.assert_allclose(_state(continued)[name], value, rtol=0, atol=1e-5, err_msg=name)


def _reproduce_rank(rank: int, port: int, out: str, data: str, word_vectors: str) -> None:
    os.environ.update(torchrun_environment(rank, 2, port))
    os.environ["DPQ_CACHE_DIR"] = str(Path(out) / f"cache{rank}")
    from dpq.config import DPQConfig, ModelConfig, QuantizerConfig, TrainConfig
    from dpq.training.experiments import RunSettings
    from dpq.training.reproduce import ReproduceSettings, reproduce_cifar10

    recipe = DPQConfig(
        model=ModelConfig(backbone_kwargs={"width": 0.125}),
        quantizer=QuantizerConfig(num_levels=2, codebook_size=16, dim=300, init="normal"),
        train=TrainConfig(batch_size=10),
    )
    result = reproduce_cifar10(
        ReproduceSettings(
            data=data, base_config=recipe, epochs=1, train_per_class=2, query_per_class=1
        ),
        RunSettings(
            Path(out) / "run", word_vectors=word_vectors, progress=False, log=lambda message: None
        ),
    )
    summary = None if result is None else result.evaluation.map_by_bits
    Path(out, f"rank{rank}.json").write_text(json.dumps({"map": summary}))
    ddp.shutdown()


def test_reproduce_under_two_ranks_trains_on_both_and_reports_from_rank_0(
    tmp_path, small_cifar_zip
):
    """`dpq reproduce`'s flow with two ranks (the 50-image CIFAR-10 zip, 20 training
    images, global batch 10 = 5 per rank): both train, rank 0 alone encodes, searches and
    writes the results; its mAP is that of the saved model (recomputed here)."""
    from conftest import WORDVEC
    from dpq.data import Split, load_source
    from dpq.evaluate.workflows import evaluate_split
    from dpq.model.network import DPQModel

    run_ranks(_reproduce_rank, str(tmp_path), str(small_cifar_zip), str(WORDVEC / "cifar10.txt"))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[1]["map"] is None and set(ranks[0]["map"]) == {"4", "8"}  # L=2, K=16
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["evaluation"]["map"] == ranks[0]["map"]
    model = DPQModel.from_checkpoint(tmp_path / "run" / "model")
    split = Split.load(tmp_path / "run" / "split.json")
    again = evaluate_split(model, load_source(small_cifar_zip), split, progress=False)
    assert {str(b): v for b, v in again.map_by_bits.items()} == pytest.approx(ranks[0]["map"])
