"""dpq.encode.shards: the plan, shard files in the index's own format, their merge, without
Ray (where shards run is tests/test_ray_encode.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_list_source
from dpq.data import SourceSpec, load_source
from dpq.encode import shards as sharding
from dpq.encode.build import build_index, empty_index
from dpq.encode.shards import (
    EncodePlan,
    ShardEncodingError,
    ShardRun,
    check_failures,
    encode_shard,
    merge_shards,
    shard_bounds,
    shard_is_done,
    shard_path,
)
from dpq.index import DPQIndex, IndexFileError
from dpq.index.storage import read_index_file
from dpq.model.files import read_checkpoint_config
from dpq.model.network import DPQModel


def _plan(small_model_dir: Path, spec: SourceSpec, shards: int, batch_size: int = 4) -> EncodePlan:
    """Every row of ``spec`` under ids 0..n-1, with the source's labels."""
    inputs, labels, _classes = spec.open(progress=False)
    rows = np.arange(len(inputs), dtype=np.int64)
    _config, record = read_checkpoint_config(small_model_dir)
    return EncodePlan(
        spec,
        str(small_model_dir),
        record["weights_sha256"],
        len(inputs),
        rows,
        rows,
        labels,
        shard_bounds(len(rows), shards),
        batch_size,
    )


def test_shard_bounds_cover_the_items_in_near_equal_ranges():
    assert shard_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shard_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="more than the 3 items"):
        shard_bounds(3, 4)
    with pytest.raises(ValueError, match="positive integer"):
        shard_bounds(3, 0)


def test_shards_are_index_files_that_merge_into_the_one_process_index(small_model_dir, tmp_path):
    listing = make_list_source(tmp_path)
    spec = SourceSpec(images=str(listing), image_root=str(tmp_path / "images"), loading="stream")
    plan = _plan(small_model_dir, spec, shards=3)
    folder = tmp_path / "shards"
    sharding.prepare_folder(folder, plan)
    model = DPQModel.from_checkpoint(small_model_dir)
    inputs, labels, _classes = spec.open()
    for shard in range(plan.num_shards):
        assert not shard_is_done(folder, plan, shard)
        assert encode_shard(model, inputs, plan, shard, folder) == 10
        assert shard_is_done(folder, plan, shard)
    shard = DPQIndex.load(shard_path(folder, 1))
    assert shard.metadata["encode_shard"] == {
        "plan": plan.fingerprint,
        "shard": 1,
        "start": 10,
        "stop": 20,
    }
    np.testing.assert_array_equal(shard.ids, np.arange(10, 20))
    _header, arrays = read_index_file(shard_path(folder, 1))  # the norms a shard file keeps
    reconstruction = DPQIndex(model.codebooks()).decode(shard.codes)
    np.testing.assert_allclose(arrays["norms"], (reconstruction**2).sum(1), rtol=1e-6)
    assert arrays["norms"].dtype == np.float32 and shard.codes.shape == (10, 3)

    merged = merge_shards(empty_index(model), folder, plan)
    reference = build_index(model, load_source(listing, image_root=tmp_path / "images").inputs)
    np.testing.assert_array_equal(merged.codes, reference.codes)
    np.testing.assert_array_equal(merged.ids, np.arange(30))
    np.testing.assert_array_equal(merged.labels, labels)

    # a plan saved in the folder is read back by the workers with the same fingerprint
    assert EncodePlan.load(folder).fingerprint == plan.fingerprint
    # another plan (4 shards) in a folder holding this plan's shards is refused
    with pytest.raises(ValueError, match="holds shards of another encoding"):
        sharding.prepare_folder(folder, _plan(small_model_dir, spec, shards=4))
    # a shard whose codes were changed fails its checksum, and the merge names it
    path = shard_path(folder, 2)
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["codes"][0, 0] = (arrays["codes"][0, 0] + 1) % 16
    np.savez(path, **arrays)
    with pytest.raises(IndexFileError, match="shard-00002.npz failed its checksum"):
        merge_shards(empty_index(model), folder, plan)
    # a truncated shard counts as missing (encoded again on the next run)
    path.write_bytes(path.read_bytes()[:100])
    assert not shard_is_done(folder, plan, 2)
    with pytest.raises(ValueError, match="shard-00002.npz is missing or belongs to another plan"):
        merge_shards(empty_index(model), folder, plan)


def test_a_shard_of_another_plan_or_other_codebooks_is_not_taken(small_model_dir, tmp_path):
    listing = make_list_source(tmp_path, per_class=2)
    spec = SourceSpec(images=str(listing), image_root=str(tmp_path / "images"), loading="stream")
    plan, other = _plan(small_model_dir, spec, shards=2), _plan(small_model_dir, spec, shards=3)
    model = DPQModel.from_checkpoint(small_model_dir)
    inputs, _labels, _classes = spec.open()
    encode_shard(model, inputs, plan, 0, tmp_path)
    encode_shard(model, inputs, plan, 1, tmp_path)
    assert shard_is_done(tmp_path, plan, 0) and not shard_is_done(tmp_path, other, 0)
    torch.manual_seed(1)
    stranger = DPQModel(model.config)
    with pytest.raises(ValueError, match="encoded with other codebooks"):
        merge_shards(empty_index(stranger), tmp_path, plan)


def test_failed_shards_are_named_with_their_first_errors(small_model_dir, tmp_path):
    listing = make_list_source(tmp_path, per_class=2)
    spec = SourceSpec(images=str(listing), image_root=str(tmp_path / "images"), loading="stream")
    plan = _plan(small_model_dir, spec, shards=3)
    check_failures(ShardRun(), plan, tmp_path)  # nothing failed: nothing raised
    run = ShardRun(failures=[(2, "OSError: b.png"), (0, "ValueError: a.png")])
    with pytest.raises(ShardEncodingError, match=r"2 of 3 shards failed \(shard 0: ValueError"):
        check_failures(run, plan, tmp_path)
