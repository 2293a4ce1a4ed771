"""dpq.evaluate.results: an evaluation's table, reference row, timings and curves by method,
and the JSON-ready dicts of a run and of a trained model's evaluation."""

import json

import numpy as np

from dpq.evaluate.metrics import PRCurve
from dpq.evaluate.results import Evaluation, MethodResult, RetrievalEvaluation


def _result(method: str, bits: int, value: float, reference: bool = False, curve=False):
    pr = PRCurve(np.array([1, 2]), np.array([1.0, 0.5]), np.array([0.5, 1.0])) if curve else None
    at_r = {"ranks": [1, 2], "precision": [1.0, 0.5]} if curve else None
    return MethodResult(
        method, bits, value, None, 0.5, 2.0, 4, 10, reference=reference, pr=pr, precision_at=at_r
    )


def test_an_evaluation_tables_its_rows_and_keeps_the_reference_apart():
    evaluation = Evaluation(
        results=[
            _result("sign", 16, 0.6, curve=True),
            _result("pq", 16, 0.4),
            _result("pq", 32, 0.5),
            _result("float", 512, 0.7, reference=True),
        ],
        r=10,
        r_requested=None,
        fitted_on="train",
        n_queries=4,
        n_database=10,
    )
    assert evaluation.map_table() == {"sign": {16: 0.6}, "pq": {16: 0.4, 32: 0.5}}
    assert evaluation.float_reference() == 0.7
    assert evaluation.timings()["sign@16"] == {
        "fit_s": None,
        "encode_ms_per_item": 50.0,
        "search_ms_per_query": 500.0,
    }
    pr, at_r = evaluation.curves(16)
    assert list(pr) == list(at_r) == ["sign"] and at_r["sign"][1].tolist() == [1.0, 0.5]
    saved = json.loads(json.dumps(evaluation.to_dict()))
    assert saved["map"] == {"sign": {"16": 0.6}, "pq": {"16": 0.4, "32": 0.5}}
    assert saved["float_features_map"] == 0.7 and len(saved["results"]) == 4


def test_a_models_evaluation_says_its_method_and_search():
    evaluation = RetrievalEvaluation(
        map_by_bits={16: 0.6},
        r=10,
        float_map=None,
        query_accuracy=None,
        seconds={"encode": 0.1},
        num_queries=4,
        num_database=10,
        method="sign",
        search="Hamming distance",
    )
    saved = json.loads(json.dumps(evaluation.to_dict()))
    assert saved["method"] == "sign" and saved["search"] == "Hamming distance"
    assert saved["map"] == {"16": 0.6} and "details" not in saved
    assert RetrievalEvaluation({8: 0.5}, 10, None, None, {}, 4, 10).to_dict()["method"] == "dpq"
