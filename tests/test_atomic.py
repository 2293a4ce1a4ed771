"""dpq.atomic: whole files or nothing, strict JSON, outputs checked before the work."""

import json
import os

import numpy as np
import pytest

from dpq.atomic import atomic_writer, check_writable_file, write_json_atomic, write_text_atomic


def test_write_json_is_atomic_and_refuses_nan(tmp_path):
    path = write_json_atomic(tmp_path / "out.json", {"a": np.float32(0.5), "b": np.arange(3)})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2]}
    with pytest.raises(ValueError):
        write_json_atomic(path, {"a": float("nan")})
    assert json.loads(path.read_text())["a"] == 0.5  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp file left
    write_json_atomic(path, {"x": [1, 2]}, indent=None)
    assert path.read_text() == '{"x": [1, 2]}\n'


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_writer(path) as handle:
        handle.write(b"half of the new")
        raise RuntimeError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_outputs_are_checked_before_any_work(tmp_path):
    assert check_writable_file(tmp_path / "new" / "index.npz") == tmp_path / "new" / "index.npz"
    with pytest.raises(ValueError, match="is a directory"):
        check_writable_file(tmp_path, "--out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="which is a file"):
        check_writable_file(tmp_path / "file" / "index.npz", "--out")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not writable"):
            check_writable_file(locked / "index.npz")
