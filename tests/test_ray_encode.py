"""dpq.encode.ray: sharded encoding on a local 2-CPU Ray cluster gives the codes of
one-process `dpq encode`; a failed shard is encoded again on re-run and the others are not.

The shard format and the merge are checked without Ray; the Ray tests start one local
cluster (2 CPUs, no dashboard) for the module and shut it down at the end.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_image_folder, truncated_jpeg
from dpq.cli import main
from dpq.config import DPQConfig, ModelConfig, QuantizerConfig
from dpq.data import load_source
from dpq.encode import ray as ray_encode
from dpq.encode.build import build_index, empty_index
from dpq.encode.ray import (
    EncodePlan,
    ShardEncodingError,
    SourceSpec,
    encode_on_ray,
    encode_shard,
    merge_shards,
    read_shard,
    shard_bounds,
    shard_is_done,
    shard_path,
)
from dpq.index import DPQIndex
from dpq.model.network import DPQModel


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small_cnn model (L=3, K=16, D=12) saved as a checkpoint."""
    torch.manual_seed(0)
    config = DPQConfig(
        model=ModelConfig(backbone="small_cnn", backbone_kwargs={"width": 0.25}, num_classes=3),
        quantizer=QuantizerConfig(num_levels=3, codebook_size=16, dim=12),
    )
    path = tmp_path_factory.mktemp("ray-model") / "model"
    DPQModel(config).eval().save_checkpoint(path)
    return path


def _list_source(root: Path, per_class: int = 10) -> Path:
    """A list file of 3 x per_class 8x8 PNGs under root/images (read on demand)."""
    make_image_folder(root / "images", {c: per_class for c in "abc"}, size=8)
    names = [f"{c}/{i:03d}.png {k}\n" for k, c in enumerate("abc") for i in range(per_class)]
    (root / "list.txt").write_text("".join(names))
    return root / "list.txt"


def _plan(model_dir: Path, spec: SourceSpec, shards: int, batch_size: int = 4) -> EncodePlan:
    plan, _classes = ray_encode._make_plan(model_dir, spec, shards, None, None, None, batch_size)
    return plan


# ---------------------------------------------------------------------------- without Ray


def test_shard_bounds_cover_the_items_in_near_equal_ranges():
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shard_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="more than the 3 items"):
        shard_bounds(3, 4)
    with pytest.raises(ValueError, match="positive integer"):
        shard_bounds(3, 0)


def test_shards_hold_ids_codes_norms_and_merge_into_the_one_process_index(model_dir, tmp_path):
    listing = _list_source(tmp_path)
    spec = SourceSpec(images=str(listing), image_root=str(tmp_path / "images"))
    plan = _plan(model_dir, spec, shards=3)
    folder = tmp_path / "shards"
    ray_encode._prepare_folder(folder, plan)
    model = DPQModel.from_checkpoint(model_dir)
    inputs, labels, _classes = spec.open()
    for shard in range(plan.num_shards):
        assert not shard_is_done(folder, plan, shard)
        assert encode_shard(model, inputs, plan, shard, folder) == 10
        assert shard_is_done(folder, plan, shard)
    header, arrays = read_shard(shard_path(folder, 1))
    assert (header["start"], header["stop"], header["plan"]) == (10, 20, plan.fingerprint)
    np.testing.assert_array_equal(arrays["ids"], np.arange(10, 20))
    reconstruction = DPQIndex(model.codebooks()).decode(arrays["codes"])
    np.testing.assert_allclose(arrays["norms"], (reconstruction**2).sum(1), rtol=1e-6)
    assert arrays["norms"].dtype == np.float32 and arrays["codes"].shape == (10, 3)

    merged = merge_shards(empty_index(model), folder, plan)
    reference = build_index(model, load_source(listing, image_root=tmp_path / "images").inputs)
    np.testing.assert_array_equal(merged.codes, reference.codes)
    np.testing.assert_array_equal(merged.ids, np.arange(30))
    np.testing.assert_array_equal(merged.labels, labels)

    # a plan saved in the folder is read back by the actors with the same fingerprint
    assert EncodePlan.load(folder).fingerprint == plan.fingerprint
    # another plan (4 shards) in a folder holding this plan's shards is refused
    with pytest.raises(ValueError, match="holds shards of another encoding"):
        ray_encode._prepare_folder(folder, _plan(model_dir, spec, shards=4))
    # a shard whose codes were changed fails its checksum, and the merge names it
    path = shard_path(folder, 2)
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["codes"][0, 0] = (arrays["codes"][0, 0] + 1) % 16
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="shard-00002.npz failed its checksum"):
        merge_shards(empty_index(model), folder, plan)
    # a truncated shard counts as missing (encoded again on the next run)
    path.write_bytes(path.read_bytes()[:100])
    assert not shard_is_done(folder, plan, 2)


def test_without_ray_the_command_says_how_to_install_it(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "db.npz"
    argv = ["encode", "--engine", "ray", "--model", str(model_dir), "--images", "digits"]
    assert main([*argv, "--out", str(out)]) == 2
    assert "pip install 'dpq[distributed]'" in capsys.readouterr().err
    assert not out.exists()
    local = ["encode", "--model", str(model_dir), "--images", "digits", "--out", str(out)]
    assert main([*local, "--shards", "2"]) == 2
    assert "apply to --engine ray" in capsys.readouterr().err


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
    ray_cluster, model_dir, tmp_path, capsys
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
    common = ["encode", "--model", str(model_dir), "--images", "digits", "--split", str(split)]
    assert main([*common, "--batch-size", "64", "--out", str(tmp_path / "one.npz")]) == 0
    ray_argv = [*common, "--engine", "ray", "--shards", "3", "--batch-size", "32", "--quiet"]
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
    # a partitioned index from the same shards is the one-process partitioned index
    grouped = ["--partition-levels", "1"]
    assert main([*common, *grouped, "--out", str(tmp_path / "one-p1.npz")]) == 0
    assert main([*ray_argv, *grouped, "--out", str(tmp_path / "ray-p1.npz")]) == 0
    one, sharded = DPQIndex.load(tmp_path / "one-p1.npz"), DPQIndex.load(tmp_path / "ray-p1.npz")
    assert sharded.partition_levels == one.partition_levels == 1
    np.testing.assert_array_equal(sharded.codes, one.codes)
    np.testing.assert_array_equal(sharded.ids, one.ids)


def test_a_failed_shard_is_encoded_again_on_rerun_and_the_others_are_not(
    ray_cluster, model_dir, tmp_path
):
    listing = _list_source(tmp_path)
    bad = tmp_path / "images" / "c" / "002.png"  # row 22: shard 3 of [0,7) [7,15) [15,22) [22,30)
    good = bad.read_bytes()
    bad.write_bytes(truncated_jpeg(np.random.default_rng(0)))
    spec = SourceSpec(images=str(listing), image_root=str(tmp_path / "images"))
    out = tmp_path / "db.npz"
    options = {"shards": 4, "batch_size": 4}
    with pytest.raises(ShardEncodingError, match=r"1 of 4 shards failed \(shard 3: .*002\.png"):
        encode_on_ray(model_dir, spec, out, **options)
    assert not out.exists()
    folder = tmp_path / "db.npz.shards"
    done = {s: shard_path(folder, s).stat() for s in (0, 1, 2)}
    assert not shard_path(folder, 3).exists()

    bad.write_bytes(good)
    result = encode_on_ray(model_dir, spec, out, **options)
    assert (result.encoded, result.reused, result.actors) == ([3], [0, 1, 2], 1)
    for shard, before in done.items():
        after = shard_path(folder, shard).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    model = DPQModel.from_checkpoint(model_dir)
    reference = build_index(model, load_source(listing, image_root=tmp_path / "images").inputs)
    np.testing.assert_array_equal(DPQIndex.load(out).codes, reference.codes)
