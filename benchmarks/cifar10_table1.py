"""CIFAR-10 DPQ tables (paper Tables 1 and 2) with their seed spread.

Each invocation trains and evaluates the named configurations (``--config``: one, a comma
list, or ``all`` of the Table 2 ablations) for each split seed (``--seeds 0,1,2``) and each
feature (``--features semantic,class_posterior``), with ``dpq.training.reproduce.reproduce_cifar10``
(the code of ``dpq reproduce cifar10``), the baselines (``--baselines rq,pq,opq,lsq``) fitted
on the same 5,000 training features, and exact float search. Every run appends one row to a
JSON results file; the markdown tables beside it are rewritten from all rows: per
(configuration, feature, budget), the mean and the sample standard deviation over the seeds
of every method at every code length, and per code length whether DPQ is ahead of, tied
with or behind the best baseline by more than the seed spread.

Give the work, not the wall time, to compare machines: ``--epochs 50`` is the same
computation everywhere (a 30-minute budget is 50 epochs on an AVX2-only CPU and 181 on one
with native bf16). Rows record epochs, seconds per step and whether bf16 was native.

    python benchmarks/cifar10_table1.py --config full --seeds 0,1,2 \\
        --features semantic,class_posterior --epochs 50 --baselines rq,pq,opq,lsq \\
        --data ../shared/data/cifar10/cifar10-jpeg.zip
    python benchmarks/cifar10_table1.py --summarize results/cifar10_table1.json

Never run by CI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from dpq.atomic import write_json_atomic, write_text_atomic
from dpq.config import PRECISIONS
from dpq.evaluate.report import format_mean_std
from dpq.recipes import ABLATIONS, load_recipe
from dpq.training.experiments import RunSettings
from dpq.training.reproduce import ReproduceSettings, reproduce_cifar10

REPO = Path(__file__).resolve().parents[1]
PAPER_ROW = {"8": 0.814, "16": 0.833, "24": 0.834, "32": 0.831}
BITS = ["8", "16", "24", "32"]
# The paper's Table 2, CIFAR-10 column (8/16/24/32 bits); "full" is its DPQ row. The paper
# has no end-to-end / two-phase rows: its DPQ trains end to end.
PAPER_TABLE2 = {
    "full": (0.814, 0.833, 0.834, 0.831),
    "E": (0.172, 0.188, 0.184, 0.205),
    "E+LS": (0.741, 0.750, 0.755, 0.764),
    "E+LC": (0.614, 0.644, 0.654, 0.671),
    "two-step": (0.732, 0.755, 0.758, 0.760),
    "no-soft": (0.556, 0.575, 0.598, 0.621),
}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _row(result, config_name: str, feature: str, minutes: float | None, recipe: str) -> dict:
    """One results-file row from a ReproduceResult."""
    from dpq.devices import native_bf16

    evaluation = result.evaluation
    details = evaluation.details
    history = result.train.history
    steps = len(history) and sum(r["seconds"] for r in history)
    batch = result.train.model.config.train.batch_size
    steps_per_epoch = max(1, 5000 // batch)
    return {
        "config": config_name,
        "feature": feature,
        "split_seed": result.split_seed,
        "minutes": minutes,
        "epochs": result.epochs,
        "seconds_per_step": round(steps / max(1, len(history) * steps_per_epoch), 4),
        "precision": result.train.precision,
        "native_bf16": native_bf16(),
        "cpu": _cpu_name(),
        "recipe": recipe,
        "map": {m: {str(b): v for b, v in row.items()} for m, row in details.map_table().items()},
        "float_map": evaluation.float_map,
        "query_accuracy": evaluation.query_accuracy,
        "database_accuracy": evaluation.database_accuracy,
        "class_probability_map": evaluation.class_probability_map,
        "wall_seconds": result.wall_seconds,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": result.command,
        "run_dir": str(Path(result.train.model_dir).parent),
    }


def _arithmetic(row: dict) -> str:
    """How a row computed: rows that differ here are never averaged together."""
    native = "native bf16" if row["native_bf16"] else "no native bf16"
    return f"{row['precision']}, {native}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _verdicts(group: list[dict]) -> list[str]:
    """Per code length: DPQ against the best baseline (by mean), judged by the paired
    per-seed differences d_s = dpq_s - baseline_s (both on the same seed's features):
    ahead when mean(d) > std(d) and mean(d) > 0, behind when mean(d) < -std(d), else tied."""
    lines = []
    baselines = sorted({m for row in group for m in row["map"] if m != "dpq"})
    for bits in BITS:
        if not baselines or any(bits not in row["map"].get("dpq", {}) for row in group):
            continue
        means = {
            m: statistics.fmean(row["map"][m][bits] for row in group)
            for m in baselines
            if all(bits in row["map"].get(m, {}) for row in group)
        }
        if not means:
            continue
        best = max(means, key=means.get)
        diffs = [row["map"]["dpq"][bits] - row["map"][best][bits] for row in group]
        mean, std = _mean_std(diffs)
        verdict = (
            "ahead of" if mean > std and mean > 0 else "behind" if mean < -std else "tied with"
        )
        lines.append(
            f"- {bits} bits: DPQ is **{verdict}** the best baseline ({best}): difference "
            f"{mean:+.4f} ± {std:.4f} over {len(diffs)} seed(s) (per seed: "
            + ", ".join(f"{d:+.4f}" for d in diffs)
            + ")"
        )
    return lines


def _ablation_table(rows: list[dict]) -> list[str]:
    """Table 2 side by side: per (feature, budget) holding "full" and another configuration,
    DPQ's mAP of every configuration (mean ± std over its seeds), the 32-bit difference to
    "full" paired by split seed (mean ± std and per seed), and the paper's row."""
    sets: dict[tuple, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if "dpq" in row["map"]:
            key = (row.get("feature", "?"), row.get("minutes"), row["epochs"], _arithmetic(row))
            sets[key][row["config"]][row["split_seed"]] = row
    lines: list[str] = []
    for (feature, minutes, epochs, arithmetic), configs in sets.items():
        if "full" not in configs or len(configs) < 2:
            continue
        budget = f"{minutes:g} min" if minutes else f"{epochs} epochs"
        full = configs["full"]
        lines += [
            f"## Table 2: ablations, {feature} features, {budget}, {arithmetic}",
            "",
            "DPQ's mAP, mean ± std over the split seeds; Δ32 is the 32-bit difference to "
            "full, paired by seed (mean ± std, then per seed).",
            "",
            "| config | seeds | "
            + " | ".join(f"{b} bits" for b in BITS)
            + " | query acc | Δ32 vs full | paper (8/16/24/32) |",
            "|---|---|" + "---|" * (len(BITS) + 3),
        ]
        for name, by_seed in configs.items():
            group = [by_seed[s] for s in sorted(by_seed)]
            cells = [format_mean_std([r["map"]["dpq"][b] for r in group]) for b in BITS]
            accuracy = [r["query_accuracy"] for r in group if r["query_accuracy"] is not None]
            shared = sorted(set(by_seed) & set(full))
            delta = ""
            if name != "full" and shared:
                diffs = [
                    by_seed[s]["map"]["dpq"]["32"] - full[s]["map"]["dpq"]["32"] for s in shared
                ]
                mean, std = _mean_std(diffs)
                delta = f"{mean:+.4f} ± {std:.4f} (" + ", ".join(f"{d:+.4f}" for d in diffs) + ")"
            paper = " / ".join(f"{v:.3f}" for v in PAPER_TABLE2.get(name, ()))
            seeds = ",".join(str(s) for s in sorted(by_seed))
            lines.append(
                f"| {name} | {seeds} | "
                + " | ".join(cells)
                + f" | {format_mean_std(accuracy) if accuracy else ''} | {delta} | {paper} |"
            )
        lines.append("")
    return lines


def _markdown(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        key = (row["config"], row.get("feature", "?"), row.get("minutes"), row["epochs"])
        groups[(*key, _arithmetic(row))].append(row)
    lines = [
        "# CIFAR-10, DPQ protocol: mAP@54000, mean ± standard deviation over split seeds",
        "",
        "One model per row and seed, trained from scratch on the 5,000 training images "
        "(500 per class); the other 54,000 images are the database, searched for the 1,000 "
        "queries (AQD for semantic features, inner product for class posteriors). Baselines "
        "are fitted on the same 5,000 training features of each run. ± is the sample "
        "standard deviation over the seeds.",
        "",
        "Paper DPQ (AlexNet, ImageNet-pretrained, GPU): "
        + " / ".join(f"{PAPER_ROW[b]:.3f}" for b in BITS),
        "",
    ]
    for (config, feature, minutes, epochs, arithmetic), group in groups.items():
        seeds = sorted(row["split_seed"] for row in group)
        first = group[0]
        budget = f"{minutes:g} min" if minutes else f"{epochs} epochs"
        lines += [
            f"## {config}, {feature} features, {budget}, {arithmetic} "
            f"(seeds {', '.join(map(str, seeds))})",
            "",
            f"{epochs} epochs at {statistics.fmean(r['seconds_per_step'] for r in group):.3f} "
            f"s/step, precision {first['precision']}, native bf16: {first['native_bf16']} "
            f"({first['cpu']}); train wall "
            f"{statistics.fmean(r['wall_seconds']['train'] for r in group) / 60:.1f} min per run.",
            "",
            "| method | " + " | ".join(f"{b} bits" for b in BITS) + " |",
            "|---|" + "---|" * len(BITS),
        ]
        methods = list(dict.fromkeys(m for row in group for m in row["map"]))
        for method in methods:
            cells = []
            for bits in BITS:
                values = [row["map"][method][bits] for row in group if bits in row["map"][method]]
                cells.append(format_mean_std(values) if len(values) == len(group) else "")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        floats = [row["float_map"] for row in group if row["float_map"] is not None]
        if floats:
            lines.append(f"| float (exact) | {format_mean_std(floats)} | | | |")
        accuracy = [row["query_accuracy"] for row in group if row["query_accuracy"] is not None]
        if accuracy:
            lines.append(f"| query accuracy | {format_mean_std(accuracy)} | | | |")
        lines += [""]
        dpq = [row["map"]["dpq"] for row in group if "dpq" in row["map"]]
        if dpq and all("8" in d and "32" in d for d in dpq):
            gaps = [d["32"] - d["8"] for d in dpq]
            lines.append(
                "- 8-bit code within 0.02 of the 32-bit code on every seed: "
                f"{'yes' if max(gaps) <= 0.02 else 'NO'} (32 - 8 bits: "
                + ", ".join(f"{g:+.4f}" for g in gaps)
                + ")"
            )
        lines += _verdicts(group) + [""]
    return "\n".join(lines + _ablation_table(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        default="full",
        help=f"configuration(s): one of {', '.join(ABLATIONS)}, a comma-separated list, or all",
    )
    parser.add_argument("--seeds", default="0", help="split seeds, comma-separated (0)")
    parser.add_argument(
        "--features",
        default="class_posterior",
        help="semantic, class_posterior, or both comma-separated (default: the recipe's)",
    )
    parser.add_argument("--minutes", type=float, help="training budget of each run")
    parser.add_argument("--epochs", type=int, help="fixed epochs instead of a budget")
    parser.add_argument("--baselines", default="", help="e.g. rq,pq,opq,lsq (none by default)")
    parser.add_argument("--data", help="CIFAR-10 archive/folder/zip (default: download/cache)")
    parser.add_argument("--word-vectors", help="CIFAR-10 word vectors (default: beside --data)")
    parser.add_argument(
        "--recipe",
        default="cifar10",
        help="recipe name or DPQ config JSON that the ablations modify (default: cifar10)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="training arithmetic instead of the recipe's (auto: bf16 where native)",
    )
    parser.add_argument(
        "--runs", default=str(REPO / "runs" / "cifar10_table1"), help="where runs are written"
    )
    parser.add_argument(
        "--results",
        default=str(REPO / "results" / "cifar10_table1.json"),
        help="JSON results file to append to (the markdown table is written beside it)",
    )
    parser.add_argument(
        "--summarize", metavar="RESULTS", help="only rewrite the tables of this results file"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue runs whose folders hold checkpoints of an interrupted run",
    )
    args = parser.parse_args(argv)
    if args.summarize:
        rows = json.loads(Path(args.summarize).read_text())
        text = _markdown(rows)
        write_text_atomic(Path(args.summarize).with_suffix(".md"), text)
        print(text)
        return 0
    if (args.minutes is None) == (args.epochs is None):
        parser.error("give exactly one of --minutes and --epochs")
    names = list(ABLATIONS) if args.config == "all" else args.config.split(",")
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {', '.join(ABLATIONS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    features = args.features.split(",")
    results_path = Path(args.results)
    budget = f"{args.minutes:g}min" if args.minutes is not None else f"{args.epochs}ep"
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    for feature in features:
        base = load_recipe(args.recipe).replace(model={"feature": feature})
        if args.threads:
            base = base.replace(train={"num_threads": args.threads})
        if args.precision:
            base = base.replace(train={"precision": args.precision})
        for name in names:
            for seed in seeds:
                arithmetic = f"-{args.precision}" if args.precision else ""
                run_dir = Path(args.runs) / f"{name}-{feature}-{budget}{arithmetic}-seed{seed}"
                protocol = ReproduceSettings(
                    data=args.data,
                    ablation=name,
                    base_config=base,
                    minutes=args.minutes,
                    epochs=args.epochs,
                    baselines=[b for b in args.baselines.split(",") if b],
                    split_seed=seed,
                    command=command,
                )
                run = RunSettings(
                    run_dir,
                    word_vectors=args.word_vectors,
                    resume=args.resume and (run_dir / "checkpoints").is_dir(),
                    progress=not args.quiet,
                )
                result = reproduce_cifar10(protocol, run)
                row = _row(result, name, feature, args.minutes, args.recipe)
                # read just before writing: another run may have appended meanwhile
                rows = json.loads(results_path.read_text()) if results_path.is_file() else []
                rows.append(row)
                write_json_atomic(results_path, rows)
                write_text_atomic(results_path.with_suffix(".md"), _markdown(rows))
                maps = row["map"]["dpq"]
                print(
                    f"{name} {feature} seed {seed}: "
                    + " ".join(f"{b} bits {v:.4f}" for b, v in maps.items())
                    + f"; train {result.wall_seconds['train'] / 60:.1f} min -> {results_path}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
