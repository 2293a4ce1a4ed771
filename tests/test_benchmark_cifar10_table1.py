"""benchmarks/cifar10_table1.py: how a tuning record picks each method's setting (collapse
guard, ties, defaults) and how a setting names its run. The training itself is the library's
(tested in the training and methods tests); the table is never run by CI."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cifar10_table1.py"


@pytest.fixture(scope="module")
def table1():
    spec = importlib.util.spec_from_file_location("cifar10_table1", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["cifar10_table1"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("cifar10_table1", None)


def _tune_row(method, setting, score, ties=0.1889):
    return {
        "phase": "tune",
        "method": method,
        "setting": json.dumps(setting, sort_keys=True),
        "validation_map": score,
        "all_ties_map": ties,
    }


def test_every_grid_starts_at_the_methods_defaults(table1):
    for method in table1.METHODS:
        grid = table1.tuning_settings(method)
        assert 1 < len(grid) <= 6
        assert table1.canonical_setting(method, grid[0]) is None, method


def test_canonical_setting_drops_defaults_and_keeps_the_rest(table1):
    assert table1.canonical_setting("dqn", {"lr_factor": 1.0, "quantization_weight": 1e-4}) is None
    assert table1.canonical_setting("dqn", {"lr_factor": 3.0, "quantization_weight": 1e-4}) == {
        "lr_factor": 3.0
    }
    assert table1.canonical_setting("dpq", {"lr_factor": 1.0, "loss.tau": 0.01}) == {
        "loss.tau": 0.01
    }
    assert table1.canonical_setting("dsh", None) is None


def test_collapsed_runs_are_never_chosen(table1):
    rows = [
        _tune_row("dhn", {"lr_factor": 3.0, "quantization_weight": 0.1}, 0.1889),  # one code
        _tune_row("dhn", {"lr_factor": 1.0, "quantization_weight": 1.0}, 0.1703),
        _tune_row("dhn", {"lr_factor": 1.0, "quantization_weight": 0.1}, 0.1659),
    ]
    assert table1.is_collapsed(rows[0]) and not table1.is_collapsed(rows[1])
    assert table1.chosen_settings(rows) == {"dhn": {"quantization_weight": 1.0}}


def test_ties_go_to_the_earlier_grid_setting_and_old_grids_do_not_compete(table1):
    rows = [
        _tune_row("hashnet", {"lr_factor": 1.0, "gamma": 0.5}, 0.16380),
        _tune_row("hashnet", {"lr_factor": 1.0, "gamma": 0.005}, 0.16375),  # tie: default wins
        _tune_row("hashnet", {"lr_factor": 1.0, "gamma": 1.0}, 0.9),  # not in the grid
        _tune_row("csq", {"lr_factor": 0.3, "quantization_weight": 1e-4}, 0.2573),
        _tune_row("csq", {"lr_factor": 0.3, "quantization_weight": 1e-2}, 0.2585),
    ]
    chosen = table1.chosen_settings(rows)
    assert chosen["hashnet"] is None
    assert chosen["csq"] == {"lr_factor": 0.3, "quantization_weight": 0.01}
    assert "dpq" not in chosen  # never tuned: the table runs it at its defaults


def test_a_setting_names_its_own_run_directory(table1):
    assert table1.setting_tag(None) == ""
    assert table1.setting_tag({"quantization_weight": 0.01, "lr_factor": 0.3}) == (
        "-lr_factor=0.3-quantization_weight=0.01"
    )


def test_all_ties_map_is_the_map_of_one_code_for_every_item(table1):
    labels = np.repeat(np.arange(10), 600)
    source = SimpleNamespace(labels=labels, classes=[str(c) for c in range(10)])
    split = table1._validation_split(source, 0)
    query, database = labels[split.query], labels[split.database]
    relevant = database[None, :] == query[:, None]  # database order is the all-ties ranking
    hits = np.cumsum(relevant, axis=1)
    precision = hits / np.arange(1, len(database) + 1)
    expected = float(np.mean((precision * relevant).sum(1) / relevant.sum(1)))
    assert len(split.query) == 1000 and len(split.database) == 4000
    assert table1.all_ties_map(source) == pytest.approx(expected, abs=1e-12)


def test_training_time_ignores_epochs_slowed_by_other_jobs(table1, tmp_path):
    seconds = [12.0] * 18 + [300.0, 500.0]  # two epochs stopped while something else ran
    log = "\n".join(json.dumps({"epoch": e + 1, "seconds": s}) for e, s in enumerate(seconds))
    (tmp_path / "train_log.jsonl").write_text(log + "\n")
    row = {"run_dir": str(tmp_path), "epochs": 20, "train_seconds": sum(seconds)}
    assert table1._training_seconds(row) == pytest.approx(240.0)
    row["epochs"] = 21  # an incomplete log: the recorded wall time
    assert table1._training_seconds(row) == sum(seconds)


def test_quiet_seconds_outlive_the_run_folder(table1, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    seconds = [10.0] * 19 + [900.0]
    log = "\n".join(json.dumps({"epoch": e + 1, "seconds": s}) for e, s in enumerate(seconds))
    (run / "train_log.jsonl").write_text(log + "\n")
    row = _table_row("dsh", 0, 32, {32: 0.3}, sum(seconds))
    row.update(run_dir=str(run), epochs=20, resumed_from_epoch=0)
    table1.write_outputs([row], tmp_path / "table1.json", tuning=[])
    (run / "train_log.jsonl").unlink()  # the run folder is gone; the row remembers
    stored = json.loads((tmp_path / "table1.json").read_text())[0]
    assert stored["train_seconds_quiet"] == pytest.approx(200.0)
    assert table1._training_seconds(stored) == pytest.approx(200.0)
    del row["train_seconds_quiet"]  # a row written before rows stored it, its log gone:
    resumed = dict(row, resumed_from_epoch=12, train_seconds=90.0)  # wall of its last call only
    assert table1._training_seconds(resumed) is None
    assert table1._training_seconds(dict(row, train_seconds=250.0)) == 250.0  # one call: wall


def _table_row(method, seed, bits_trained, maps, seconds):
    """A results row; ``seconds`` None: a resumed run whose log is gone."""
    return {
        "phase": "table",
        "method": method,
        "setting": "null",
        "split_seed": seed,
        "bits_trained": bits_trained,
        "map": {str(b): v for b, v in maps.items()},
        "train_seconds": 60.0 if seconds is None else seconds,
        "resumed_from_epoch": 5 if seconds is None else 0,
    }


def _table_line(text, method):
    return next(line for line in text.splitlines() if line.startswith(f"| {method} |"))


def test_table_time_sums_each_lengths_fastest_seed_and_pairs_only_shared_seeds(table1):
    dpq = {b: 0.60 for b in table1.ALL_BITS}
    rows = [
        _table_row("dpq", 0, "all", dpq, 200.0),
        _table_row("dpq", 1, "all", {b: 0.62 for b in table1.ALL_BITS}, 220.0),
        *(_table_row("dsh", 0, b, {b: 0.30}, 100.0 * b) for b in table1.ALL_BITS),
        _table_row("dsh", 1, 16, {16: 0.32}, 1500.0),  # seed 1 has run 16 bits only so far
        _table_row("dsh", 1, 32, {32: 0.31}, None),  # resumed, its log gone: time unknown
    ]
    text = table1.markdown(rows, chosen={})
    main_dpq, main_dsh = _table_line(text, "dpq"), _table_line(text, "dsh")
    assert "| 200 |" in main_dpq  # one training for all lengths: its fastest seed
    # 8 + 24 + 32 bits from seed 0, 16 bits the faster of both seeds: 800+1500+2400+3200
    assert "| 7900 |" in main_dsh and "bits only" not in main_dsh
    assert "0.3050 ± 0.0071" in main_dsh  # the unknown time keeps the run's mAP in the table
    paired = text.split("Paired differences")[1]
    cells = _table_line(paired, "dsh").split("|")[2:-1]
    assert "n=1" in cells[0] and "one seed" in cells[0]  # 8 bits: seed 0 only
    assert "ahead, n=2" in cells[1]  # 16 bits: 0.30 and 0.28 ahead
    rows.pop(2)  # no 8-bit run at all: the total says which lengths it covers
    assert "(16+24+32 bits only)" in _table_line(table1.markdown(rows, chosen={}), "dsh")


def test_outputs_are_the_table_and_one_two_panel_figure(table1, tmp_path):
    curves = {
        "pr": {"cutoffs": [1, 2, 3], "precision": [1.0, 0.6, 0.5], "recall": [0.2, 0.6, 1.0]},
        "precision_at": {"ranks": [10, 20], "precision": [0.7, 0.6]},
    }
    rows = [
        _table_row("dpq", 0, "all", {b: 0.6 for b in table1.ALL_BITS}, 200.0),
        _table_row("dsh", 0, 32, {32: 0.3}, 100.0),
    ]
    for row in rows:
        row["curves_32"] = curves
    results = tmp_path / "table1.json"
    table1.write_outputs(rows, results, tuning=[])
    assert json.loads(results.read_text()) == rows
    assert _table_line(results.with_suffix(".md").read_text(), "dsh")
    figures = sorted(path.name for path in tmp_path.glob("*.png"))
    assert figures == ["table1_curves_32bits.png"]  # P-R and precision@R in one figure
    with Image.open(tmp_path / figures[0]) as image:
        assert image.size == (1200, 480)
    assert table1.figure([_table_row("dsh", 0, 16, {16: 0.3}, 1.0)], tmp_path) == []
