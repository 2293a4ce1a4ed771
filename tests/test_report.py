"""dpq.evaluate.report: tables, figures, the report folder and the text of a model's results."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dpq.evaluate.metrics import PRCurve, pr_curve, precision_at
from dpq.evaluate.report import (
    format_map_table,
    format_mean_std,
    format_results_table,
    margin_summary,
    plot_pr_curves,
    plot_precision_at_r,
    plot_retrieval_curves,
    plot_tsne,
    results_row_markdown,
    timing_table,
    write_report,
)
from dpq.evaluate.results import RetrievalEvaluation

MAP_TABLE = {"dpq": {8: 0.81, 32: 0.83}, "pq": {8: 0.52, 16: 0.60, 32: 0.85}}


def _png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


# ---------------------------------------------------------------------------- tables


def test_format_map_table_text_and_markdown():
    text = format_map_table(MAP_TABLE)
    lines = text.splitlines()
    assert lines[0].split() == ["method", "8", "bits", "16", "bits", "32", "bits"]
    assert lines[1].split() == ["dpq", "0.810", "-", "0.830"]
    markdown = format_map_table(MAP_TABLE, markdown=True)
    assert "| dpq | **0.810** | - | 0.830 |" in markdown
    assert "| pq | 0.520 | **0.600** | **0.850** |" in markdown


def test_timing_table_union_of_columns_and_missing_values():
    table = timing_table({"pq@8": {"fit_s": 1.5}, "dpq@8": {"search_ms_per_query": 0.25}})
    assert table.splitlines()[0] == "|  | fit_s | search_ms_per_query |"
    assert "| dpq@8 | - | 0.25 |" in table


def test_margin_summary_says_plainly_when_dpq_does_not_win():
    summary = margin_summary(MAP_TABLE)
    assert summary.startswith("dpq does NOT beat every baseline: it wins at 1 of 2")
    assert "8 bits: dpq 0.810 beats the best other method (pq, 0.520): +0.290" in summary
    assert "32 bits: dpq 0.830 trails the best other method (pq, 0.850): -0.020" in summary
    winning = margin_summary({"dpq": {8: 0.9}, "lsh": {8: 0.2}})
    assert winning.startswith("dpq beats every baseline at every code length")


# ---------------------------------------------------------------------------- files


def test_plot_curves_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    db_labels, query_labels = rng.integers(0, 3, 60), rng.integers(0, 3, 5)
    ranking = np.argsort(rng.random((5, 60)), axis=1)
    curves = {
        "a": pr_curve(ranking, query_labels, db_labels),
        "b": pr_curve(ranking[::-1], query_labels, db_labels),
    }
    assert _png_size(plot_pr_curves(curves, tmp_path / "pr.png")) == (600, 480)
    ranks = np.array([10, 20, 40])
    at_r = {"a": (ranks, precision_at(ranking, query_labels, db_labels, ranks))}
    assert _png_size(plot_precision_at_r(at_r, tmp_path / "sub" / "p_at_r.png"))[0] == 600
    with pytest.raises(ValueError, match="at least one"):
        plot_pr_curves({}, tmp_path / "empty.png")


def test_plot_retrieval_curves_is_one_figure_of_two_panels(tmp_path):
    rng = np.random.default_rng(1)
    db_labels, query_labels = rng.integers(0, 3, 60), rng.integers(0, 3, 5)
    ranking = np.argsort(rng.random((5, 60)), axis=1)
    pr = {"a": pr_curve(ranking, query_labels, db_labels)}
    ranks = np.array([10, 20, 40])
    at_r = {"a": (ranks, precision_at(ranking, query_labels, db_labels, ranks))}
    path = plot_retrieval_curves(pr, at_r, tmp_path / "fig3.png", title="32 bits")
    assert _png_size(path) == (1200, 480)  # two 5 x 4 inch panels side by side, 120 dpi
    with pytest.raises(ValueError, match="precision@R"):
        plot_retrieval_curves(pr, {}, tmp_path / "half.png")
    assert not (tmp_path / "half.png").exists()


def test_plot_tsne_grid(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    base = rng.normal(size=(3, 8))[labels] * 4 + rng.normal(size=(60, 8))
    features = {8: base.round(0), 16: base.round(1), 24: base, 32: base}
    path = plot_tsne(features, labels, tmp_path / "tsne.png", class_names=["cat", "dog", "frog"])
    width, height = _png_size(path)
    assert width > height  # 2 x 2 panels plus a legend column
    with pytest.raises(ValueError, match="one row per label"):
        plot_tsne({8: base[:10]}, labels, tmp_path / "bad.png")


def test_write_report_folder(tmp_path):
    curve = PRCurve(np.array([1, 2]), np.array([1.0, 0.5]), np.array([0.5, 1.0]))
    figure = plot_pr_curves({"dpq": curve}, tmp_path / "report" / "pr.png")
    report = write_report(
        tmp_path / "report",
        title="CIFAR-10",
        map_table=MAP_TABLE,
        timings={"dpq": {"train_s": 12.0, "encode_ms_per_image": 0.5}},
        figures={"Precision-recall, 32 bits": figure},
        notes="Seed 0.",
    )
    text = report.read_text()
    assert text.startswith("# CIFAR-10")
    assert "![Precision-recall, 32 bits](pr.png)" in text
    assert "does NOT beat every baseline" in text and "Seed 0." in text
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["map"]["dpq"] == {"8": 0.81, "32": 0.83}
    assert results["figures"] == {"Precision-recall, 32 bits": "pr.png"}


def test_a_models_results_as_text_and_as_a_markdown_row():
    evaluation = RetrievalEvaluation(
        map_by_bits={8: 0.71, 16: 0.725},
        r=500,
        float_map=0.73,
        query_accuracy=0.8,
        seconds={},
        num_queries=10,
        num_database=500,
        database_accuracy=None,
        class_probability_map=0.6,
    )
    text = format_results_table(evaluation, title="run").splitlines()
    assert text[:4] == ["run", "      code  mAP@500", "     8 bit  0.7100", "    16 bit  0.7250"]
    assert "query accuracy 0.8000" in text and not any("database" in line for line in text)
    header, separator, row = results_row_markdown(
        "full", 3, {"train": 120.0, "total": 300.0}, evaluation
    ).splitlines()
    assert header.count("|") == separator.count("|") == row.count("|")
    assert row == "| full | 3 | 2.0 | 5.0 | 0.7100 | 0.7250 | 0.7300 | 0.8000 |  | 0.6000 |"


def test_format_mean_std_gives_the_sample_spread_and_one_value_alone():
    assert format_mean_std([0.5, 0.7]) == "0.6000 ± 0.1414"
    assert format_mean_std([0.61234]) == "0.6123"
