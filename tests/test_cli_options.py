"""dpq.cli.options: the option groups commands share, the help with defaults, the command
list of `dpq --help`, and the old spelling of each unified flag still working."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from dpq.cli import COMMANDS, build_parser, main
from dpq.cli.options import (
    HelpFormatter,
    add_command,
    check_out,
    hidden_alias,
    image_flags_given,
    load_model,
    missing_flags,
    parse_bits,
    parse_methods,
    read_source,
    say,
    source_options,
)
from dpq.data import Split, load_source, split_per_class

COMMAND_NAMES = ["data", "train", "encode", "search", "evaluate", "index", "export", "serve",
                 "reproduce", "demo"]  # fmt: skip


def test_parse_methods_and_bits():
    assert parse_methods("all") == ["pq", "opq", "rq", "lsq", "itq", "itq-cca", "lsh"]
    assert parse_methods("pq, itq,pq") == ["pq", "itq"]
    assert parse_methods(None) == []
    assert parse_bits("8,16") == [8, 16]
    assert parse_methods("sign,pq,dpq") == ["sign", "pq", "dpq"]  # registered methods too
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("pq,sh")
    with pytest.raises(ValueError, match="integers"):
        parse_bits("8,x")


# ---------------------------------------------------------------------------- help


def _command_parser() -> argparse.ArgumentParser:
    commands = argparse.ArgumentParser(prog="x").add_subparsers()
    parser = add_command(commands, "cmd", help="one line", description="A paragraph.")
    parser.add_argument("--count", type=int, default=7, help="how many")
    parser.add_argument("--name", help="no default to show")
    parser.add_argument("--flag", action="store_true", help="off unless given")
    parser.add_argument("--rate", type=float, default=0.0, help="zero counts")
    parser.add_argument("--mode", default="auto", help="said already (default: auto)")
    hidden_alias(parser, "--number", "--count", type=int)
    return parser


def test_help_shows_each_default_once_and_hides_aliases():
    text = " ".join(_command_parser().format_help().split())
    assert "how many (default: 7)" in text and "zero counts (default: 0.0)" in text
    assert "no default to show --flag" in text and "off unless given" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert text.count("(default: auto)") == 1
    assert "--number" not in text and "A paragraph." in text


def test_dpq_help_lists_every_command_on_one_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    lines = build_parser().format_help().splitlines()
    start = lines.index("  COMMAND") + 1
    listed = lines[start : start + len(COMMANDS)]
    assert [line.split()[0] for line in listed] == COMMAND_NAMES
    assert all(len(line.split()) > 3 and len(line) <= 80 for line in listed), listed
    assert lines[start + len(COMMANDS)] == ""  # no continuation lines


@pytest.mark.parametrize("command", COMMAND_NAMES)
def test_every_command_explains_itself(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert len(description.split()) >= 8, text  # a paragraph, not the usage again
    if command not in ("data", "index"):  # those two list their sub-commands
        assert "(default: " in text


def test_defaults_are_shown_where_they_are_set(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    text = capsys.readouterr().out
    assert "(at most the index size is returned) (default: 10)" in text
    assert "(default: json)" in text and "(default: query)" in text
    assert "--mode " not in text  # the old spelling is hidden


# ---------------------------------------------------------------------------- unified flags


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (["data", "split", "s", "--out", "o", "--n-train", "7"],
         ["data", "split", "s", "--out", "o", "--train-per-class", "7"]),
        (["data", "split", "s", "--out", "o", "--n-query", "3"],
         ["data", "split", "s", "--out", "o", "--query-per-class", "3"]),
        (["data", "split", "s", "--out", "o", "--seed", "5"],
         ["data", "split", "s", "--out", "o", "--split-seed", "5"]),
        (["data", "info", "s", "--seed", "4"], ["data", "info", "s", "--split-seed", "4"]),
        (["data", "info", "s", "--root", "r"], ["data", "info", "s", "--image-root", "r"]),
        (["search", "--index", "i", "--features", "f", "--mode", "ip"],
         ["search", "--index", "i", "--features", "f", "--search-mode", "ip"]),
    ],
)  # fmt: skip
def test_an_old_flag_spelling_sets_the_new_flag(old, new):
    parser = build_parser()
    assert parser.parse_args(old) == parser.parse_args(new)
    plain = parser.parse_args(new[: new.index(new[-2])])  # neither spelling: the default
    assert parser.parse_args(old) != plain


def test_data_split_with_the_old_spelling_writes_the_same_split(tmp_path, capsys):
    old = ["data", "split", "digits", "--n-train", "20", "--n-query", "5", "--seed", "3"]
    new = ["data", "split", "digits", "--train-per-class", "20", "--query-per-class", "5"]
    assert main([*old, "--out", str(tmp_path / "old.json")]) == 0
    assert main([*new, "--split-seed", "3", "--out", str(tmp_path / "new.json")]) == 0
    assert "(seed 3)" in capsys.readouterr().out
    assert Split.load(tmp_path / "old.json") == Split.load(tmp_path / "new.json")
    labels = load_source("digits").labels
    assert Split.load(tmp_path / "new.json") == split_per_class(labels, 20, 5, seed=3)


def test_search_with_the_old_mode_flag_searches_by_inner_product(feature_dir, capsys):
    import json

    search = ["search", "--index", str(feature_dir / "index.npz"), "--k", "3"]
    search += ["--features", str(feature_dir / "query_features.npy")]
    assert main([*search, "--mode", "ip"]) == 0
    old = json.loads(capsys.readouterr().out)
    assert main([*search, "--search-mode", "ip"]) == 0
    assert json.loads(capsys.readouterr().out) == old
    assert main(search) == 0
    assert json.loads(capsys.readouterr().out) != old  # the index's own mode is aqd


# ---------------------------------------------------------------------------- groups


def _split_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["data", "split", "digits", "--out", "o.json", *extra])


def test_source_flags_become_load_source_arguments():
    args = _split_args("--image-size", "8", "--loading", "stream", "--skip-corrupt")
    assert source_options(args) == {
        "image_root": None,
        "image_size": 8,
        "strip_prefix": None,
        "skip_corrupt": True,
        "cache_dir": None,
        "in_memory": False,
    }
    assert source_options(_split_args())["in_memory"] == "auto"
    assert image_flags_given(args) == ["--image-size", "--skip-corrupt"]
    assert image_flags_given(_split_args()) == []
    source = read_source(_split_args("--quiet"), "digits", labels_only=True)
    np.testing.assert_array_equal(source.labels, load_source("digits").labels)


def test_missing_flags_and_the_output_check(tmp_path):
    args = build_parser().parse_args(["evaluate", "--query-labels", "q.npy"])
    assert missing_flags(args, "query_features", "query_labels", "db_labels") == [
        "--query-features",
        "--db-labels",
    ]
    args.out = str(tmp_path)
    with pytest.raises(ValueError, match="is a directory"):
        check_out(args)
    args.out = str(tmp_path / "results.json")
    check_out(args)
    args.out = None
    check_out(args)  # no --out, nothing to check


def test_say_is_silent_with_quiet(capsys):
    say(argparse.Namespace(quiet=True), "hidden")
    say(argparse.Namespace(quiet=False), "shown")
    assert capsys.readouterr().err == "shown\n"


def test_load_model_puts_the_checkpoint_on_the_device(tmp_path, model):
    model.save_checkpoint(tmp_path / "model")
    args = build_parser().parse_args(["search", "--index", "i", "--features", "f"])
    args.device = "cpu"
    loaded = load_model(args, str(tmp_path / "model"))
    np.testing.assert_array_equal(loaded.codebooks(), model.codebooks())
    assert next(loaded.parameters()).device.type == "cpu"


def test_the_formatter_is_the_one_every_command_uses():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert all(p.formatter_class is HelpFormatter for p in commands.choices.values())
