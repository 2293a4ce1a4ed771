"""dpq.training.checkpoints: model checkpoints (round trip, mismatch, corruption), the run folder (what
counts as a run, the lock held for a whole run) and the epoch checkpoint store."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import QUIET, StreamLines, feature_config, feature_data, small_config, wait_until
from dpq.config import TrainConfig
from dpq.model.network import DPQModel
from dpq.training.checkpoints import CheckpointStore, RunDirectory, RunInProgressError
from dpq.training.loop import train_model


def test_checkpoint_round_trip(tmp_path, model, images):
    path = model.save_checkpoint(tmp_path / "ckpt", extra={"note": "x"})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    record = json.loads((path / "config.json").read_text())
    assert record["checkpoint"]["note"] == "x"
    loaded = DPQModel.from_checkpoint(path)
    assert loaded.config == model.config
    np.testing.assert_array_equal(loaded.extract_features(images), model.extract_features(images))
    np.testing.assert_array_equal(loaded.codebooks(), model.codebooks())
    same = DPQModel.from_checkpoint(path, config=small_config())
    assert same.config.quantizer.assignment == "euclidean"


def test_checkpoint_config_mismatch_is_a_clear_error(tmp_path, model):
    model.save_checkpoint(tmp_path)
    with pytest.raises(
        ValueError, match=r"\(checkpoint vs requested\): quantizer.num_levels: 3 vs 4"
    ):
        DPQModel.from_checkpoint(tmp_path, config=small_config(num_levels=4))
    other_train = small_config().replace(train=TrainConfig(epochs=3))
    assert DPQModel.from_checkpoint(tmp_path, config=other_train).config == model.config


def test_corrupted_or_missing_checkpoint(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DPQModel.from_checkpoint(tmp_path / "nowhere")
    model.save_checkpoint(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        DPQModel.from_checkpoint(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        DPQModel.from_checkpoint(tmp_path)


def test_a_checkpoint_records_the_trainers_config_not_only_the_models(tmp_path, model):
    trained_with = small_config().replace(train={"epochs": 7})
    model.save_checkpoint(tmp_path, config=trained_with)
    assert DPQModel.from_checkpoint(tmp_path).config.train.epochs == 7
    with pytest.raises(ValueError, match="architecture"):
        model.save_checkpoint(tmp_path / "other", config=small_config(num_levels=2))


def test_a_run_folder_is_a_run_once_it_holds_a_checkpoint_or_a_final_model(tmp_path):
    run = RunDirectory(tmp_path / "run")
    assert run.existing_run() is None
    run.check_can_start(resume=False)
    with pytest.raises(ValueError, match="nothing to resume"):
        run.check_can_start(resume=True)
    train_model(feature_config(epochs=1), feature_data(), None, run.path, **QUIET)
    assert "checkpoint epoch-0001" in run.existing_run()
    # the checkpoints deleted after a finished run: the final model still counts
    for path in run.checkpoints.complete():
        for file in path.iterdir():
            file.unlink()
        path.rmdir()
    assert "final model" in run.existing_run()
    with pytest.raises(ValueError, match="already holds a training run"):
        run.check_can_start(resume=False)
    with pytest.raises(ValueError, match="the run finished"):
        run.check_can_start(resume=True)
    log = (run.path / "train_log.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds"):
        train_model(feature_config(epochs=1), feature_data(), None, run.path, **QUIET)
    assert (run.path / "train_log.jsonl").read_text() == log  # nothing appended


def test_the_lock_refuses_a_second_process_and_names_the_first(tmp_path):
    run = RunDirectory(tmp_path / "run")
    script = textwrap.dedent(
        f"""
        import sys, time
        from dpq.training.checkpoints import RunDirectory
        with RunDirectory({str(run.path)!r}).lock():
            print("locked", flush=True)
            time.sleep(60)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        stdout = StreamLines(holder.stdout)
        wait_until(lambda: stdout.lines or stdout.closed, 60, "the holder to print 'locked'")
        assert (stdout.lines or [""])[0].strip() == "locked"
        with pytest.raises(RunInProgressError, match=f"pid {holder.pid}"):
            with run.lock():
                pass
    finally:
        holder.kill()
        holder.wait(30)
    with run.lock(), run.lock():  # free again, and re-entrant for the same object
        assert (run.path / ".dpq-run.lock").read_text().startswith(f"pid {os.getpid()}")


def test_the_lock_is_released_when_its_holder_dies(tmp_path):
    run = RunDirectory(tmp_path / "run")
    script = f"from dpq.training.checkpoints import RunDirectory\nRunDirectory({str(run.path)!r}).lock().__enter__()\nimport os; os._exit(9)"
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == 9
    with run.lock():
        pass


def test_output_folders_that_cannot_be_written_are_one_sentence(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is an existing file"):
        RunDirectory(blocker).check_writable()
    with pytest.raises(ValueError, match="which is a file"):
        RunDirectory(blocker / "run").check_writable()
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not writable"):
            RunDirectory(locked / "run").check_writable()


def test_temporary_checkpoints_of_a_crashed_writer_are_removed_on_resume(tmp_path):
    train_model(feature_config(epochs=2), feature_data(), None, tmp_path, **QUIET)
    store = CheckpointStore(tmp_path / "checkpoints")
    stale = tmp_path / "checkpoints" / ".epoch-0003.tmp-99999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (tmp_path / "model" / "config.json").unlink()  # pretend the run had not finished
    (tmp_path / "model" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="train.epochs: 2 vs 3"):
        train_model(feature_config(epochs=3), feature_data(), None, tmp_path, resume=True, **QUIET)
    assert not stale.exists()  # cleaned before anything else, under the lock
    assert [p.name for p in store.complete()] == ["epoch-0001", "epoch-0002"]


def test_a_checkpoint_keeps_the_optimizer_and_the_trainer_state(tmp_path):
    train_model(feature_config(epochs=2, ema_decay=0.5), feature_data(), None, tmp_path, **QUIET)
    store = CheckpointStore(tmp_path / "checkpoints")
    state = store.read_state(store.latest())
    assert state["epoch"] == 2 and state["ema_updates"] == 2 * 3
    assert set(state["optimizers"]) == {"network", "codebooks"}
    assert json.loads((store.latest() / "config.json").read_text())["train"]["ema_decay"] == 0.5
