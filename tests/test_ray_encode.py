"""dpq.encode.ray: sharded encoding on a local 2-CPU Ray cluster gives the codes of
one-process `dpq encode`; a failed shard is encoded again on re-run and the others are not.

The shard files and the merge are checked without Ray in tests/test_encode_shards.py; the
Ray tests start one local cluster (2 CPUs, no dashboard) for the module and shut it down at
the end.
"""

import os
import sys

import numpy as np
import pytest

from conftest import make_list_source, truncated_jpeg
from dpq.cli import main
from dpq.data import SourceSpec, load_source
from dpq.encode import ray as ray_encode
from dpq.encode.build import build_index
from dpq.encode.job import EncodeSettings, encode_collection
from dpq.encode.ray import RayRunner
from dpq.encode.shards import ShardEncodingError, shard_path
from dpq.index import DPQIndex
from dpq.model.network import DPQModel

# ---------------------------------------------------------------------------- without Ray


def test_without_ray_the_command_says_how_to_install_it(
    small_model_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ValueError, match="pip install 'dpq\\[distributed\\]'"):
        RayRunner()
    out = tmp_path / "db.npz"
    argv = ["encode", "--engine", "ray", "--model", str(small_model_dir), "--images", "digits"]
    assert main([*argv, "--out", str(out)]) == 2  # the runner's old spelling still works
    err = capsys.readouterr().err
    assert "pip install 'dpq[distributed]'" in err
    assert "--engine ray is deprecated, use --runner ray" in err
    assert not out.exists()
    local = ["encode", "--model", str(small_model_dir), "--images", "digits", "--out", str(out)]
    assert main([*local, "--shards", "2"]) == 2
    assert "apply to --runner ray" in capsys.readouterr().err


# ---------------------------------------------------------------------------- on a Ray cluster


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for this module (shut down afterwards). Ray's memory
    monitor is off: it watches the whole machine and kills workers when other jobs on a
    shared test machine use the memory."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'dpq[distributed]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")
    previous = os.environ.get("RAY_memory_monitor_refresh_ms")
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    try:
        assert ray_encode.connect(ray, None, num_cpus=2)
    finally:
        if previous is None:
            os.environ.pop("RAY_memory_monitor_refresh_ms")
        else:
            os.environ["RAY_memory_monitor_refresh_ms"] = previous
    yield ray
    ray.shutdown()


def test_ray_encode_gives_the_codes_of_one_process_dpq_encode(
    ray_cluster, small_model_dir, tmp_path, capsys
):
    split = tmp_path / "split.json"
    argv = [
        "data",
        "split",
        "digits",
        "--train-per-class",
        "5",
        "--query-per-class",
        "5",
        "--out",
        str(split),
    ]
    assert main(argv) == 0
    common = [
        "encode",
        "--model",
        str(small_model_dir),
        "--images",
        "digits",
        "--split",
        str(split),
    ]
    assert main([*common, "--batch-size", "64", "--out", str(tmp_path / "one.npz")]) == 0
    ray_argv = [*common, "--runner", "ray", "--shards", "3", "--batch-size", "32", "--quiet"]
    assert main([*ray_argv, "--out", str(tmp_path / "ray.npz")]) == 0
    assert "3 shard(s) encoded on Ray (2 actor(s)" in capsys.readouterr().out
    one, sharded = DPQIndex.load(tmp_path / "one.npz"), DPQIndex.load(tmp_path / "ray.npz")
    assert sharded.ntotal == one.ntotal == 1797 - 100
    np.testing.assert_array_equal(sharded.codes, one.codes)
    np.testing.assert_array_equal(sharded.ids, one.ids)
    np.testing.assert_array_equal(sharded.labels, one.labels)
    np.testing.assert_array_equal(sharded.codebooks, one.codebooks)
    assert (sharded.search_mode, sharded.assignment) == (one.search_mode, one.assignment)
    assert sharded.metadata["classes"] == one.metadata["classes"]
    # nothing left to encode: the same command only merges again
    assert main([*ray_argv, "--out", str(tmp_path / "ray.npz")]) == 0
    assert "0 shard(s) encoded on Ray (0 actor(s), no host), 3 already" in capsys.readouterr().out
    # a partitioned index merged from the same shards (none encoded again) is the
    # one-process partitioned index
    grouped = ["--partition-levels", "1"]
    assert main([*common, *grouped, "--out", str(tmp_path / "one-p1.npz")]) == 0
    assert main([*ray_argv, *grouped, "--out", str(tmp_path / "ray.npz")]) == 0
    assert "0 shard(s) encoded on Ray (0 actor(s), no host), 3 already" in capsys.readouterr().out
    one, sharded = DPQIndex.load(tmp_path / "one-p1.npz"), DPQIndex.load(tmp_path / "ray.npz")
    assert sharded.partition_levels == one.partition_levels == 1
    np.testing.assert_array_equal(sharded.codes, one.codes)
    np.testing.assert_array_equal(sharded.ids, one.ids)


def test_a_failed_shard_is_encoded_again_on_rerun_and_the_others_are_not(
    ray_cluster, small_model_dir, tmp_path
):
    listing = make_list_source(tmp_path)
    bad = tmp_path / "images" / "c" / "002.png"  # row 22: shard 3 of [0,7) [7,15) [15,22) [22,30)
    good = bad.read_bytes()
    bad.write_bytes(truncated_jpeg(np.random.default_rng(0)))
    spec = SourceSpec(images=str(listing), image_root=str(tmp_path / "images"))
    out = tmp_path / "db.npz"
    settings = EncodeSettings(
        out, spec, model=small_model_dir, runner=RayRunner(), shards=4, batch_size=4
    )
    with pytest.raises(ShardEncodingError, match=r"1 of 4 shards failed \(shard 3: .*002\.png"):
        encode_collection(settings)
    assert not out.exists()
    folder = tmp_path / "db.npz.shards"
    done = {s: shard_path(folder, s).stat() for s in (0, 1, 2)}
    assert not shard_path(folder, 3).exists()

    bad.write_bytes(good)
    result = encode_collection(settings)
    assert (result.shards.encoded, result.shards.reused, result.shards.run.actors) == (
        [3],
        [0, 1, 2],
        1,
    )
    for shard, before in done.items():
        after = shard_path(folder, shard).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    model = DPQModel.from_checkpoint(small_model_dir)
    reference = build_index(model, load_source(listing, image_root=tmp_path / "images").inputs)
    np.testing.assert_array_equal(DPQIndex.load(out).codes, reference.codes)
