"""CIFAR-10 Table 1 for real: DPQ and the paper's deep competitors trained here, one protocol.

Every method (``--methods``, any registered in :mod:`dpq.methods`) trains with the
``cifar10`` recipe's backbone, augmentation, optimizer family and batch size for a fixed
number of epochs (``--epochs``; 20 for the table) on the 5,000 training images of split seed
s (500 per class, ``--seeds``), and is scored by mAP@54000 over the 1,000 queries with its
own distance (AQD for the quantizers, Hamming distance for the hashing methods). DPQ trains
once for its four code lengths; each competitor trains once per length (``--bits``), as its
paper does. The training wall time of every run is recorded, so that the table can say what
the four lengths cost per method (DPQ's "trained once" claim, measured).

Tuning (``--tune``): each method, DPQ included, gets the same budget, the settings of
:func:`tuning_settings` (six: learning-rate factor x the method's main loss weight, from its
paper's range, the defaults first), each trained on 4,000 of the 5,000 training images of
seed 0 and scored on the other 1,000 (queried against the 4,000 as the database), never on
the query set, at ``--tune-bits`` bits; rows go to ``--tuning-results``. The table trains
every seed and length at the setting :func:`chosen_settings` picks: the best validation mAP
of the grid, ties (within :data:`TIE_TOLERANCE`) to the earlier setting, and never a
collapsed run (one code for every item, which on this split scores more than a weak but
working network). A method without tuning rows runs at its defaults (the table says which).

Every finished run appends one row to ``--results`` (JSON); ``--resume`` skips finished runs
and continues an interrupted training from its checkpoints. The markdown table (mean ± std
over seeds, paired DPQ differences, training time of the four lengths: each length's fastest
seed, from the quiet seconds each row stores) and the figure (P-R and precision@R at 32 bits,
every method: the paper's Figure 3) are rewritten from all rows.

    nice -n 19 python benchmarks/cifar10_table1.py --methods dpq,dvsq,dqn,dsh,dhn,hashnet,csq \\
        --seeds 0,1,2 --epochs 20 --resume --data ../shared/data/cifar10/cifar10-jpeg.zip
    python benchmarks/cifar10_table1.py --summarize

Never run by CI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from dpq.atomic import write_json_atomic, write_text_atomic
from dpq.data import Split, load_source, split_per_class
from dpq.evaluate.metrics import PRCurve, map_at_r
from dpq.evaluate.report import format_mean_std, plot_retrieval_curves
from dpq.evaluate.workflows import evaluate_split
from dpq.methods import method_for
from dpq.recipes import cifar10_recipe
from dpq.training.checkpoints import RunDirectory
from dpq.training.experiments import RunSettings, prepare_run, train_run
from dpq.training.reproduce import ReproduceSettings, reproduce_cifar10

REPO = Path(__file__).resolve().parents[1]
ALL_BITS = (8, 16, 24, 32)
METHODS = ("dpq", "dvsq", "dqn", "dsh", "dhn", "hashnet", "csq")
PAPER_TABLE1 = {  # the paper's Table 1, CIFAR-10 column (8/16/24/32 bits); None: not in it
    "dpq": (0.814, 0.833, 0.834, 0.831),
    "dvsq": (0.715, 0.727, 0.730, 0.733),
    "dqn": (0.527, 0.551, 0.558, 0.564),
    "dsh": (0.592, 0.625, 0.651, 0.659),
    "dhn": (0.512, 0.568, 0.594, 0.603),
    "hashnet": None,
    "csq": None,
}
# Per method: the loss weight that is tuned (a method option, or for DPQ a loss field) and its
# values; the learning rate is tuned as a factor on the recipe's train.lr. 3 x 2 = 6 settings.
# Each grid lists the method's default first: ties (within TIE_TOLERANCE) go to the earlier
# setting, so a weight the tuning budget cannot tell apart stays at its default.
MAIN_WEIGHT = {
    "dpq": ("loss.tau", (0.001, 0.01)),
    "dvsq": ("quantization_weight", (1e-4, 1e-2)),
    "dqn": ("quantization_weight", (1e-4, 1e-2)),
    "dsh": ("alpha", (0.01, 0.1)),
    "dhn": ("quantization_weight", (0.1, 1.0)),
    "hashnet": ("gamma", (0.005, 0.5)),
    "csq": ("quantization_weight", (1e-4, 1e-2)),
}
LR_FACTORS = (1.0, 0.3, 3.0)
TIE_TOLERANCE = 1e-4  # validation mAPs closer than this are a tie


def tuning_settings(method: str) -> list[dict[str, Any]]:
    """The <= 6 settings a method is tuned over: {"lr_factor", weight name: value}."""
    name, values = MAIN_WEIGHT[method]
    return [{"lr_factor": f, name: v} for f in LR_FACTORS for v in values]


def method_config(method: str, bits: int, setting: dict[str, Any] | None, epochs: int, seed: int):
    """The cifar10 recipe with ``method`` at ``bits`` (DPQ: all lengths), a tuning setting
    applied, ``epochs`` fixed and the training seed ``seed``."""
    recipe = cifar10_recipe()
    setting = dict(setting or {})
    lr = recipe.train.lr * float(setting.pop("lr_factor", 1.0))
    config = recipe.replace(train={"epochs": epochs, "time_budget_minutes": None, "lr": lr})
    config = config.replace(train={"seed": seed})
    if method == "dpq":
        loss = {key.split(".", 1)[1]: value for key, value in setting.items()}
        return config.replace(loss=loss) if loss else config
    return config.replace(method={"name": method, "bits": bits, "options": setting})


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine() -> dict[str, Any]:
    from dpq.devices import native_bf16

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": model, "native_bf16": native_bf16(), "threads": torch.get_num_threads()}


def setting_key(setting: dict[str, Any] | None) -> str:
    """How a setting is written in a results row ("null" for the defaults)."""
    return json.dumps(setting, sort_keys=True)


def _grid_keys(method: str) -> list[str]:
    """The method's tuning grid, as results rows write it, in grid order."""
    return [setting_key(s) for s in tuning_settings(method)]


def _key(row: dict) -> tuple:
    return (row["phase"], row["method"], row["bits_trained"], row["split_seed"], row["setting"])


def _run_table_row(method: str, bits: int | None, seed: int, setting, args, log) -> dict:
    """Train and score one model on the protocol split of ``seed``; its results row."""
    tag = f"{method}-{bits or 'all'}b-seed{seed}{setting_tag(setting)}"
    out = Path(args.runs) / tag
    resume = args.resume and RunDirectory(out).checkpoints.latest() is not None
    config = method_config(method, bits or 32, setting, args.epochs, seed)
    cpu = _cpu_seconds()
    result = reproduce_cifar10(
        ReproduceSettings(
            data=args.data,
            base_config=config,
            epochs=args.epochs,
            split_seed=seed,
            command=" ".join(sys.argv),
        ),
        RunSettings(
            out_dir=out, word_vectors=args.word_vectors, resume=resume, progress=False, log=log
        ),
    )
    evaluation = result.evaluation
    curves = {}
    pr, at_r = evaluation.details.curves(32)
    if pr:
        curve = next(iter(pr.values()))
        ranks, precision = next(iter(at_r.values()))
        curves = {
            "pr": curve.to_dict(),
            "precision_at": {"ranks": ranks.tolist(), "precision": precision.tolist()},
        }
    return {
        "map": {str(b): v for b, v in evaluation.map_by_bits.items()},
        "search": evaluation.search,
        "curves_32": curves,
        "train_seconds": result.wall_seconds["train"],
        "cpu_seconds_total": _cpu_seconds() - cpu,
        "wall_seconds": result.wall_seconds,
        "epochs": result.epochs,
        "seconds_per_step": _seconds_per_step(result.train),
        "precision": result.train.precision,
        "run_dir": str(out),
        "resumed_from_epoch": result.train.resumed_from_epoch,
    }


def _seconds_per_step(train) -> float | None:
    seconds = [record.get("seconds") for record in train.history]
    if not seconds or None in seconds:
        return None
    steps = max(1, 5000 // train.model.config.train.batch_size) * len(seconds)
    return round(sum(seconds) / steps, 4)


def _validation_split(source, seed: int) -> Split:
    """400 training and 100 validation images per class from the 5,000 of split ``seed``;
    the validation images are the queries, the 4,000 the database."""
    protocol = split_per_class(source.labels, 500, 100, seed=seed, classes=source.classes)
    rng = np.random.default_rng(1000 + seed)
    labels = np.asarray(source.labels)[protocol.train]
    validation = np.concatenate(
        [rng.choice(protocol.train[labels == c], 100, replace=False) for c in np.unique(labels)]
    )
    train = np.setdiff1d(protocol.train, validation)
    return Split(
        train=train,
        query=np.sort(validation),
        database=train,
        protocol="validation(400,100) of per_class(500,100)",
        seed=seed,
    )


def _run_tuning_row(method: str, setting: dict, source, args, log) -> dict:
    """Train on the 4,000 and score the 1,000 validation images of seed 0."""
    bits = args.tune_bits
    name = "-".join(f"{k}={v}" for k, v in setting.items())
    out = Path(args.runs) / "tuning" / f"{method}-{bits}b-{name}"
    resume = args.resume and RunDirectory(out).checkpoints.latest() is not None
    config = method_config(method, bits, setting, args.tune_epochs or args.epochs, 0)
    split = _validation_split(source, 0)
    began = time.perf_counter()
    prepared = prepare_run(config, source, split, word_vectors=args.word_vectors)
    train = train_run(
        prepared,
        RunSettings(
            out_dir=out, word_vectors=args.word_vectors, resume=resume, progress=False, log=log
        ),
    )
    seconds = time.perf_counter() - began
    evaluation = evaluate_split(train.model, source, split, progress=False)
    score = evaluation.map_by_bits.get(bits, evaluation.map_by_bits[max(evaluation.map_by_bits)])
    return {
        "validation_map": score,
        "epochs": train.epochs,
        "train_seconds": seconds,
        "precision": train.precision,
        "run_dir": str(out),
    }


def default_weight(method: str) -> float:
    """The value the method trains with when its main loss weight is not set."""
    name = MAIN_WEIGHT[method][0]
    if method == "dpq":
        return float(getattr(cifar10_recipe().loss, name.split(".", 1)[1]))
    network_method = method_for(method_config(method, 32, None, 1, 0))
    return float(network_method.option_table()[name].default)


def canonical_setting(method: str, setting: dict[str, Any] | None) -> dict[str, Any] | None:
    """``setting`` without the entries at their defaults; None when nothing is left (a run
    at the defaults), so that a run recorded as "defaults" and one at the chosen setting
    that happens to be the defaults are the same run."""
    left = dict(setting or {})
    if float(left.get("lr_factor", 1.0)) == 1.0:
        left.pop("lr_factor", None)
    name = MAIN_WEIGHT[method][0]
    if name in left and float(left[name]) == default_weight(method):
        left.pop(name)
    return left or None


def all_ties_map(source) -> float:
    """Validation mAP of an index that ties every item for every query (one code for all),
    under the tie rule (database order): what a collapsed network scores."""
    split = _validation_split(source, 0)
    labels = np.asarray(source.labels)
    ranked = np.broadcast_to(
        np.arange(len(split.database)), (len(split.query), len(split.database))
    )
    return map_at_r(ranked, labels[split.query], labels[split.database])


def is_collapsed(row: dict) -> bool:
    """The tuning run scored exactly what one code for every item scores."""
    return abs(row["validation_map"] - row["all_ties_map"]) < 1e-9


def chosen_settings(rows: list[dict]) -> dict[str, dict | None]:
    """The best validation setting per method, canonical (None: the defaults).

    Only settings of the method's current grid (:func:`tuning_settings`) compete; a
    collapsed run (:func:`is_collapsed`) is never chosen; settings within
    :data:`TIE_TOLERANCE` of the best are a tie, won by the earliest in the grid (whose
    first entries are the defaults). A method without eligible tuning rows is absent."""
    chosen: dict[str, dict | None] = {}
    for method in MAIN_WEIGHT:
        grid = _grid_keys(method)
        scores = {
            row["setting"]: row["validation_map"]
            for row in rows
            if row["phase"] == "tune"
            and row["method"] == method
            and row["setting"] in grid
            and not is_collapsed(row)
        }
        if not scores:
            continue
        best = max(scores.values())
        winner = next(s for s in grid if s in scores and scores[s] >= best - TIE_TOLERANCE)
        chosen[method] = canonical_setting(method, json.loads(winner))
    return chosen


def setting_tag(setting: dict[str, Any] | None) -> str:
    """The run-directory suffix of a non-default setting ("" for the defaults)."""
    return "".join(f"-{k}={v}" for k, v in sorted((setting or {}).items()))


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _quiet_seconds_from_log(row: dict) -> float | None:
    """Training seconds of a run as if it ran undisturbed: its epochs times the lowest
    decile of its epoch wall times (train_log.jsonl in its run folder, every call of a
    resumed run), so that epochs slowed by other jobs (or a SIGSTOP while something else was
    measured) do not count. None when the log is gone or incomplete."""
    log = Path(row.get("run_dir", "")) / "train_log.jsonl"
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    epochs = {r["epoch"]: r.get("seconds") for r in records if "epoch" in r}
    if len(epochs) != row.get("epochs") or None in epochs.values():
        return None
    return float(np.quantile(list(epochs.values()), 0.1)) * len(epochs)


def record_quiet_seconds(row: dict) -> None:
    """Store the run's quiet training seconds in its row (``train_seconds_quiet``) while its
    run folder is there, so that the table never needs the folder again."""
    if "train_seconds_quiet" not in row:
        quiet = _quiet_seconds_from_log(row)
        if quiet is not None:
            row["train_seconds_quiet"] = round(quiet, 2)


def _training_seconds(row: dict) -> float | None:
    """A run's training seconds for the time column: the quiet seconds stored in the row or
    read from its log, else the recorded wall seconds of a run that trained in one call;
    None for a resumed run whose log is gone (its wall time covers only the last call)."""
    if "train_seconds_quiet" in row:
        return float(row["train_seconds_quiet"])
    quiet = _quiet_seconds_from_log(row)
    if quiet is not None:
        return quiet
    if row.get("resumed_from_epoch", 0):
        return None
    return float(row["train_seconds"])


def _at_chosen(row: dict, chosen: dict[str, dict | None]) -> bool:
    """A table row trained at its method's chosen setting (defaults when never tuned)."""
    return row["setting"] == setting_key(chosen.get(row["method"]))


def markdown(rows: list[dict], chosen: dict[str, dict | None]) -> str:
    """The table at the chosen settings, the paired DPQ differences, training time, and
    the runs at other settings (kept, not in the table)."""
    others = [row for row in rows if row["phase"] == "table" and not _at_chosen(row, chosen)]
    rows = [row for row in rows if row["phase"] == "table" and _at_chosen(row, chosen)]
    table = defaultdict(lambda: defaultdict(dict))  # method -> bits -> seed -> mAP
    seconds = defaultdict(lambda: defaultdict(dict))  # method -> seed -> bits -> train seconds
    for row in rows:
        if row["phase"] != "table":
            continue
        for bits, value in row["map"].items():
            table[row["method"]][int(bits)][row["split_seed"]] = value
        trained = _training_seconds(row)
        if trained is not None:
            seconds[row["method"]][row["split_seed"]][row["bits_trained"]] = trained
    lines = [
        "| method | setting | "
        + " | ".join(f"{b} bits" for b in ALL_BITS)
        + " | paper (8/16/24/32) | training s, fastest seed (all lengths) | seeds |",
        "|---|---|" + "---|" * len(ALL_BITS) + "---|---|---|",
    ]
    order = [m for m in METHODS if m in table] + sorted(set(table) - set(METHODS))
    for method in order:
        cells = []
        for bits in ALL_BITS:
            values = list(table[method][bits].values())
            cells.append(format_mean_std(values) if values else "—")
        paper = PAPER_TABLE1.get(method)
        paper_cell = "/".join(f"{v:.3f}" for v in paper) if paper else "not in the paper"
        lengths = sorted({b for by_bits in seconds[method].values() for b in by_bits}, key=str)
        # each length's fastest seed, summed: other work on the machine only ever slows a
        # run down (the minimum of repeats, as timeit takes), and a seed that has run only
        # some lengths so far neither shrinks nor skips the four-length total
        per_length = [
            min(by_bits[b] for by_bits in seconds[method].values() if b in by_bits) for b in lengths
        ]
        time_cell = f"{sum(per_length):.0f}" if per_length else "—"
        if method != "dpq" and len(lengths) < len(ALL_BITS):
            time_cell += f" ({'+'.join(map(str, lengths))} bits only)"
        used = sorted(
            {row["setting"] for row in rows if row["phase"] == "table" and row["method"] == method}
        )
        setting = ", ".join("defaults" if s == "null" else s for s in used)
        seeds = sorted({s for by_seed in table[method].values() for s in by_seed})
        lines.append(
            f"| {method} | {setting} | "
            + " | ".join(cells)
            + f" | {paper_cell} | {time_cell} | {','.join(map(str, seeds))} |"
        )
    lines += [
        "",
        "Paired differences DPQ − method (mean ± std over the seeds both ran; "
        "`ahead` when the mean exceeds the paired spread):",
        "",
        "| method | " + " | ".join(f"{b} bits" for b in ALL_BITS) + " |",
        "|---|" + "---|" * len(ALL_BITS),
    ]
    for method in order:
        if method == "dpq":
            continue
        cells = []
        for bits in ALL_BITS:
            seeds = sorted(set(table["dpq"][bits]) & set(table[method][bits]))
            diffs = [table["dpq"][bits][s] - table[method][bits][s] for s in seeds]
            if not diffs:
                cells.append("—")
                continue
            mean, spread = _mean_std(diffs)
            verdict = "ahead" if mean > spread else "behind" if -mean > spread else "tied"
            verdict = verdict if len(diffs) > 1 else "one seed"
            cells.append(f"{format_mean_std(diffs)} ({verdict}, n={len(diffs)})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if others:
        lines += [
            "",
            "Runs at other settings (not the protocol's choice; kept for the record):",
            "",
            "| method | setting | bits trained | seed | mAP (8/16/24/32) |",
            "|---|---|---|---|---|",
        ]
        for row in sorted(others, key=lambda r: (r["method"], str(r["bits_trained"]))):
            maps = "/".join(f"{row['map'][str(b)]:.4f}" for b in ALL_BITS if str(b) in row["map"])
            setting = "defaults" if row["setting"] == "null" else row["setting"]
            lines.append(
                f"| {row['method']} | {setting} | {row['bits_trained']} | "
                f"{row['split_seed']} | {maps} |"
            )
    return "\n".join(lines) + "\n"


def tuning_markdown(tuning: list[dict]) -> str:
    """The tuning record: every setting tried, its validation mAP, and which was chosen."""
    chosen = chosen_settings(tuning)
    lines = [
        "Tuning record (validation mAP@4000: 1,000 validation queries carved from the 5,000 "
        "training images of seed 0, the other 4,000 the training set and database). "
        f"Chosen: the best of the method's grid; ties within {TIE_TOLERANCE:g} go to the "
        "earlier setting (defaults first); a collapsed run (one code for every item: its "
        "mAP equals the all-ties mAP) is never chosen.",
        "",
        "| method | bits | setting | validation mAP | epochs | status |",
        "|---|---|---|---|---|---|",
    ]
    for row in sorted(tuning, key=lambda r: (r["method"], r["setting"])):
        method = row["method"]
        if row["setting"] not in _grid_keys(method):
            status = "earlier grid (not eligible)"
        elif is_collapsed(row):
            status = "collapsed"
        elif canonical_setting(method, json.loads(row["setting"])) == chosen.get(method, 0):
            status = "**chosen**"
        else:
            status = ""
        lines.append(
            f"| {method} | {row['bits_trained']} | {row['setting']} | "
            f"{row['validation_map']:.4f} | {row['epochs']} | {status} |"
        )
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], folder: Path) -> list[Path]:
    """The paper's Figure 3 at 32 bits, one line per method in each panel (P-R left,
    precision@R right; seed 0, else the lowest seed): ``table1_curves_32bits.png``."""
    pr, at_r = {}, {}
    for row in sorted(rows, key=lambda r: r.get("split_seed", 0), reverse=True):
        curves = row.get("curves_32") if row["phase"] == "table" else None
        if curves:
            data = curves["pr"]
            pr[row["method"]] = PRCurve(
                np.asarray(data["cutoffs"]),
                np.asarray(data["precision"]),
                np.asarray(data["recall"]),
            )
            at_r[row["method"]] = (
                np.asarray(curves["precision_at"]["ranks"]),
                np.asarray(curves["precision_at"]["precision"]),
            )
    if not pr:
        return []
    seeds = sorted({row["split_seed"] for row in rows if row.get("curves_32")})
    title = f"CIFAR-10, 32 bits, split seed {seeds[0]}"
    return [plot_retrieval_curves(pr, at_r, folder / "table1_curves_32bits.png", title)]


def write_outputs(rows: list[dict], results: Path, tuning: list[dict]) -> None:
    """The table rows' JSON, their markdown (at the settings :func:`chosen_settings` picks
    from ``tuning``) and the figures. Each table row keeps its quiet training seconds
    (:func:`record_quiet_seconds`) from the first time it is written with its run folder."""
    chosen = chosen_settings(tuning)
    for row in rows:
        if row["phase"] == "table":
            record_quiet_seconds(row)
    write_json_atomic(results, rows)
    write_text_atomic(results.with_suffix(".md"), markdown(rows, chosen))
    figure([row for row in rows if _at_chosen(row, chosen)], results.parent)


def write_tuning_outputs(tuning: list[dict], results: Path) -> None:
    write_json_atomic(results, tuning)
    write_text_atomic(results.with_suffix(".md"), tuning_markdown(tuning))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list (all seven)")
    parser.add_argument("--seeds", default="0", help="split seeds, comma-separated (0)")
    parser.add_argument(
        "--bits",
        default="8,16,24,32",
        help="code lengths the per-length methods train (8,16,24,32)",
    )
    parser.add_argument("--epochs", type=int, default=20, help="epochs of every run (20)")
    parser.add_argument("--tune", action="store_true", help="run the tuning settings first")
    parser.add_argument("--tune-only", action="store_true", help="only the tuning settings")
    parser.add_argument("--tune-bits", type=int, default=32, help="bits tuned at (32)")
    parser.add_argument("--tune-epochs", type=int, help="epochs of a tuning run (--epochs)")
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/cifar10/cifar10-jpeg.zip"))
    parser.add_argument(
        "--word-vectors", default=str(REPO.parent / "shared/data/wordvec/cifar10.txt")
    )
    parser.add_argument("--runs", default=str(REPO / "runs" / "cifar10_table1"))
    parser.add_argument(
        "--results",
        default=str(REPO / "results" / "cifar10_table1.json"),
        help="table rows (JSON; the .md and figures are written beside it)",
    )
    parser.add_argument(
        "--tuning-results",
        default=str(REPO / "results" / "cifar10_table1_tuning.json"),
        help="tuning rows (JSON, + .md); the table trains each method at its chosen setting",
    )
    parser.add_argument(
        "--resume", action="store_true", help="skip finished runs, continue interrupted ones"
    )
    parser.add_argument(
        "--summarize",
        action="store_true",
        help="only rewrite the markdown (table, tuning record) and figures",
    )
    args = parser.parse_args(argv)

    results, tuning_results = Path(args.results), Path(args.tuning_results)
    rows: list[dict] = json.loads(results.read_text()) if results.exists() else []
    tuning: list[dict] = json.loads(tuning_results.read_text()) if tuning_results.exists() else []
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(MAIN_WEIGHT))
    if unknown:
        parser.error(f"unknown method(s) {unknown}: choose from {','.join(METHODS)}")
    source = None
    if any("all_ties_map" not in row for row in tuning) or args.tune or args.tune_only:
        source = load_source(args.data, progress=False)
        ties = all_ties_map(source)
        for row in tuning:
            row.setdefault("all_ties_map", ties)
        write_tuning_outputs(tuning, tuning_results)
    if args.summarize:
        write_tuning_outputs(tuning, tuning_results)
        write_outputs(rows, results, tuning)
        print(results.with_suffix(".md").read_text())
        return 0
    done = {_key(row) for row in rows + tuning}
    machine = _machine()

    def log(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    def stamp(row: dict) -> None:
        row.update(machine, date=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        done.add(_key(row))

    if args.tune or args.tune_only:
        for method in methods:
            for setting in tuning_settings(method):
                bits = "all" if method == "dpq" else args.tune_bits
                key = ("tune", method, bits, 0, setting_key(setting))
                if key in done:
                    continue
                print(f"tune {method} {setting}", flush=True)
                row = _run_tuning_row(method, setting, source, args, log)
                row.update(
                    phase="tune",
                    method=method,
                    bits_trained=bits,
                    split_seed=0,
                    setting=key[-1],
                    all_ties_map=ties,
                )
                print(f"  validation mAP {row['validation_map']:.4f}", flush=True)
                stamp(row)
                tuning.append(row)
                write_tuning_outputs(tuning, tuning_results)
    if args.tune_only:
        return 0
    chosen = chosen_settings(tuning)
    lengths = [int(b) for b in args.bits.split(",")]
    for seed in (int(s) for s in args.seeds.split(",")):
        for bits in lengths:
            for method in methods:
                if method == "dpq" and bits != lengths[0]:
                    continue  # DPQ trains once, for every length (with the first given)
                trained = "all" if method == "dpq" else bits
                setting = chosen.get(method)
                key = ("table", method, trained, seed, setting_key(setting))
                if key in done:
                    continue
                print(f"train {method} bits={trained} seed={seed} setting={setting}", flush=True)
                row = _run_table_row(
                    method, None if method == "dpq" else bits, seed, setting, args, log
                )
                row.update(
                    phase="table",
                    method=method,
                    bits_trained=trained,
                    split_seed=seed,
                    setting=key[-1],
                )
                print(f"  mAP {row['map']}  train {row['train_seconds']:.0f} s", flush=True)
                stamp(row)
                rows.append(row)
                write_outputs(rows, results, tuning)
    print(results.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
