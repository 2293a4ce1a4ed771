"""dpq.field_checks: good values pass silently; a bad one raises ValueError naming
<owner>.<name>, what is accepted and what was given."""

import math

import pytest

from dpq.field_checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_mapping,
    check_text,
    checked_numbers,
)


def test_good_values_pass() -> None:
    check_choice("s", "mode", "a", ("a", "b"))
    check_int("s", "n", 3, 1)
    check_int("s", "n", 30, 0, 30)
    check_float("s", "x", 0, 0.0)
    check_float("s", "x", 0.5, 0.0, 1.0, strict_minimum=True, strict_maximum=True)
    check_bool("s", "flag", False)
    check_text("s", "name", "resnet9")
    check_mapping("s", "kwargs", {}, "keyword arguments")
    assert checked_numbers("s", "w", [1, 0.5], "weights") == (1.0, 0.5)
    assert all(type(v) is float for v in checked_numbers("s", "w", (1, 2, 3), "rgb", 3))


@pytest.mark.parametrize(
    ("check", "message"),
    [
        (
            lambda: check_choice("s", "mode", "c", ("a", "b")),
            "s.mode must be one of 'a', 'b'; got 'c'.",
        ),
        (lambda: check_int("s", "n", 0, 1), "s.n must be an integer >= 1; got 0."),
        (lambda: check_int("s", "n", True, 0), "s.n must be an integer >= 0; got True."),
        (lambda: check_int("s", "n", 2.0, 0), "s.n must be an integer >= 0; got 2.0."),
        (lambda: check_int("s", "n", 31, 0, 30), "s.n must be an integer in 0..30; got 31."),
        (lambda: check_float("s", "x", -1), "s.x must be a finite number >= 0.0; got -1."),
        (lambda: check_float("s", "x", math.nan), "s.x must be a finite number >= 0.0; got nan."),
        (lambda: check_float("s", "x", "1"), "s.x must be a finite number >= 0.0; got '1'."),
        (lambda: check_float("s", "x", False), "s.x must be a finite number >= 0.0; got False."),
        (
            lambda: check_float("s", "x", 0.0, 0.0, strict_minimum=True),
            "s.x must be a finite number > 0.0; got 0.0.",
        ),
        (
            lambda: check_float("s", "x", 1.0, 0.0, 1.0, strict_maximum=True),
            "s.x must be a finite number >= 0.0 and < 1.0; got 1.0.",
        ),
        (
            lambda: check_float("s", "x", 1.5, 0.0, 1.0),
            "s.x must be a finite number >= 0.0 and <= 1.0; got 1.5.",
        ),
        (lambda: check_bool("s", "flag", 1), "s.flag must be true or false; got 1."),
        (lambda: check_text("s", "name", ""), "s.name must be a non-empty name; got ''."),
        (lambda: check_text("s", "path", 3, "a file path"), "s.path must be a file path; got 3."),
        (
            lambda: check_mapping("s", "kwargs", [1], "settings"),
            "s.kwargs must be a mapping of settings; got list.",
        ),
        (lambda: checked_numbers("s", "w", [], "weights"), r"s.w must be weights; got []."),
        (
            lambda: checked_numbers("s", "rgb", [1, 1], "three", 3),
            "s.rgb must be three; got [1, 1].",
        ),
        (
            lambda: checked_numbers("s", "rgb", [0.5, 2], "two", 2, maximum=1.0),
            "s.rgb must be a finite number >= 0.0 and <= 1.0; got 2.",
        ),
    ],
)
def test_bad_values_name_the_field_the_rule_and_the_value(check, message) -> None:
    with pytest.raises(ValueError) as info:
        check()
    assert str(info.value) == message
