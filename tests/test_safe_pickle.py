"""dpq.data.safe_pickle: plain data comes back as pickle.loads gives it; anything that would
import or call something is refused without being run; broken streams are refused."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import RunsCode, py2_cifar_batch, py2_string
from dpq.data.safe_pickle import RejectedPickleError, parse_pickle_safely


def test_parser_matches_pickle_without_unpickling() -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    labels = [7, 0, 9]
    official_style = py2_cifar_batch(data, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core alias
        trusted = pickle.loads(official_style, encoding="bytes")  # our own bytes: safe here
    np.testing.assert_array_equal(trusted[b"data"], data)
    for blob in (
        official_style,
        pickle.dumps({b"data": data, b"labels": labels}, protocol=2),
        pickle.dumps({b"data": data, b"labels": labels}, protocol=4),
    ):
        parsed = parse_pickle_safely(blob)
        np.testing.assert_array_equal(parsed[b"data"], data)
        assert parsed[b"labels"] == labels


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_plain_values_come_back_as_pickle_gives_them(protocol: int) -> None:
    shared = [1, 2]
    value = {
        "text": "héllo",
        "bytes": b"\x00\xff",
        "numbers": (0, -1, 255, 65536, 2**40, -(2**70), 1.5),
        "flags": [True, False, None],
        "nested": {"same": shared, "again": shared, "empty": ((), [], {})},
        "floats": np.arange(6, dtype=np.float32).reshape(2, 3),
        "fortran": np.asfortranarray(np.arange(6, dtype=">i4").reshape(3, 2)),
    }
    parsed = parse_pickle_safely(pickle.dumps(value, protocol=protocol))
    assert set(parsed) == set(value)
    for key in ("text", "bytes", "numbers", "flags", "nested"):
        assert parsed[key] == value[key]
    for key in ("floats", "fortran"):
        assert parsed[key].dtype == value[key].dtype
        np.testing.assert_array_equal(parsed[key], value[key])


def test_python2_strings_come_back_as_bytes() -> None:
    blob = b"\x80\x02]" + b"(" + py2_string(b"abc") + py2_string(b"x" * 300) + b"e."
    assert parse_pickle_safely(blob) == [b"abc", b"x" * 300]


def test_code_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "was-run"
    blob = pickle.dumps({b"data": RunsCode(marker), b"labels": [1]}, protocol=2)
    with pytest.raises(RejectedPickleError, match="refusing") as info:
        parse_pickle_safely(blob, "evil.pkl")
    assert str(info.value).startswith(
        "evil.pkl: "
    ) and "system, which plain data never needs" in str(info.value)
    assert not marker.exists()
    assert isinstance(info.value, ValueError)


class _ArraySubclass(np.ndarray):
    pass


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({1, 2}, "opcode EMPTY_SET"),
        (np.array(["a", "b"]), "dtype 'U1' is not allowed"),
        (np.zeros(2).view(_ArraySubclass), "only plain numpy arrays"),
        (np.ma.masked_array([1, 2]), "numpy.ma.core._mareconstruct"),
        (Path("x"), "refusing"),
    ],
)
def test_anything_but_plain_data_is_refused(value: object, match: str) -> None:
    with pytest.raises(RejectedPickleError, match=match):
        parse_pickle_safely(pickle.dumps(value, protocol=4))


def test_broken_streams_are_refused() -> None:
    whole = py2_cifar_batch(np.zeros((1, 3072), np.uint8), [0])
    with pytest.raises(RejectedPickleError, match="corrupt|malformed"):
        parse_pickle_safely(whole[:-40], "cut")
    with pytest.raises(RejectedPickleError, match="malformed"):
        parse_pickle_safely(b"")
    four_bytes = pickle.dumps(np.zeros(4, np.uint8), protocol=2)
    assert four_bytes.count(b"K\x04\x85") == 1  # the shape (4,)
    with pytest.raises(RejectedPickleError, match="array data has 4 bytes, shape \\(5,\\)"):
        parse_pickle_safely(four_bytes.replace(b"K\x04\x85", b"K\x05\x85"))
