"""CIFAR-10 DPQ table (paper Tables 1 and 2): the full model and its ablations, one model per
configuration, mAP@54000 at 8/16/24/32 bits, with the wall time of each run.

Each invocation trains and evaluates the configurations named by ``--config`` (one, a
comma-separated list, or ``all``) with ``dpq.experiments.reproduce_cifar10`` (the same code as
``dpq reproduce cifar10``), then appends one row per configuration to a JSON results file and
rewrites the markdown table beside it, so the table fills over several sessions:

    python benchmarks/cifar10_table1.py --config full --minutes 30 \\
        --data ../shared/data/cifar10/cifar10-jpeg.zip
    python benchmarks/cifar10_table1.py --config E+LS --minutes 10 --recipe recipe.json

Rows record the budget (minutes) and the config name; compare rows with the same budget.
Never run by CI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

from dpq.atomic import write_text_atomic
from dpq.config import ABLATIONS, load_recipe
from dpq.experiments import reproduce_cifar10

REPO = Path(__file__).resolve().parents[1]
PAPER_ROW = {"8": 0.814, "16": 0.833, "24": 0.834, "32": 0.831}


def _row(results: dict, config_name: str, minutes: float | None, recipe: str | None) -> dict:
    evaluation = results["evaluation"]
    config = results["config"]
    return {
        "config": config_name,
        "minutes": minutes,
        "epochs": results["epochs"],
        "schedule": config["train"]["schedule"],
        "recipe": recipe,
        "map": evaluation["map"],
        "float_map": evaluation["float_map"],
        "query_accuracy": evaluation["query_accuracy"],
        "database_accuracy": evaluation.get("database_accuracy"),
        "class_probability_map": evaluation.get("class_probability_map"),
        "wall_seconds": results["wall_seconds"],
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": results.get("command"),
        "run_dir": str(Path(results["model_dir"]).parent),
    }


def _markdown(rows: list[dict]) -> str:
    bits = ["8", "16", "24", "32"]
    lines = [
        "# CIFAR-10, DPQ protocol: mAP@54000 from one model per row",
        "",
        "Trained from scratch on the 5,000 training images (500 per class, seed 0); the other "
        "54,000 images are the database, searched with AQD for the 1,000 queries. "
        "`minutes` is the training budget; wall times in minutes. `class-prob mAP`: the "
        "database ranked by the classifier's softmax probabilities (what a fully "
        "class-collapsed embedding of the same classifier would reach; a diagnostic).",
        "",
        "| config | schedule | minutes | threads | epochs | "
        + " | ".join(f"{b} bits" for b in bits)
        + " | float | query acc | db acc | class-prob mAP | train wall | total wall |",
        "|" + "---|" * 15,
        "| paper DPQ (AlexNet, ImageNet-pretrained, GPU) | | | | | "
        + " | ".join(f"{PAPER_ROW[b]:.3f}" for b in bits)
        + " | | | | | | |",
    ]
    for row in rows:
        wall = row["wall_seconds"]
        maps = " | ".join(f"{row['map'].get(b, float('nan')):.4f}" for b in bits)
        float_map = "" if row["float_map"] is None else f"{row['float_map']:.4f}"
        accuracy = "" if row["query_accuracy"] is None else f"{row['query_accuracy']:.4f}"
        extras = " | ".join(
            "" if row.get(key) is None else f"{row[key]:.4f}"
            for key in ("database_accuracy", "class_probability_map")
        )
        minutes = "" if row["minutes"] is None else f"{row['minutes']:g}"
        lines.append(
            f"| {row['config']} | {row['schedule']} | {minutes} | {row.get('threads') or 2} | "
            f"{row['epochs']} | {maps} | "
            f"{float_map} | {accuracy} | {extras} | {wall['train'] / 60:.1f} | "
            f"{wall['total'] / 60:.1f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        required=True,
        help=f"configuration(s): one of {', '.join(ABLATIONS)}, a comma-separated list, or all",
    )
    parser.add_argument("--minutes", type=float, help="training budget of each run")
    parser.add_argument("--epochs", type=int, help="fixed epochs instead of a budget")
    parser.add_argument("--data", help="CIFAR-10 archive/folder/zip (default: download/cache)")
    parser.add_argument("--word-vectors", help="CIFAR-10 word vectors (default: beside --data)")
    parser.add_argument(
        "--recipe",
        default="cifar10",
        help="recipe name or DPQ config JSON that the ablations modify (default: cifar10)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of each run (0: all cores); with 1, two runs can share two cores",
    )
    parser.add_argument(
        "--runs", default=str(REPO / "runs" / "cifar10_table1"), help="where runs are written"
    )
    parser.add_argument(
        "--results",
        default=str(REPO / "results" / "cifar10_table1.json"),
        help="JSON results file to append to (the markdown table is written beside it)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if (args.minutes is None) == (args.epochs is None):
        parser.error("give exactly one of --minutes and --epochs")
    names = list(ABLATIONS) if args.config == "all" else args.config.split(",")
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {', '.join(ABLATIONS)}")
    base = load_recipe(args.recipe)
    if args.threads:
        base = base.replace(train={"num_threads": args.threads})
    results_path = Path(args.results)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    budget = f"{args.minutes:g}min" if args.minutes is not None else f"{args.epochs}ep"
    for name in names:
        run_dir = Path(args.runs) / f"{name}-{budget}-{stamp}"
        command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        results = reproduce_cifar10(  # a ReproduceResult; its to_dict() is results.json
            run_dir,
            data=args.data,
            ablation=name,
            base_config=base,
            minutes=args.minutes,
            epochs=args.epochs,
            word_vectors=args.word_vectors,
            progress=not args.quiet,
            command=command,
        ).to_dict()
        row = _row(results, name, args.minutes, args.recipe)
        row["threads"] = args.threads or None
        # read just before writing: another run may have appended meanwhile
        rows = json.loads(results_path.read_text()) if results_path.is_file() else []
        rows.append(row)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(results_path, json.dumps(rows, indent=2) + "\n")
        write_text_atomic(results_path.with_suffix(".md"), _markdown(rows))
        maps = results["evaluation"]["map"]
        print(
            f"{name}: "
            + " ".join(f"{b} bits {v:.4f}" for b, v in maps.items())
            + f"; train {results['wall_seconds']['train'] / 60:.1f} min -> {results_path}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
