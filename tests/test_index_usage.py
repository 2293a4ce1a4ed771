"""dpq.index.usage alone: code usage per level (codewords used, perplexity, distinct
prefixes) against counts done by hand, and the collapse warnings on healthy and collapsed
codes."""

from __future__ import annotations

import numpy as np
import pytest

from dpq.index import DPQIndex
from dpq.index.usage import MIN_DISTINCT_FRACTION, code_usage


def test_counts_per_level_and_prefix():
    codes = np.array([[0, 1], [0, 1], [1, 2], [2, 3], [3, 3], [3, 0]], np.uint8)
    usage = code_usage(codes, 4)
    first, second = usage.levels
    assert (first.codes_used, first.prefixes) == (4, 4)
    assert (second.codes_used, second.prefixes) == (4, 5)  # (0,1) twice
    p = np.array([2, 1, 1, 2]) / 6  # level 1: codes 0 and 3 twice, 1 and 2 once
    assert first.perplexity == pytest.approx(2 ** -(p * np.log2(p)).sum())
    assert usage.summary() == "distinct codes of 6 items: 2 bits 4, 4 bits 5"
    assert usage.to_json()["levels"][1] == {
        "level": 2, "codes_used": 4, "perplexity": round(second.perplexity, 2), "prefixes": 5
    }  # fmt: skip
    uniform = code_usage(np.arange(8, dtype=np.uint16).reshape(8, 1) % 4, 4)
    assert uniform.levels[0].perplexity == pytest.approx(4.0)


def test_healthy_codes_give_no_warning():
    rng = np.random.default_rng(0)
    random_codes = rng.integers(0, 256, (5000, 4)).astype(np.uint8)
    assert code_usage(random_codes, 256).warnings == []
    index = DPQIndex(rng.normal(size=(3, 16, 8)).astype(np.float32))  # greedy residual codes
    index.add_features(rng.normal(size=(2000, 8)).astype(np.float32))
    usage = code_usage(index.codes, 16)
    # untrained codebooks: 834 distinct full codes of 2,000 items (42 %), far above 10 %
    assert usage.warnings == [] and usage.levels[-1].prefixes > 4 * MIN_DISTINCT_FRACTION * 2000


def test_collapsed_codes_and_dead_levels_are_warned_about():
    rng = np.random.default_rng(1)
    few = rng.integers(0, 5, 54_000)  # the model: 5 first-level codes
    codes = np.stack([few, few, (few * 7) % 256, rng.integers(0, 3, 54_000)], 1)
    usage = code_usage(codes.astype(np.uint8), 256)
    full = usage.levels[-1].prefixes
    assert full < MIN_DISTINCT_FRACTION * 54_000
    collapsed = [w for w in usage.warnings if w.startswith("the codes have collapsed")]
    assert collapsed and f"only {full:,} distinct 32-bit codes" in collapsed[0]
    assert len(usage.warnings) == 1  # 5 first-level codes are no dead level: perplexity ~5
    constant = np.zeros((100, 3), np.uint8)
    constant[:, 0] = np.arange(100)
    constant[:, 2] = np.arange(100) % 7
    dead = code_usage(constant, 128)
    assert [w.split(" (")[0] for w in dead.warnings] == ["level 2 is nearly constant"]
    assert dead.report_lines()[1].startswith("warning: level 2 is nearly constant")


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="2-D array"):
        code_usage(np.zeros(5, np.uint8), 4)
    with pytest.raises(ValueError, match="beyond codebook_size 4"):
        code_usage(np.full((2, 2), 4, np.uint8), 4)
    with pytest.raises(TypeError, match="codebook_size must be an integer"):
        code_usage(np.zeros((2, 2), np.uint8), 4.0)
    empty = code_usage(np.zeros((0, 3), np.uint8), 4)
    assert empty.warnings == [] and empty.summary() == "code usage: the index is empty"
