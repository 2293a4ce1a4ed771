"""Tables and figures from metric results, the report folder (markdown + JSON + PNG), and
the text of results (a model's mAP table, search results as JSON or CSV).

Figures use matplotlib's object API (``matplotlib.figure.Figure``, rendered by Agg), so no
display and no global backend switch are needed. Every file is written atomically: a
temporary file in the same folder, then ``os.replace``.

Typical use (what ``dpq reproduce`` does)::

    pr, at_r = evaluation.curves(bits=32)
    figures = {
        "Precision-recall, 32 bits": plot_pr_curves(pr, out / "pr_32bits.png"),
        "Precision@R, 32 bits": plot_precision_at_r(at_r, out / "precision_at_r_32bits.png"),
        "t-SNE of quantized features": plot_tsne(reconstructions, labels, out / "tsne.png"),
    }
    write_report(out, title="CIFAR-10", map_table=evaluation.map_table(),
                 timings=evaluation.timings(), figures=figures, notes="...")
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dpq.atomic import write_bytes_atomic, write_json_atomic
from dpq.evaluate.metrics import PRCurve

# -------------------------------------------------------------------------- writing files


# --------------------------------------------------------------------------------- tables


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    fmt = "  ".join(
        f"{{:<{width}}}" if i == 0 else f"{{:>{width}}}" for i, width in enumerate(widths)
    )
    return "\n".join(fmt.format(*row) for row in [list(header), *rows])


def _all_bits(map_table: Mapping[str, Mapping[int, float]]) -> list[int]:
    return sorted({int(bits) for row in map_table.values() for bits in row})


def format_map_table(
    map_table: Mapping[str, Mapping[int, float]], markdown: bool = False, digits: int = 3
) -> str:
    """Methods x code lengths table of mAP values ({method: {bits: mAP}}); "-" where absent.
    In markdown the best value of each column is bold."""
    bits_list = _all_bits(map_table)
    best = {
        bits: max((row[bits] for row in map_table.values() if bits in row), default=None)
        for bits in bits_list
    }
    rows = []
    for method, row in map_table.items():
        cells = [method]
        for bits in bits_list:
            if bits not in row:
                cells.append("-")
                continue
            cell = f"{row[bits]:.{digits}f}"
            if markdown and len(map_table) > 1 and row[bits] == best[bits]:
                cell = f"**{cell}**"
            cells.append(cell)
        rows.append(cells)
    return _table(["method", *(f"{bits} bits" for bits in bits_list)], rows, markdown)


def timing_table(timings: Mapping[str, Mapping[str, float | None]], markdown: bool = True) -> str:
    """Rows x columns table of times, e.g. {"pq@32": {"fit_s": 3.1, "search_ms_per_query": 0.4}}.

    Column names come from the keys (their union, first-seen order); None shows as "-".
    Suffixes name the unit: ``_s`` seconds, ``_ms...`` milliseconds.
    """
    columns: list[str] = []
    for row in timings.values():
        columns += [key for key in row if key not in columns]
    rows = [
        [name, *("-" if row.get(column) is None else _number(row[column]) for column in columns)]
        for name, row in timings.items()
    ]
    return _table(["", *columns], rows, markdown)


def format_mean_std(values: Sequence[float]) -> str:
    """ "mean ± sample standard deviation" to 4 decimals; one value alone, as it is."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{float(np.mean(values)):.4f} ± {float(np.std(values, ddof=1)):.4f}"


def _number(value: float) -> str:
    value = float(value)
    if value == 0 or 0.01 <= abs(value) < 10000:
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return f"{value:.2e}"


def margin_summary(map_table: Mapping[str, Mapping[int, float]], method: str = "dpq") -> str:
    """Sentences saying by how much ``method`` beats (or trails) the best other method at each
    code length, in mAP points, and plainly whether it wins everywhere."""
    if method not in map_table:
        return f"No {method} results to compare."
    lines, wins, compared = [], 0, 0
    for bits in sorted(map_table[method]):
        others = {
            name: row[bits] for name, row in map_table.items() if name != method and bits in row
        }
        if not others:
            continue
        compared += 1
        best_name = max(others, key=others.get)
        gap = map_table[method][bits] - others[best_name]
        wins += gap > 0
        verb = "beats" if gap > 0 else ("ties with" if gap == 0 else "trails")
        lines.append(
            f"- {bits} bits: {method} {map_table[method][bits]:.3f} {verb} the best other method "
            f"({best_name}, {others[best_name]:.3f}): {gap:+.3f} mAP."
        )
    if not compared:
        return f"No baseline shares a code length with {method}."
    verdict = (
        f"{method} beats every baseline at every code length compared."
        if wins == compared
        else f"{method} does NOT beat every baseline: it wins at {wins} of {compared} code lengths."
    )
    return "\n".join([verdict, *lines])


def format_results_table(evaluation: Any, title: str = "") -> str:
    """A model's :class:`dpq.evaluate.results.RetrievalEvaluation` as plain text: one row per code
    length, the float-feature ceiling, the classifier's accuracy and diagnostics."""
    lines = [title] if title else []
    lines.append(f"{'code':>10}  mAP@{evaluation.r}")
    for bits, value in evaluation.map_by_bits.items():
        lines.append(f"{bits:>6} bit  {value:.4f}")
    if evaluation.float_map is not None:
        lines.append(f"{'float':>10}  {evaluation.float_map:.4f}  (exact search, float features)")
    if evaluation.query_accuracy is not None:
        lines.append(f"query accuracy {evaluation.query_accuracy:.4f}")
    if evaluation.database_accuracy is not None:
        lines.append(f"database accuracy {evaluation.database_accuracy:.4f}")
    if evaluation.class_probability_map is not None:
        lines.append(
            f"class-probability ranking mAP {evaluation.class_probability_map:.4f} "
            "(diagnostic: a fully class-collapsed embedding of this classifier)"
        )
    return "\n".join(lines)


def results_row_markdown(name: str, epochs: int, wall: Mapping[str, float], evaluation: Any) -> str:
    """One markdown table (header + a row) of a reproduction run: epochs, wall minutes, mAP at
    every code length, float, accuracies, diagnostics."""
    bits = list(evaluation.map_by_bits)

    def number(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    header = "| run | epochs | train min | total min | " + " | ".join(f"{b} bits" for b in bits)
    header += " | float | query acc | db acc | class-prob mAP |"
    separator = "|" + "---|" * (8 + len(bits))
    cells = [
        name,
        str(epochs),
        f"{wall['train'] / 60:.1f}",
        f"{wall['total'] / 60:.1f}",
        *(f"{evaluation.map_by_bits[b]:.4f}" for b in bits),
        *(
            number(value)
            for value in (
                evaluation.float_map,
                evaluation.query_accuracy,
                evaluation.database_accuracy,
                evaluation.class_probability_map,
            )
        ),
    ]
    return "\n".join([header, separator, "| " + " | ".join(cells) + " |"])


# -------------------------------------------------------------------------------- figures


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _save_figure(figure: Any, path: str | Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return write_bytes_atomic(path, buffer.getvalue())


def _draw_pr(axes: Any, curves: Mapping[str, PRCurve], title: str) -> None:
    if not curves:
        raise ValueError("no PR curve to plot: give at least one method's curve.")
    for method, curve in curves.items():
        axes.plot(curve.recall, curve.precision, marker=".", markersize=3, label=method)
    axes.set(xlabel="recall", ylabel="precision", title=title, xlim=(0, 1), ylim=(0, 1.02))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def _draw_precision_at_r(
    axes: Any, curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str
) -> None:
    if not curves:
        raise ValueError("no precision@R curve to plot: give at least one method's curve.")
    for method, (ranks, precision) in curves.items():
        axes.plot(ranks, precision, marker="o", markersize=3, label=method)
    axes.set(xlabel="number of returned items R", ylabel="precision", title=title, ylim=(0, 1.02))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def plot_pr_curves(
    curves: Mapping[str, PRCurve], path: str | Path, title: str = "Precision-recall"
) -> Path:
    """One precision-recall line per method ({method: PRCurve}); returns the PNG path."""
    figure = _new_figure(5.0, 4.0)
    _draw_pr(figure.add_subplot(), curves, title)
    return _save_figure(figure, path)


def plot_precision_at_r(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    title: str = "Precision@R",
) -> Path:
    """One precision@R line per method ({method: (ranks int (m,), precision float (m,))}),
    the paper's Fig. 3 right panel; returns the PNG path."""
    figure = _new_figure(5.0, 4.0)
    _draw_precision_at_r(figure.add_subplot(), curves, title)
    return _save_figure(figure, path)


def plot_retrieval_curves(
    pr: Mapping[str, PRCurve],
    at_r: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    title: str = "",
) -> Path:
    """The paper's Fig. 3 as one figure: precision-recall (left) and precision@R (right), one
    line per method in each (the arguments of :func:`plot_pr_curves` and
    :func:`plot_precision_at_r`); ``title`` heads both panels. Returns the PNG path."""
    figure = _new_figure(10.0, 4.0)
    left, right = figure.subplots(1, 2)
    _draw_pr(left, pr, "Precision-recall")
    _draw_precision_at_r(right, at_r, "Precision@R")
    if title:
        figure.suptitle(title)
    return _save_figure(figure, path)


def plot_tsne(
    features_by_bits: Mapping[int, np.ndarray],
    labels: np.ndarray,
    path: str | Path,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    max_points: int = 2000,
    perplexity: float = 30.0,
) -> Path:
    """t-SNE of quantized features at several code lengths (the paper's Fig. 1), one panel each.

    Args:
        features_by_bits: {bits: float (n, D)} the same n items quantized at each length
            (e.g. reconstructions from the first l codebooks).
        labels: int (n,) class ids (multi-hot (n, C): coloured by the first label).
        path: PNG to write.
        seed: seed of the subsample and of t-SNE.
        class_names: legend names indexed by class id (default: the ids).
        max_points: at most this many items (the same random subset in every panel).
        perplexity: t-SNE perplexity.

    Returns:
        The PNG path.
    """
    from sklearn.manifold import TSNE

    if not features_by_bits:
        raise ValueError("no features to plot: give {bits: features} for at least one length.")
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels.argmax(axis=1)
    n = labels.shape[0]
    for bits, array in features_by_bits.items():
        if np.ndim(array) != 2 or np.shape(array)[0] != n:
            raise ValueError(
                f"features at {bits} bits must be (n, D) with n = {n} (one row per label); got "
                f"shape {np.shape(array)}."
            )
    rng = np.random.default_rng(seed)
    subset = np.sort(rng.choice(n, size=min(n, max_points), replace=False))
    classes = np.unique(labels[subset])
    colours = _class_colours(len(classes))

    panels = len(features_by_bits)
    columns = math.ceil(math.sqrt(panels))
    rows = math.ceil(panels / columns)
    figure = _new_figure(4.2 * columns + 1.6, 4.0 * rows)
    for panel, (bits, array) in enumerate(sorted(features_by_bits.items())):
        embedding = TSNE(
            n_components=2,
            init="pca",
            perplexity=min(perplexity, (subset.size - 1) / 3),
            random_state=seed,
        ).fit_transform(np.asarray(array, dtype=np.float32)[subset])
        axes = figure.add_subplot(rows, columns, panel + 1)
        for colour, cls in zip(colours, classes, strict=True):
            mask = labels[subset] == cls
            name = class_names[cls] if class_names is not None else str(cls)
            axes.scatter(*embedding[mask].T, s=4, color=colour, label=name, linewidths=0)
        axes.set_title(f"{bits} bits")
        axes.set_xticks([])
        axes.set_yticks([])
    handles, names = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside right center", markerscale=3, fontsize="small")
    return _save_figure(figure, path)


def _class_colours(count: int) -> list[Any]:
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        return [colormaps["tab20"](i) for i in range(count)]
    return [colormaps["turbo"](i / max(count - 1, 1)) for i in range(count)]


# --------------------------------------------------------------------------------- report


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    map_table: Mapping[str, Mapping[int, float]],
    timings: Mapping[str, Mapping[str, float | None]],
    figures: Mapping[str, str | Path],
    notes: str = "",
    method: str = "dpq",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``report.md`` and ``results.json`` into ``out_dir`` (atomically); returns the
    report.md path.

    Args:
        out_dir: report folder (created).
        title: heading of the report.
        map_table: {method: {bits: mAP}}.
        timings: {row: {column: value}} for :func:`timing_table` (e.g. training seconds,
            encoding ms per image, search ms per query).
        figures: {caption: PNG path}; paths inside ``out_dir`` are written relative to it.
        notes: free markdown text (setup, commands, caveats).
        method: the method compared against the others in the summary (default "dpq").
        extra: more JSON-ready data for results.json (e.g. Evaluation.to_dict()).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure_paths = {caption: _relative(Path(path), out_dir) for caption, path in figures.items()}
    sections = [f"# {title}", ""]
    sections += ["## mAP", "", format_map_table(map_table, markdown=True), ""]
    if method in map_table:
        sections += [margin_summary(map_table, method), ""]
    if timings:
        sections += ["## Time", "", timing_table(timings), ""]
    for caption, path in figure_paths.items():
        sections += [f"## {caption}", "", f"![{caption}]({path})", ""]
    if notes:
        sections += ["## Notes", "", notes.strip(), ""]
    payload = {
        "title": title,
        "map": {
            name: {str(bits): value for bits, value in row.items()}
            for name, row in map_table.items()
        },
        "timings": timings,
        "figures": figure_paths,
        "notes": notes,
        **(dict(extra) if extra else {}),
    }
    write_json_atomic(out_dir / "results.json", payload)
    return write_bytes_atomic(out_dir / "report.md", "\n".join(sections).encode())


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------- search results


def _label_values(labels: np.ndarray) -> list[Any]:
    """JSON-ready labels: ints for single labels, lists of positive columns for multi-hot."""
    if labels.ndim == 1:
        return [int(value) for value in labels]
    return [np.flatnonzero(row).tolist() for row in labels]


def format_search_results(
    index: Any,
    distances: np.ndarray,
    ids: np.ndarray,
    fmt: Literal["json", "csv"] = "json",
    query_ids: np.ndarray | None = None,
) -> str:
    """Text of search results (nq, k): JSON (one object per query with ids, distances and,
    when the index has labels, labels) or CSV (query,rank,id,distance[,label]); padding
    (-1) is left out. Multi-hot labels are lists of label indices ("1 5" in CSV).
    ``query_ids`` (nq,) names the queries (default 0..nq-1)."""
    if fmt not in ("json", "csv"):
        raise ValueError(f"format must be 'json' or 'csv'; got {fmt!r}.")
    names = np.arange(len(ids)) if query_ids is None else np.asarray(query_ids)
    labels = index.labels_of(ids) if index.labels is not None else None
    classes = index.metadata.get("classes")
    rows: list[dict[str, Any]] = []
    for q in range(len(ids)):
        keep = ids[q] >= 0
        row: dict[str, Any] = {
            "query": int(names[q]),
            "ids": ids[q][keep].tolist(),
            "distances": [float(f"{d:.7g}") for d in distances[q][keep]],
        }
        if labels is not None:
            row["labels"] = _label_values(labels[q][keep])
            if isinstance(classes, list):
                row["label_names"] = [
                    [str(classes[i]) for i in value]
                    if isinstance(value, list)
                    else str(classes[value])
                    for value in row["labels"]
                ]
        rows.append(row)
    if fmt == "json":
        return json.dumps({"results": rows}, indent=1) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["query", "rank", "id", "distance"] + (["label"] if labels is not None else []))
    for row in rows:
        for rank, (item, dist) in enumerate(zip(row["ids"], row["distances"], strict=True)):
            line: list[Any] = [row["query"], rank + 1, item, dist]
            if labels is not None:
                value = row["labels"][rank]
                line.append(" ".join(map(str, value)) if isinstance(value, list) else value)
            writer.writerow(line)
    return buffer.getvalue()
