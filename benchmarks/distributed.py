"""What the engines beyond one machine cost on this one: DDP training with torchrun (1 vs 2
processes) and encoding with Ray Data (1 process vs 2 Ray actors), side by side.

    python benchmarks/distributed.py                      # both tables
    python benchmarks/distributed.py --part encode --items 10000
    python benchmarks/distributed.py --part train --train-items 2048 --epochs 2

Encoding: the CIFAR-10 recipe's network (half-width ResNet-9, flip-averaged, random
weights: the cost does not depend on them) encodes ``--items`` CIFAR-10 images (the shared
zip; digits when it is absent). Baseline: `build_index` in this process with all cores as
torch threads. Ray: `encode_collection` with a `RayRunner` of 2 actors of 1 CPU each, once starting its own local
cluster (what `dpq encode --runner ray` does without --address) and once on a cluster that is
already up (what it does with --address); the table splits the wall time into cluster
start, the Ray Data stage (actor start, model load in each actor, encoding) and merging,
and states the overhead against the baseline. The codes are checked to be identical.

Training: `python -m dpq train` with a fixed number of epochs on a CIFAR-10 subset (the
recipe's network and augmentations, float32), once as one process with all cores and once
under `torchrun --nproc-per-node 2` (gloo, one core per process), with the same global
batch; images/s are training images over the time of the training epochs as logged by the
trainer, and the whole command's wall time (start-up, rendezvous, data loading) is given
beside them.

On 2 cores a speed-up is not expected: each Ray actor or DDP rank gets one core where the
baseline uses both. The point is that the overhead is small and measured. Never run by CI;
run it alone (``flock /tmp/dpq-heavy.lock python benchmarks/distributed.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR_ZIP = SHARED / "cifar10" / "cifar10-jpeg.zip"
WORD_VECTORS = SHARED / "wordvec" / "cifar10.txt"


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["all", "encode", "train"], default="all")
    parser.add_argument("--items", type=int, default=10_000, help="images to encode")
    parser.add_argument("--shards", type=int, default=8, help="Ray shards")
    parser.add_argument(
        "--train-items", type=int, default=2560, help="training images (a per-class draw)"
    )
    parser.add_argument("--epochs", type=int, default=2, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=128, help="global training batch")
    parser.add_argument("--workdir", help="where models, indexes and runs go (default: a temp dir)")
    return parser.parse_args()


def _source() -> str:
    return str(CIFAR_ZIP) if CIFAR_ZIP.is_file() else "digits"


def _cores() -> int:
    return len(os.sched_getaffinity(0))


# ---------------------------------------------------------------------------- encoding


def encode_table(args: argparse.Namespace, workdir: Path) -> None:
    import numpy as np
    import torch

    from dpq.data import SourceSpec
    from dpq.encode import ray as ray_encode
    from dpq.encode.build import build_index
    from dpq.encode.job import EncodeSettings, encode_collection
    from dpq.encode.ray import RayRunner
    from dpq.model.network import DPQModel
    from dpq.recipes import cifar10_recipe

    torch.manual_seed(0)
    model_dir = workdir / "encode-model"
    DPQModel(cifar10_recipe()).eval().save_checkpoint(model_dir)
    spec = SourceSpec(images=_source(), cache_dir=str(workdir / "cache"))
    source = spec.load()
    rows = np.arange(min(args.items, len(source)), dtype=np.int64)
    n = len(rows)
    print(f"encoding {n:,} images of {spec.images} with the cifar10 recipe's network")

    model = DPQModel.from_checkpoint(model_dir)
    inputs, labels = source.rows(rows)
    build_index(model, inputs[:256], batch_size=256)  # warm-up: numba compilation, oneDNN
    baselines = {}
    for threads in sorted({1, _cores()}):
        torch.set_num_threads(threads)
        began, began_cpu = time.perf_counter(), time.process_time()
        reference = build_index(model, inputs, ids=rows, labels=labels, batch_size=256)
        baselines[threads] = (time.perf_counter() - began, time.process_time() - began_cpu)
    torch.set_num_threads(_cores())
    one, one_cpu = baselines[_cores()]

    import ray

    results = {}
    for setting in ("own local cluster", "cluster already up"):
        out = workdir / f"ray-{len(results)}.npz"
        shutil.rmtree(out.with_name(out.name + ".shards"), ignore_errors=True)  # encode all
        cluster_start = None
        if setting == "cluster already up":
            began = time.perf_counter()
            ray_encode.connect(ray, None, num_cpus=2)
            cluster_start = time.perf_counter() - began
        settings = EncodeSettings(
            out,
            spec,
            model=model_dir,
            rows=rows,
            batch_size=256,
            runner=RayRunner(actors=2),
            shards=args.shards,
        )
        result = encode_collection(settings)
        if cluster_start is not None:
            ray.shutdown()
        same = np.array_equal(result.index.codes, reference.codes)
        results[setting] = (result, same, cluster_start)

    head = (
        f"{'engine':<42} {'wall s':>6} {'img/s':>6} {'enc CPU s':>9} {'img/CPU-s':>9} "
        f"{'setup CPU s':>11} {'cluster s':>9} {'stage-enc s':>11} {'merge s':>7} {'same':>5}"
    )
    print(head)
    print("-" * len(head))
    for threads, (wall, cpu) in baselines.items():
        name = f"1 process, {threads} torch thread(s) (warm)"
        print(
            f"{name:<42} {wall:6.1f} {n / wall:6.0f} "
            f"{cpu:9.1f} {n / cpu:9.0f} {0:11.1f} {0:9.1f} {0:11.1f} {0:7.2f} {'-':>5}"
        )
    for setting, (result, same, cluster_start) in results.items():
        run = result.shards.run
        start = run.startup_seconds if cluster_start is None else cluster_start
        stage_minus_encode = run.stage_seconds - run.shard_seconds / max(run.actors, 1)
        name = f"Ray, {run.actors} actors x 1 CPU, {setting}"
        print(
            f"{name:<42} "
            f"{result.seconds:6.1f} {n / result.seconds:6.0f} {run.shard_cpu_seconds:9.1f} "
            f"{n / run.shard_cpu_seconds:9.0f} {run.setup_cpu_seconds:11.1f} {start:9.1f} "
            f"{stage_minus_encode:11.1f} {result.shards.merge_seconds:7.2f} "
            f"{'yes' if same else 'NO':>5}"
        )
    for setting, (result, _same, _start) in results.items():
        overhead, run = result.seconds - one, result.shards.run
        print(
            f"Ray ({setting}): wall {overhead:+.1f} s against 1 process with {_cores()} threads "
            f"({overhead / one:+.0%}); "
            f"CPU {run.shard_cpu_seconds + run.setup_cpu_seconds - one_cpu:+.1f} s "
            f"(actors' setup {run.setup_cpu_seconds:.1f} s, encoding "
            f"{run.shard_cpu_seconds - one_cpu:+.1f} s); {args.shards} shards"
        )
    print(
        "wall: the whole call (Ray: its own cluster start included in the first row, not in "
        "the second); enc CPU: CPU time of the encoding itself (Ray: summed over the shards, "
        "inside the actors); setup CPU: the actors' CPU before their first shard (worker "
        "start, imports, model load, opening the source); cluster: ray.init of a local "
        "2-CPU cluster; stage-enc: the Ray Data stage's wall minus the encoding per actor "
        "(actor start, scheduling); same: codes identical to the 1-process index."
    )


# ---------------------------------------------------------------------------- training


def _train_once(args: argparse.Namespace, workdir: Path, processes: int, threads: int) -> dict:
    """One `dpq train` command (under torchrun when processes > 1): its epochs' seconds
    (the trainer's log), wall time and CPU time (every process of the command)."""
    out = workdir / f"train-{processes}p{threads}t"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    env["DPQ_CACHE_DIR"] = str(workdir / "cache")
    env["OMP_NUM_THREADS"] = str(threads)
    command = [
        "train",
        _source(),
        "--config",
        "cifar10",
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--split",
        "per-class",
        "--train-per-class",
        str(args.train_items // 10),
        "--query-per-class",
        "1",
        "--precision",
        "fp32",
        "--word-vectors",
        str(WORD_VECTORS) if WORD_VECTORS.is_file() else "orthogonal",
        "--out",
        str(out),
    ]
    if processes == 1:
        launch = [sys.executable, "-m", "dpq", *command]
    else:
        from dpq.training.ddp import local_torchrun_command

        launch = local_torchrun_command(command, processes)
        env["GLOO_SOCKET_IFNAME"] = "lo"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    done = subprocess.run(launch, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(launch)} failed:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {"wall": wall, "cpu": cpu, "epoch_seconds": sum(record["seconds"] for record in log)}


def train_table(args: argparse.Namespace, workdir: Path) -> None:
    train_items = args.train_items // 10 * 10
    print(
        f"training the cifar10 recipe's network (fp32) on {train_items:,} images of "
        f"{_source()} (a per-class draw), {args.epochs} epochs, global batch {args.batch_size}"
    )
    settings = [(1, 1), (1, _cores()), (2, max(1, _cores() // 2))]
    measured = {setting: _train_once(args, workdir, *setting) for setting in settings}
    head = f"{'engine':<42} {'epochs s':>9} {'img/s':>7} {'command wall s':>15} {'CPU s':>7}"
    print(head)
    print("-" * len(head))
    images = train_items // args.batch_size * args.batch_size * args.epochs
    for (processes, threads), result in measured.items():
        name = (
            f"1 process, {threads} torch thread(s)"
            if processes == 1
            else f"torchrun, {processes} processes x {threads} thread (gloo)"
        )
        print(
            f"{name:<42} {result['epoch_seconds']:9.1f} "
            f"{images / result['epoch_seconds']:7.0f} {result['wall']:15.1f} {result['cpu']:7.1f}"
        )
    one, ddp_run = measured[(1, 1)], measured[settings[2]]
    ideal = one["epoch_seconds"] / 2
    print(
        f"DDP, 2 processes: epochs in {ddp_run['epoch_seconds']:.1f} s against {ideal:.1f} s "
        f"for a perfect split of the 1-thread process ({ddp_run['epoch_seconds'] / ideal:.2f}x); "
        f"the command's start-up, data loading and rendezvous: "
        f"{ddp_run['wall'] - ddp_run['epoch_seconds']:.1f} s against "
        f"{one['wall'] - one['epoch_seconds']:.1f} s for one process."
    )
    print(
        "epochs s: the training epochs as the trainer logs them (k-means and checkpoints "
        "included); CPU s: user + system time of every process of the command."
    )


def _load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    args = _parse_args()
    gpu = "a GPU is present (not used here)" if _has_gpu() else "no GPU"
    print(f"{_cores()} CPU cores, {gpu}; {_load()} (other jobs on the machine share the cores)")
    with tempfile.TemporaryDirectory(prefix="dpq-dist-bench-") as temporary:
        workdir = Path(args.workdir or temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.part in ("all", "encode"):
            encode_table(args, workdir)
        if args.part in ("all", "train"):
            train_table(args, workdir)
    print(f"at the end: {_load()}")


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
