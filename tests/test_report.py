"""dpq.report tables, figures and report folder; dpq.baselines.evaluation and `dpq evaluate`."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from PIL import Image

from dpq.baselines import evaluation as evaluation_module
from dpq.baselines import make_baseline
from dpq.baselines.evaluation import FeatureSet, evaluate_methods, parse_bits, parse_methods
from dpq.cli import main
from dpq.metrics import PRCurve, map_at_r, pr_curve, precision_at
from dpq.report import (
    format_map_table,
    margin_summary,
    plot_pr_curves,
    plot_precision_at_r,
    plot_tsne,
    timing_table,
    write_json,
    write_report,
)

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


def test_write_json_is_atomic_and_refuses_nan(tmp_path):
    path = write_json(tmp_path / "out.json", {"a": np.float32(0.5), "b": np.arange(3)})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2]}
    with pytest.raises(ValueError):
        write_json(path, {"a": float("nan")})
    assert json.loads(path.read_text())["a"] == 0.5  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp file left


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


# ---------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def feature_dir(tmp_path_factory):
    """Clustered 16-d features saved as .npy, plus a DPQ-format index of the database
    (codebooks from faiss residual quantization, 2 levels of 8 bits)."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0.0, 3.0, (5, 16))
    labels = rng.integers(0, 5, 900)
    features = (centers[labels] + rng.normal(0.0, 1.5, (900, 16))).astype(np.float32)
    directory = tmp_path_factory.mktemp("features")
    parts = {"query": slice(0, 30), "db": slice(30, 900), "train": slice(30, 630)}
    for part, rows in parts.items():
        np.save(directory / f"{part}_features.npy", features[rows])
        np.save(directory / f"{part}_labels.npy", labels[rows])
    from dpq.index import DPQIndex

    quantizer = faiss.IndexResidualQuantizer(16, 2, 8)
    quantizer.train(features[parts["train"]])
    quantizer.add(features[parts["db"]])
    DPQIndex.from_faiss(quantizer).save(directory / "index.npz")
    return directory


def test_evaluate_methods_matches_direct_computation(feature_dir, monkeypatch):
    monkeypatch.setattr(evaluation_module, "_RESULT_ELEMENTS", 7 * 870)  # 7 queries per batch
    features = FeatureSet.from_directory(feature_dir)
    result = evaluate_methods(
        features,
        ["dpq", "pq", "lsh", "float"],
        bits=[8, 16],
        dpq_index=feature_dir / "index.npz",
        curve_bits=[16],
        precision_ranks=[10, 50, 5000],
        progress=False,
    )
    table = result.map_table()
    assert list(table) == ["dpq", "pq", "lsh"] and all(
        set(row) == {8, 16} for row in table.values()
    )
    assert result.fitted_on == "train" and result.r == 870 and result.notes == []
    assert 0.0 <= result.float_reference() <= 1.0

    # the batched evaluation equals one direct search + map_at_r
    pq = make_baseline("pq", 16, seed=0).fit(features.train_features)
    pq.add(features.db_features)
    _, ids = pq.search(features.query_features, 870)
    assert table["pq"][16] == pytest.approx(
        map_at_r(ids, features.query_labels, features.db_labels)
    )
    pr, at_r = result.curves(16)
    direct = pr_curve(ids, features.query_labels, features.db_labels, cutoffs=pr["pq"].cutoffs)
    np.testing.assert_allclose(pr["pq"].precision, direct.precision)
    np.testing.assert_allclose(pr["pq"].recall, direct.recall)
    ranks, precision = at_r["pq"]
    np.testing.assert_array_equal(ranks, [10, 50])  # 5000 > R was dropped
    np.testing.assert_allclose(
        precision, precision_at(ids, features.query_labels, features.db_labels, [10, 50])
    )

    from dpq.index import DPQIndex

    index = DPQIndex.load(feature_dir / "index.npz")
    _, ids = index.search(features.query_features, 870, num_levels=1)
    assert table["dpq"][8] == pytest.approx(
        map_at_r(ids, features.query_labels, features.db_labels)
    )
    assert json.loads(json.dumps(result.to_dict()))["map"]["dpq"]["8"] == table["dpq"][8]


def test_inner_product_metric_ranks_float_and_quantizers_by_inner_product(feature_dir):
    from dataclasses import replace

    from dpq.index import DPQIndex

    l2 = FeatureSet.from_directory(feature_dir)
    ip = replace(l2, metric="ip")
    index = DPQIndex.load(feature_dir / "index.npz")
    index.search_mode = "ip"
    result = evaluate_methods(
        ip, ["dpq", "pq", "lsh", "float"], bits=[16], dpq_index=index, progress=False
    )
    table = result.map_table()

    def ip_map(database: np.ndarray) -> float:
        scores = ip.query_features @ database.T
        ids = np.argsort(-scores, axis=1, kind="stable")  # ties by id
        return map_at_r(ids, ip.query_labels, ip.db_labels)

    assert result.float_reference() == pytest.approx(ip_map(ip.db_features), abs=1e-6)
    pq = make_baseline("pq", 16, seed=0).fit(ip.train_features)
    assert table["pq"][16] == pytest.approx(ip_map(pq.decode(pq.encode(ip.db_features))), abs=1e-6)
    assert table["dpq"][16] == pytest.approx(ip_map(index.decode(index.codes)), abs=1e-6)
    # hashing ranks by Hamming distance whatever the metric
    hamming = evaluate_methods(l2, ["lsh"], bits=[16], progress=False).map_table()
    assert table["lsh"][16] == hamming["lsh"][16]
    # on these clustered (not normalised) features the two metrics rank differently
    assert result.float_reference() != pytest.approx(
        evaluate_methods(l2, ["float"], progress=False).float_reference()
    )
    with pytest.raises(ValueError, match="metric must be one of"):
        replace(l2, metric="cosine")


def test_evaluate_r_clamped_and_fit_on_database_noted(feature_dir):
    features = FeatureSet.from_directory(feature_dir)
    database_only = FeatureSet(
        query_features=features.query_features,
        query_labels=features.query_labels,
        db_features=features.db_features,
        db_labels=features.db_labels,
    )
    result = evaluate_methods(database_only, ["lsh"], bits=[8], r=10_000, progress=False)
    assert result.r == 870 and result.r_requested == 10_000
    assert any("larger than the database" in note for note in result.notes)
    assert any("fitted on the database" in note for note in result.notes)


def test_parse_methods_and_bits():
    assert parse_methods("all") == ["pq", "opq", "rq", "lsq", "itq", "itq-cca", "lsh"]
    assert parse_methods("pq, itq,pq") == ["pq", "itq"]
    assert parse_methods(None) == []
    assert parse_bits("8,16") == [8, 16]
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("pq,sh")
    with pytest.raises(ValueError, match="integers"):
        parse_bits("8,x")


def _cli_args(directory, *extra):
    return [
        "evaluate",
        "--query-features", str(directory / "query_features.npy"),
        "--query-labels", str(directory / "query_labels.npy"),
        "--db-features", str(directory / "db_features.npy"),
        "--db-labels", str(directory / "db_labels.npy"),
        "--no-progress",
        *extra,
    ]  # fmt: skip


def test_cli_evaluate_prints_table_and_writes_json(feature_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    code = main(
        _cli_args(
            feature_dir,
            "--method",
            "dpq",
            "--index",
            str(feature_dir / "index.npz"),
            "--baselines",
            "pq,itq-cca",
            "--bits",
            "8,16",
            "--float-reference",
            "--out",
            str(out),
        )  # fmt: skip
    )
    captured = capsys.readouterr()
    assert code == 0
    lines = captured.out.splitlines()
    assert lines[0] == "mAP@870 over 30 queries, 870 items"
    assert [line.split()[0] for line in lines[2:5]] == ["dpq", "pq", "itq-cca"]
    assert "fitted on the database" in captured.err  # no --train-features given
    saved = json.loads(out.read_text())
    assert set(saved["map"]) == {"dpq", "pq", "itq-cca"} and saved["float_features_map"] > 0
    assert {r["method"] for r in saved["results"]} == {"dpq", "pq", "itq-cca", "float"}


def test_cli_evaluate_follows_an_inner_product_index(feature_dir, tmp_path, capsys):
    from dpq.index import DPQIndex

    index = DPQIndex.load(feature_dir / "index.npz")
    index.search_mode = "ip"
    ip_index = index.save(tmp_path / "ip.npz")

    def float_search(*extra: str) -> str:
        out = tmp_path / "results.json"
        args = ["--method", "dpq", "--bits", "8", "--float-reference", "--out", str(out)]
        assert main(_cli_args(feature_dir, *args, *extra)) == 0
        results = json.loads(out.read_text())["results"]
        return next(r["settings"]["search"] for r in results if r["method"] == "float")

    assert float_search("--index", str(ip_index)) == "exhaustive inner product on float32 features"
    l2 = float_search("--index", str(ip_index), "--metric", "l2")
    assert l2 == "exhaustive squared L2 on float32 features"
    assert float_search("--index", str(feature_dir / "index.npz")) == l2
    capsys.readouterr()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "dpq"], "needs a DPQ index"),
        (["--baselines", "pq,sh"], "unknown method"),
        ([], "no method to evaluate"),
        (["--method", "lsh", "--bits", "8,0"], "positive integers"),
        (["--method", "dpq", "--index", "INDEX", "--bits", "12"], "not one of them"),
        (
            ["--method", "lsh", "--db-labels", "QUERY_LABELS"],
            "870 rows but database labels have 30",
        ),
        (["--method", "lsh", "--train-features", "TRAIN"], "together"),
        (["--method", "lsh", "--query-features", "MISSING"], "not found"),
    ],
)
def test_cli_evaluate_bad_input_exits_2(feature_dir, capsys, extra, message):
    replace = {
        "INDEX": str(feature_dir / "index.npz"),
        "QUERY_LABELS": str(feature_dir / "query_labels.npy"),
        "TRAIN": str(feature_dir / "train_features.npy"),
        "MISSING": str(feature_dir / "missing.npy"),
    }
    code = main(_cli_args(feature_dir, *[replace.get(arg, arg) for arg in extra]))
    assert code == 2
    assert message in capsys.readouterr().err
