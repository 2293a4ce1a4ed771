"""Mistakes a user makes, command by command: exit 2 and one line on stderr, never a
traceback; and what needs a real process: a closed pipe, Ctrl-C, two runs into one folder,
plain scripts that decode images, output read from a file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import StreamLines, make_image_folder, wait_until
from dpq.cli import main
from dpq.data import Split

DPQ = [sys.executable, "-m", "dpq.cli"]
TINY_TRAIN = [
    "--backbone", "small_cnn", "--width", "0.25", "--split", "per-class",
    "--train-per-class", "26", "--query-per-class", "5", "--num-levels", "2",
    "--codebook-size", "16", "--dim", "12", "--batch-size", "64",
    "--word-vectors", "orthogonal",
]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A trained tiny digits model, its split and index, and files good and bad."""
    root = tmp_path_factory.mktemp("cli-errors")
    run = root / "run"
    assert (
        main(["train", "digits", *TINY_TRAIN, "--epochs", "1", "--out", str(run), "--quiet"]) == 0
    )
    index = root / "index.npz"
    encode = ["encode", "--model", str(run / "model"), "--images", "digits", "--quiet"]
    assert main([*encode, "--split", str(run / "split.json"), "--out", str(index)]) == 0
    rng = np.random.default_rng(0)
    paths = {
        "model": run / "model",
        "split": run / "split.json",
        "index": index,
        "features": root / "features.npy",
        "labels": root / "labels.npy",
        "nan": root / "nan.npy",
        "wide": root / "wide.npy",
        "strings": root / "strings.npy",
        "npz": root / "features.npz",
        "npy_as_npz": root / "renamed.npz",
        "binary": root / "vectors.bin",
        "file": root / "a-file",
        "few": root / "few.npy",
        "few_labels": root / "few_labels.npy",
        "folder": root / "folder",
        "empty_split": root / "empty-database.json",
        "huge_split": root / "huge-row.json",
    }
    np.save(paths["features"], rng.normal(size=(40, 12)).astype(np.float32))
    np.save(paths["labels"], np.arange(40) % 4)
    nan = rng.normal(size=(40, 12)).astype(np.float32)
    nan[5, 3] = np.nan
    np.save(paths["nan"], nan)
    np.save(paths["wide"], rng.normal(size=(40, 13)).astype(np.float32))
    np.save(paths["strings"], np.array(["cat", "dog"] * 20))
    np.savez(paths["npz"], x=np.zeros((3, 12)))
    np.save(root / "plain.npy", np.zeros(3))
    os.replace(root / "plain.npy", paths["npy_as_npz"])
    paths["binary"].write_bytes(bytes(range(256)) * 8)
    paths["file"].write_text("not a folder")
    np.save(paths["few"], rng.normal(size=(100, 12)).astype(np.float32))
    np.save(paths["few_labels"], np.arange(100) % 4)
    make_image_folder(paths["folder"], {"a": 2, "b": 2})
    Split(train=[0, 1], query=[2], database=[]).save(paths["empty_split"])
    meta = {"format": "dpq-split", "version": 1, "train": [0], "query": [1]}
    paths["huge_split"].write_text(json.dumps({**meta, "database": [2, 1e30]}))
    return {name: str(path) for name, path in paths.items()}


# (argv with {placeholders}, a phrase the one error line must contain)
CASES = [
    # dpq data info / split
    (["data", "info", "{missing}"], "does not exist"),
    (["data", "info", "{folder}", "--image-root", "{folder}"], "apply to list files"),
    (["data", "split", "digits", "--out", "{folder}"], "is a directory"),
    (["data", "split", "digits", "--out", "{file}/split.json"], "which is a file"),
    (
        ["data", "split", "digits", "--train-per-class", "500", "--out", "{tmp}/s.json"],
        "has 178 items but the split asks for 500 training + 100 query",
    ),
    # dpq train
    (["train", "digits", "--out", "{file}", "--epochs", "1"], "is an existing file"),
    (
        ["train", "digits", "--features", "{features}", "--labels", "{labels}", "--out", "{tmp}/r"],
        "not both",
    ),
    (["train", "--features", "{features}", "--out", "{tmp}/r"], "needs --labels"),
    (["train", "--features", "{nan}", "--labels", "{labels}", "--out", "{tmp}/r"], "NaN"),
    (
        ["train", "--features", "{features}", "--labels", "{strings}", "--out", "{tmp}/r"],
        "must be integer class indices",
    ),
    (
        ["train", "--features", "{npz}", "--labels", "{labels}", "--out", "{tmp}/r"],
        "is an .npz archive",
    ),
    (
        ["train", "digits", "--word-vectors", "{binary}", "--out", "{tmp}/r", "--epochs", "1"],
        "is not a text file",
    ),
    (
        ["train", "digits", "--word-vectors", "{folder}", "--out", "{tmp}/r", "--epochs", "1"],
        "is a directory",
    ),
    (
        ["train", "digits", "--word-vectors", "orthogonal", "--out", "{tmp}/r", "--resume"],
        "nothing to resume",
    ),
    (["train", "digits", "--config", "{missing}", "--out", "{tmp}/r"], "neither a recipe name"),
    (["train", "digits", "--image-root", "{folder}", "--out", "{tmp}/r"], "apply to list files"),
    # dpq encode
    (["encode", "--model", "{model}", "--images", "digits", "--out", "{folder}"], "is a directory"),
    (
        ["encode", "--codebooks", "{features}", "--images", "digits", "--out", "{tmp}/i.npz"],
        "--images needs --model",
    ),
    (
        [
            "encode",
            "--model",
            "{model}",
            "--features",
            "{features}",
            "--image-root",
            "{folder}",
            "--out",
            "{tmp}/i.npz",
        ],
        "apply to --images",
    ),
    (
        [
            "encode",
            "--model",
            "{model}",
            "--images",
            "digits",
            "--split",
            "{npy_as_npz}",
            "--out",
            "{tmp}/i.npz",
        ],
        "holds one array",
    ),
    (
        [
            "encode",
            "--model",
            "{model}",
            "--images",
            "{folder}",
            "--split",
            "{split}",
            "--out",
            "{tmp}/i.npz",
        ],
        "make the split from the same source",
    ),
    (
        ["encode", "--codebooks", "{npz}", "--features", "{features}", "--out", "{tmp}/i.npz"],
        "is an .npz archive",
    ),
    (
        [
            "encode",
            "--model",
            "{model}",
            "--images",
            "digits",
            "--split",
            "{empty_split}",
            "--out",
            "{tmp}/i.npz",
        ],
        "the split holds no",  # an empty database: no 0-item index written silently
    ),  # fmt: skip
    (
        [
            "encode",
            "--model",
            "{model}",
            "--images",
            "digits",
            "--split",
            "{huge_split}",
            "--out",
            "{tmp}/i.npz",
        ],
        "database[1] is 1e+30, not a row number",
    ),  # fmt: skip
    (
        ["search", "--index", "{index}", "--features", "{features}", "--nprobe", "4"],
        "--nprobe needs a partitioned index",
    ),
    # dpq search
    (["search", "--index", "{missing}", "--features", "{features}"], "not found"),
    (
        ["search", "--index", "{npy_as_npz}", "--features", "{features}"],
        "not a readable dpq index file",
    ),
    (
        ["search", "--index", "{index}", "--features", "{features}", "--split", "{split}"],
        "apply to --images",
    ),
    (["search", "--index", "{index}", "--features", "{wide}"], "dimension 13"),
    (["search", "--index", "{index}", "--features", "{nan}"], "NaN or inf"),
    (["search", "--index", "{index}", "--features", "{features}", "--k", "0"], "k must be"),
    (
        ["search", "--index", "{index}", "--features", "{features}", "--num-levels", "9"],
        "num_levels must be in 1..2",
    ),
    (
        ["search", "--index", "{index}", "--features", "{features}", "--out", "{folder}"],
        "is a directory",
    ),
    # dpq evaluate
    (
        [
            "evaluate",
            "--query-features",
            "{npz}",
            "--query-labels",
            "{labels}",
            "--db-labels",
            "{labels}",
            "--method",
            "float",
        ],
        "is an .npz archive",
    ),
    (
        [
            "evaluate",
            "--query-features",
            "{nan}",
            "--query-labels",
            "{labels}",
            "--db-features",
            "{features}",
            "--db-labels",
            "{labels}",
            "--method",
            "float",
        ],
        "NaN or inf in 1 row(s) (first: row 5)",
    ),
    (
        [
            "evaluate",
            "--query-features",
            "{features}",
            "--query-labels",
            "{labels}",
            "--db-features",
            "{features}",
            "--db-labels",
            "{labels}",
            "--train-features",
            "{few}",
            "--train-labels",
            "{few_labels}",
            "--baselines",
            "pq",
        ],
        "needs at least 256 training rows",
    ),
    (
        [
            "evaluate",
            "--query-features",
            "{features}",
            "--query-labels",
            "{labels}",
            "--db-labels",
            "{labels}",
            "--method",
            "float",
            "--image-size",
            "8",
        ],
        "apply to --images",
    ),
    (["evaluate", "--model", "{model}"], "needs --images, --split"),
    # dpq reproduce
    (
        ["reproduce", "cifar10", "--data", "{folder}", "--out", "{tmp}/r", "--epochs", "1"],
        "not CIFAR-10",
    ),
    (
        ["reproduce", "cifar10", "--data", "{folder}", "--out", "{file}", "--epochs", "1"],
        "is an existing file",
    ),
]


@pytest.mark.parametrize(("argv", "phrase"), CASES, ids=[" ".join(c[0][:2]) for c in CASES])
def test_a_mistake_is_one_line_and_exit_2(files, tmp_path, capsys, argv, phrase):
    values = {**files, "tmp": str(tmp_path), "missing": str(tmp_path / "missing.txt")}
    code = main([arg.format(**values) for arg in argv] + ["--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("dpq: error: ") and err.count("\n") == 1, err
    assert phrase in err and "Traceback" not in err


def test_a_huge_label_value_is_a_class_name_not_a_billion_classes(tmp_path, capsys):
    """One label of 1e9 once built a class name per index up to it (23.5 GB)."""
    rng = np.random.default_rng(1)
    np.save(tmp_path / "x.npy", rng.normal(size=(60, 6)).astype(np.float32))
    labels = np.arange(60) % 3
    labels[labels == 2] = 1_000_000_000
    np.save(tmp_path / "y.npy", labels)
    settings = [
        "--num-levels", "1", "--codebook-size", "4", "--dim", "6", "--epochs", "1",
        "--batch-size", "20", "--ablation", "E+LC", "--quiet",
    ]  # fmt: skip
    features = ["train", "--features", str(tmp_path / "x.npy")]
    argv = [*features, "--labels", str(tmp_path / "y.npy"), *settings]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    from dpq.model.network import DPQModel

    assert DPQModel.from_checkpoint(tmp_path / "run" / "model").config.model.num_classes == 3
    np.save(tmp_path / "ids.npy", np.arange(200_000))
    np.save(tmp_path / "x2.npy", rng.normal(size=(200_000, 2)).astype(np.float32))
    argv = ["train", "--features", str(tmp_path / "x2.npy"), "--labels", str(tmp_path / "ids.npy")]
    assert main([*argv, *settings, "--out", str(tmp_path / "run2")]) == 2
    assert "200,000 distinct values" in capsys.readouterr().err


def test_a_labels_text_file_is_read_by_encode_too(files, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(str(i % 4) for i in range(40)))
    index = tmp_path / "index.npz"
    argv = ["encode", "--codebooks", str(tmp_path / "books.npy"), "--features", files["features"]]
    from dpq.model.network import DPQModel

    np.save(tmp_path / "books.npy", DPQModel.from_checkpoint(files["model"]).codebooks())
    assert main([*argv, "--labels", str(labels), "--out", str(index), "--quiet"]) == 0
    from dpq.index import DPQIndex

    assert DPQIndex.load(index).labels.tolist() == [i % 4 for i in range(40)]
    capsys.readouterr()


# ---------------------------------------------------------------------------- real processes


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_a_closed_pipe_ends_quietly():
    result = subprocess.run(
        f"{sys.executable} -m dpq.cli data info digits | head -1",
        shell=True,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert result.stdout.startswith("source: digits")
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def _start_training(out: Path, epochs: int = 10_000) -> subprocess.Popen:
    argv = [*DPQ, "train", "digits", *TINY_TRAIN, "--epochs", str(epochs), "--out", str(out)]
    return subprocess.Popen(
        argv, stderr=subprocess.PIPE, text=True, env=_env(), preexec_fn=_ctrl_c_as_in_a_terminal
    )


def _ctrl_c_as_in_a_terminal() -> None:
    """In the child before exec: SIGINT at its default disposition, as a terminal gives it. A
    suite started with ``&`` from a non-interactive shell ignores SIGINT, and an ignored signal
    stays ignored across exec, so the test's Ctrl-C would never reach the run."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_first_epoch(process: subprocess.Popen) -> tuple[StreamLines, list[str]]:
    """The process's stderr (read on a thread from now on) and its lines up to the first
    epoch line (or all of them and "", if stderr closed before one)."""
    stderr = StreamLines(process.stderr)

    def first_epoch() -> int | None:
        return next((i for i, s in enumerate(stderr.lines) if s.startswith("epoch 1/")), None)

    wait_until(
        lambda: first_epoch() is not None or stderr.closed,
        120,
        lambda: f"an 'epoch 1/' line on stderr: {stderr.lines}",
    )
    end = first_epoch()
    if end is None:  # closed first: its lines, then the "" a readline() gives at the end
        return stderr, [*stderr.lines, ""]
    return stderr, stderr.lines[: end + 1]


def test_ctrl_c_stops_with_130_and_no_traceback(tmp_path):
    process = _start_training(tmp_path / "run")
    try:
        stderr, lines = _wait_for_first_epoch(process)
        assert lines[-1].startswith("epoch 1/"), lines
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
        wait_until(lambda: stderr.closed, 10, "the end of stderr")
        rest = stderr.text(len(lines))
    finally:
        process.kill()
        process.wait(30)
    assert "Traceback" not in rest and "dpq: interrupted" in rest
    assert (tmp_path / "run" / "checkpoints" / "epoch-0001").is_dir()  # resumable


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_trains(tmp_path, capsys):
    process = _start_training(tmp_path / "run")
    try:
        _wait_for_first_epoch(process)
        argv = ["train", "digits", *TINY_TRAIN, "--epochs", "1", "--out", str(tmp_path / "run")]
        assert main([*argv, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"in use by a training run right now (pid {process.pid}" in err
        assert main([*argv, "--resume", "--quiet"]) == 2  # --resume waits for nobody either
        assert f"pid {process.pid}" in capsys.readouterr().err
    finally:
        process.kill()
        process.wait(30)


def test_progress_written_to_a_file_is_one_line_per_epoch(tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as handle:
        argv = [*DPQ, "train", "digits", *TINY_TRAIN, "--epochs", "3", "--out", str(tmp_path / "r")]
        subprocess.run(argv, stderr=handle, stdout=handle, env=_env(), timeout=300, check=True)
    text = log.read_text()
    assert "\r" not in text
    epochs = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/3", "2/3", "3/3"]


def test_plain_scripts_and_stdin_decode_images_in_threads(tmp_path):
    """No `if __name__ == "__main__":` guard, and a script read from stdin: decoding more than
    4,000 images once died with BrokenProcessPool (a spawn pool re-ran the script)."""
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "set" / name).mkdir(parents=True)
        for i in range(2050):
            Image.new("RGB", (2, 2), (i % 256, 0, 0)).save(tmp_path / "set" / name / f"{i}.png")
    script = textwrap.dedent(
        f"""
        from dpq.data import load_image_folder
        print(len(load_image_folder({str(tmp_path / "set")!r}, workers=2)))
        """
    )
    (tmp_path / "plain.py").write_text(script)
    for argv, stdin in (
        ([sys.executable, str(tmp_path / "plain.py")], None),
        ([sys.executable, "-"], script),
    ):
        result = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, env=_env(), timeout=120
        )
        assert result.returncode == 0 and result.stdout.strip() == "4100", result.stderr


def _as_nobody(argv: list[str]) -> list[str]:
    """argv run as the unprivileged user 65534 when this test runs as root (root may write
    anywhere, so a read-only folder can only be tried as another user)."""
    if os.geteuid() != 0:
        return argv
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]


def test_a_read_only_output_folder_is_one_line_before_any_work(tmp_path):
    import shutil

    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be tried")
    probe = subprocess.run(
        _as_nobody([sys.executable, "-c", "import dpq.cli"]), env=_env(), timeout=120
    )
    if probe.returncode != 0:
        pytest.skip("the unprivileged user cannot read this checkout (import dpq failed)")
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="dpq-read-only-"))  # reachable by the other user
    shared.chmod(0o755)
    locked = shared / "read-only"
    locked.mkdir(mode=0o555)
    for argv in (
        ["data", "split", "digits", "--out", str(locked / "split.json")],
        ["train", "digits", *TINY_TRAIN, "--epochs", "1", "--out", str(locked / "run")],
        ["encode", "--model", "m", "--images", "digits", "--out", str(locked / "index.npz")],
    ):
        result = subprocess.run(
            _as_nobody([*DPQ, *argv, "--quiet"]),
            capture_output=True,
            text=True,
            env=_env(),
            timeout=120,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "is not writable" in result.stderr
    shutil.rmtree(shared)
