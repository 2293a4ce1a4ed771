"""dpq.methods.per_length: a method's settings read over their defaults, each checked with one
sentence; the code length of a method trained per length."""

import pytest

from conftest import feature_config
from dpq.methods.per_length import Option, PerLengthMethod, check_code_bits, read_options

KNOWN = {
    "weight": Option(1e-4),
    "scale": Option(1.0, strict=True),
    "every": Option(200, minimum=1, integer=True),
}


def test_defaults_fill_what_is_not_given_and_types_follow_the_option():
    values = read_options("x", {"weight": 2, "every": 50.0}, KNOWN)
    assert values == {"weight": 2.0, "scale": 1.0, "every": 50}
    assert isinstance(values["weight"], float) and isinstance(values["every"], int)
    assert read_options("x", {}, KNOWN) == {"weight": 1e-4, "scale": 1.0, "every": 200}


@pytest.mark.parametrize(
    "given, message",
    [
        (
            {"wieght": 1},
            r"method.options \['wieght'\] are not settings of the x method; it knows "
            r"\['every', 'scale', 'weight'\]",
        ),
        ({"weight": "big"}, "weight must be a number for the x method; got 'big'"),
        ({"weight": True}, "weight must be a number for the x method; got True"),
        ({"weight": -1}, "weight must be >= 0 for the x method; got -1"),
        ({"scale": 0}, "scale must be > 0 for the x method; got 0"),
        ({"every": 2.5}, "every must be a whole number for the x method; got 2.5"),
        ({"every": 0}, "every must be >= 1 for the x method; got 0"),
    ],
)
def test_bad_settings_are_refused_with_one_sentence(given, message):
    with pytest.raises(ValueError, match=message):
        read_options("x", given, KNOWN)


def test_code_bits_must_be_a_multiple_of_eight():
    assert check_code_bits("x", 24) == 24
    for bits in (None, 12):
        with pytest.raises(
            ValueError,
            match=f"the x method needs method.bits, a multiple of 8 "
            rf"\(e.g. 32\); got {bits}",
        ):
            check_code_bits("x", bits)


class _Plain(PerLengthMethod):
    name = "plain"

    def option_table(self):
        return {"weight": Option(0.5)}

    build_loss = forward_loss = encode = new_index = load_index = search = None


def test_a_per_length_method_reads_its_bits_and_options():
    config = feature_config().replace(method={"name": "plain", "bits": 24})
    method = _Plain(config)
    assert method.bits == 24 and method.code_lengths() == (24,)
    assert method.options == {"lr_scale": 1.0, "weight": 0.5} and method.network_lr_scale() == 1
    scaled = _Plain(config.replace(method={"options": {"lr_scale": 3, "weight": 0}}))
    assert scaled.network_lr_scale() == 3.0 and scaled.options["weight"] == 0.0
    with pytest.raises(ValueError, match="the plain method needs method.bits"):
        _Plain(config.replace(method={"bits": None}))
    with pytest.raises(ValueError, match="lr_scale must be > 0 for the plain method"):
        _Plain(config.replace(method={"options": {"lr_scale": 0}}))
