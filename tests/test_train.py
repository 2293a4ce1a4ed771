"""Config validation, augmentation, the training loop (phases, checkpoints, resume, NaN,
time budget) and the `train` / `demo` commands, on tiny data."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dpq.cli import main
from dpq.config import (
    ABLATIONS,
    DPQConfig,
    LossConfig,
    ModelConfig,
    QuantizerConfig,
    TrainConfig,
    ablation_config,
)
from dpq.model import DPQModel
from dpq.train import (
    ArrayDataset,
    Trainer,
    TrainingDiverged,
    crop_flip,
    cutout,
    learning_rate,
    load_training_source,
    train_model,
)

QUIET = {"progress": False, "log": lambda message: None}


def feature_data(n: int = 120, dim: int = 12, classes: int = 3, seed: int = 0) -> ArrayDataset:
    """Gaussian blobs: one direction per class plus noise, float32 (n, dim)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(size=(classes, dim)) * 2.0
    features = centres[labels] + rng.normal(size=(n, dim))
    return ArrayDataset(features.astype(np.float32), labels.astype(np.int64))


def feature_config(**train) -> DPQConfig:
    options = {"epochs": 4, "batch_size": 40, "lr": 0.05, "keep_checkpoints": 10, **train}
    return DPQConfig(
        model=ModelConfig(backbone="identity", backbone_kwargs={"in_features": 12}, num_classes=3),
        quantizer=QuantizerConfig(num_levels=2, codebook_size=8, dim=6),
        loss=LossConfig(use_semantic=False),
        train=TrainConfig(**options),
    )


@pytest.fixture(scope="module")
def digits():
    from dpq.data import load_digits

    dataset = load_digits()
    keep = np.concatenate([np.flatnonzero(dataset.labels == c)[:24] for c in range(10)])
    return ArrayDataset(np.asarray(dataset.images)[keep], dataset.labels[keep])


def digits_config(**train) -> DPQConfig:
    options = {"epochs": 3, "batch_size": 48, "lr": 0.05, "crop_pad": 1, "flip": False, **train}
    return DPQConfig(
        model=ModelConfig(backbone="small_cnn", backbone_kwargs={"width": 0.25}, num_classes=10),
        quantizer=QuantizerConfig(num_levels=2, codebook_size=16, dim=12),
        train=TrainConfig(**options),
    )


def orthogonal(classes: int, dim: int) -> np.ndarray:
    from dpq.experiments import orthogonal_label_embeddings

    return orthogonal_label_embeddings(classes, dim)


# ------------------------------------------------------------------------------ config


def test_config_json_round_trip(tmp_path):
    config = DPQConfig(
        model=ModelConfig(backbone_kwargs={"width": 0.75}, image_mean=(0.1, 0.2, 0.3)),
        loss=LossConfig(level_weights=(1.0, 1.0, 0.5, 0.5)),
        train=TrainConfig(time_budget_minutes=12.5, cutout=8),
    )
    assert DPQConfig.from_json(config.to_json()) == config
    (tmp_path / "c.json").write_text(config.to_json())
    assert DPQConfig.load(tmp_path / "c.json") == config
    partial = DPQConfig.from_dict({"quantizer": {"num_levels": 2}})
    assert partial.quantizer.num_levels == 2 and partial.train == TrainConfig()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"quantizer": {"codebook_size": 100}}, "power of two"),
        ({"quantizer": {"similarity": "dot"}}, "similarity"),
        ({"train": {"schedule": "alternating"}}, "schedule"),
        ({"train": {"epochs": 0}}, "epochs"),
        ({"train": {"lr": -1}}, "lr"),
        ({"train": {"bf16": "yes"}}, "bf16"),
        ({"train": {"randaugment_magnitude": 31}}, "0..30"),
        ({"train": {"randaugment_ops": -1}}, "randaugment_ops"),
        ({"loss": {"level_weights": [1, 1]}}, "level_weights has 2 entries"),
        ({"loss": {"tau": float("nan")}}, "tau"),
        ({"model": {"classifier_input": "fc7"}}, "classifier_input"),
        ({"model": {"image_std": [0.2, 0.2]}}, "image_std"),
        ({"model": {"depth": 3}}, "unknown keys"),
        ({"extras": {}}, "unknown sections"),
        (
            {
                "loss": {
                    "use_semantic": False,
                    "use_cls": False,
                    "use_soft": False,
                    "use_hard": False,
                    "use_match": False,
                }
            },
            "switched off",
        ),
    ],
)
def test_config_validation(data, message):
    with pytest.raises(ValueError, match=message):
        DPQConfig.from_dict(data)


def test_ablations_are_configurations():
    full = ablation_config("full")
    assert full == DPQConfig()
    assert not ablation_config("E").loss.use_semantic and not ablation_config("E").loss.use_cls
    assert ablation_config("E+LS").loss.use_semantic and not ablation_config("E+LS").loss.use_cls
    assert ablation_config("E+LC").loss.use_cls and not ablation_config("E+LC").loss.use_semantic
    assert ablation_config("two-step").train.schedule == "two_step"
    no_soft = ablation_config("no-soft").loss
    assert no_soft.use_hard and not no_soft.use_soft and not no_soft.use_match
    assert ablation_config("two-phase").train.schedule == "two_phase"
    assert set(ABLATIONS) >= {"full", "E", "E+LS", "E+LC", "two-step", "no-soft"}
    with pytest.raises(ValueError, match="unknown ablation"):
        ablation_config("E+XYZ")


def test_recipes_by_name_or_file(tmp_path):
    from dpq.config import RECIPES, cifar10_recipe, load_recipe

    assert load_recipe("default") == DPQConfig()
    recipe = load_recipe("cifar10")
    assert recipe == cifar10_recipe() and set(RECIPES) == {"default", "cifar10"}
    assert recipe.model.normalize_features and recipe.train.time_budget_minutes == 30.0
    assert recipe.model.feature == "class_posterior"
    assert ablation_config("E+LC", recipe).model == recipe.model
    assert ablation_config("E+LS", recipe).model == recipe.model.__class__(
        **{**recipe.to_dict()["model"], "feature": "semantic"}
    )
    path = tmp_path / "recipe.json"
    path.write_text(recipe.to_json())
    assert load_recipe(path) == recipe
    with pytest.raises(ValueError, match="neither a recipe name"):
        load_recipe("cifar100")


# ------------------------------------------------------------------------------ augmentation


def test_crop_flip_is_a_reflect_padded_crop():
    images = torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, size=(6, 5, 7, 3), dtype=np.uint8)
    )
    assert torch.equal(crop_flip(images, np.random.default_rng(1), 0, False), images)
    out = crop_flip(images, np.random.default_rng(1), 2, True).numpy()
    padded = np.pad(images.numpy(), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    for i in range(6):
        candidates = [
            crop
            for y in range(5)
            for x in range(5)
            for crop in (padded[i, y : y + 5, x : x + 7], padded[i, y : y + 5, x : x + 7][:, ::-1])
        ]
        assert any(np.array_equal(out[i], c) for c in candidates)


def test_cutout_zeroes_one_square():
    images = torch.ones(4, 3, 10, 10)
    out = cutout(images, np.random.default_rng(0), 4)
    zeros = (out == 0).all(dim=1)  # (B, H, W)
    for i in range(4):
        count = int(zeros[i].sum())
        assert 4 <= count <= 16
        rows, cols = torch.nonzero(zeros[i], as_tuple=True)
        assert count == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert torch.equal(images, torch.ones(4, 3, 10, 10))


def test_learning_rate_schedules():
    total = 100
    onecycle = [learning_rate(s, total, 1.0, "onecycle", 0.2) for s in range(total)]
    assert onecycle[19] == pytest.approx(1.0) and onecycle[-1] == pytest.approx(0.0)
    assert all(a <= b for a, b in zip(onecycle[:20], onecycle[1:20], strict=False))
    cosine = [learning_rate(s, total, 1.0, "cosine", 0.1) for s in range(total)]
    assert max(cosine) == pytest.approx(1.0) and cosine[-1] == pytest.approx(0.0, abs=1e-9)
    assert learning_rate(5, total, 0.3, "constant", 0.2) == 0.3


# ------------------------------------------------------------------------------ training


def test_short_image_training_reduces_the_loss(tmp_path, digits):
    config = digits_config(epochs=4, quantization_start=0.0)
    result = train_model(config, digits, orthogonal(10, 12), tmp_path, **QUIET)
    totals = [record["total"] for record in result.history]
    assert len(totals) == 4 and totals[-1] < totals[0]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "train_log.jsonl").read_text().count("\n") == 4
    loaded = DPQModel.from_checkpoint(tmp_path / "model", config=config)
    np.testing.assert_array_equal(
        loaded.encode(digits.images[:5]), result.model.encode(digits.images[:5])
    )


@pytest.mark.parametrize(
    "train",
    [
        {"schedule": "two_phase", "ema_decay": 0.9, "cutout": 3, "mixup_alpha": 0.4},
        {"bf16": True, "channels_last": True, "optimizer": "adam", "lr": 0.003},
        {"randaugment_ops": 2, "randaugment_magnitude": 12},
    ],
)
def test_training_options_run(tmp_path, digits, train):
    config = digits_config(epochs=2, **train)
    result = train_model(config, digits, orthogonal(10, 12), tmp_path, **QUIET)
    assert result.epochs == 2 and all(np.isfinite(r["total"]) for r in result.history)
    assert np.isfinite(result.model.extract_features(digits.images[:4])).all()


def test_checkpoints_every_epoch(tmp_path):
    result = train_model(
        feature_config(epochs=3, keep_checkpoints=2), feature_data(), None, tmp_path, **QUIET
    )
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["epoch-0002", "epoch-0003"]
    state = json.loads((tmp_path / "checkpoints/epoch-0003/trainer_state.json").read_text())
    assert state["epoch"] == 3 and state["epochs"] == 3 and len(state["history"]) == 3
    assert result.history == state["history"]


def test_resume_continues_from_the_saved_epoch_and_matches(tmp_path):
    data = feature_data()
    config = feature_config(epochs=4, quantization_start=0.5)
    full = train_model(config, data, None, tmp_path / "full", **QUIET)
    # an interrupted run: only the checkpoint after epoch 2 survived
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "full/checkpoints/epoch-0002", tmp_path / "cut/checkpoints/epoch-0002"
    )
    resumed = train_model(config, data, None, tmp_path / "cut", resume=True, **QUIET)
    assert resumed.resumed_from_epoch == 2 and resumed.epochs == 4
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    for name, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_resume_after_the_process_is_killed(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_train import feature_config, feature_data
        from dpq.train import train_model
        train_model(feature_config(epochs=100), feature_data(), None, {str(tmp_path)!r},
                    progress=False, log=lambda m: None)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", script], env=env)
    marker = tmp_path / "checkpoints" / "epoch-0002"
    deadline = time.monotonic() + 120
    try:
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, "the training finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    saved = max(int(p.name[6:]) for p in (tmp_path / "checkpoints").glob("epoch-*"))
    assert 2 <= saved < 100 and not (tmp_path / "model").exists()
    result = train_model(
        feature_config(epochs=100), feature_data(), None, tmp_path, resume=True, **QUIET
    )
    assert result.resumed_from_epoch == saved and result.epochs == 100
    assert (tmp_path / "model" / "config.json").is_file()


def test_a_second_run_needs_resume_and_the_same_config(tmp_path):
    data = feature_data()
    with pytest.raises(ValueError, match="nothing to resume"):
        train_model(feature_config(epochs=1), data, None, tmp_path, resume=True, **QUIET)
    train_model(feature_config(epochs=1), data, None, tmp_path, **QUIET)
    with pytest.raises(ValueError, match="already holds a training run"):
        train_model(feature_config(epochs=1), data, None, tmp_path, **QUIET)
    with pytest.raises(ValueError, match="train.lr: 0.05 vs 0.1"):
        train_model(feature_config(epochs=1, lr=0.1), data, None, tmp_path, resume=True, **QUIET)
    other = feature_data(seed=1)
    with pytest.raises(ValueError, match="different training set"):
        train_model(feature_config(epochs=1), other, None, tmp_path, resume=True, **QUIET)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"epoch \d+.*learning rate is probably too high"):
        train_model(feature_config(epochs=4, lr=1e10), feature_data(), None, tmp_path, **QUIET)
    assert not (tmp_path / "model").exists()
    for checkpoint in (tmp_path / "checkpoints").glob("epoch-*"):
        weights = load_file(str(checkpoint / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
        DPQModel.from_checkpoint(checkpoint)


def test_two_phase_keeps_e_away_from_the_network():
    torch.manual_seed(0)
    model = DPQModel(feature_config())
    x = torch.from_numpy(feature_data().images[:10])
    out = model(x, detach_quantizer_input=True)
    energy = (out.quantizer_input[:, None] - out.quantized.hard.cumsum(1)).pow(2).sum()
    (energy + out.quantized.soft.pow(2).sum()).backward()
    assert model.semantic_head.weight.grad is None
    assert model.quantizer.codebooks.grad.abs().sum() > 0


def test_two_step_freezes_the_network_in_its_second_step(tmp_path):
    config = feature_config(epochs=4, schedule="two_step", quantization_start=0.5)
    result = train_model(config, feature_data(), None, tmp_path, **QUIET)
    after_features = load_file(str(tmp_path / "checkpoints/epoch-0002/model.safetensors"))
    final = result.model.state_dict()
    torch.testing.assert_close(
        final["semantic_head.weight"], after_features["semantic_head.weight"]
    )
    assert not torch.equal(final["quantizer.codebooks"], after_features["quantizer.codebooks"])
    assert [r["phase"] for r in result.history] == ["features"] * 2 + ["quantization"] * 2


def test_time_budget_fixes_the_epoch_count(tmp_path):
    messages = []
    config = feature_config(epochs=1000, time_budget_minutes=0.05)
    result = train_model(
        config, feature_data(), None, tmp_path, progress=False, log=messages.append
    )
    assert result.planned["source"] == "time_budget"
    assert result.epochs == result.planned["epochs"] >= 1 and len(result.history) == result.epochs
    assert any("time budget" in m and f"-> {result.epochs} epochs" in m for m in messages)


def test_time_budget_shrinks_the_plan_when_epochs_are_slower(tmp_path):
    config = feature_config(epochs=1000, time_budget_minutes=1.0)
    trainer = Trainer(config, DPQModel(config), feature_data(), None, tmp_path, **QUIET)
    now = time.perf_counter()
    # 30 s of the 60 s budget gone, 10 s per epoch: 60 - 30 - (10/3 + 10 + 1.8) = 14.9 s left,
    # room for one more epoch after the first one
    assert trainer._replan(now - 30.0, 10.0, 50) == 2
    # the plan grows only when asked to, and never drops below the epochs that already ran
    assert trainer._replan(now, 0.01, 7) == 7
    # 60 - (10/3 + 10 + 1.8) = 44.9 s left at 10 s per epoch: 1 + 4 epochs fit
    assert trainer._replan(now, 10.0, 2, grow=True) == 5
    assert trainer._replan(now - 30.0, 10.0, 50, grow=True) == 2
    assert trainer._replan(now - 120.0, 10.0, 50) == 1
    # later in the run: 3 epochs done, 60 - 30 - (5/3 + 10 + 1.8) = 16.5 s left at 5 s per
    # epoch -> 3 more
    assert trainer._replan(now - 30.0, 5.0, 50, done=3) == 3 + 3
    assert trainer._replan(now - 120.0, 5.0, 50, done=3) == 3


def test_a_run_that_slows_down_stops_within_its_budget(tmp_path, monkeypatch):
    """Steps that become 4x slower after the plan was made: the trainer shortens the run
    (keeping at least one quantization epoch) instead of overrunning the budget by ~4x."""
    config = feature_config(epochs=1000, time_budget_minutes=0.25, keep_checkpoints=1)
    trainer = Trainer(config, DPQModel(config), feature_data(), None, tmp_path, **QUIET)
    original = trainer._forward_loss

    def slow_forward_loss(*args, **kwargs):
        time.sleep(0.02)
        return original(*args, **kwargs)

    planned = {}

    def plan_then_slow_down(started):
        epochs, plan = Trainer._plan_epochs(trainer, started)
        planned.update(plan)
        monkeypatch.setattr(trainer, "_forward_loss", slow_forward_loss)
        return epochs, plan

    monkeypatch.setattr(trainer, "_plan_epochs", plan_then_slow_down)
    begin = time.perf_counter()
    result = trainer.train()
    elapsed = time.perf_counter() - begin
    assert result.epochs < planned["epochs"] and result.planned["replanned_after_epoch"] >= 1
    assert elapsed < 0.25 * 60
    assert any(r["phase"] == "quantization" for r in result.history)


def test_a_run_whose_first_plan_was_pessimistic_grows_within_the_warm_up(tmp_path, monkeypatch):
    """The step timing said 10x slower than the real epochs: the plan grows after the first
    epochs (while the learning rate warms up), and the run still ends within its budget."""
    config = feature_config(
        epochs=1000, time_budget_minutes=0.2, keep_checkpoints=1, warmup_fraction=0.5
    )
    trainer = Trainer(config, DPQModel(config), feature_data(), None, tmp_path, **QUIET)
    original_time_steps = trainer._time_steps
    monkeypatch.setattr(trainer, "_time_steps", lambda: 10.0 * original_time_steps())
    messages = []
    trainer.log = messages.append
    begin = time.perf_counter()
    result = trainer.train()
    elapsed = time.perf_counter() - begin
    first_plan = int(messages[0].rsplit("-> ", 1)[1].split()[0])
    assert result.epochs > first_plan
    assert any("to use the time budget" in m for m in messages)
    assert elapsed < 0.2 * 60
    assert any(r["phase"] == "quantization" for r in result.history)


def test_a_plan_cut_by_a_passing_slowdown_grows_back_to_the_first_plan(tmp_path, monkeypatch):
    """Epochs 3-5 are slow (another process), the others are not: the plan shrinks, then grows
    back, but never beyond the first plan once the warm-up is over. A fake clock that only
    the training steps advance makes this independent of the machine's load."""
    import types

    config = feature_config(epochs=1000, time_budget_minutes=1.0, warmup_fraction=0.0)
    trainer = Trainer(config, DPQModel(config), feature_data(), None, tmp_path, **QUIET)
    messages = []
    trainer.log = messages.append
    clock = {"now": 0.0, "steps": 0}
    steps_per_epoch = trainer.steps_per_epoch()
    original = trainer._forward_loss

    def forward_loss(*args, **kwargs):
        epoch = clock["steps"] // steps_per_epoch
        clock["steps"] += 1
        clock["now"] += (2.0 if 2 <= epoch < 5 else 0.5) / steps_per_epoch
        return original(*args, **kwargs)

    fake_time = types.SimpleNamespace(perf_counter=lambda: clock["now"])
    monkeypatch.setattr("dpq.train.time", fake_time)
    monkeypatch.setattr(trainer, "_forward_loss", forward_loss)
    monkeypatch.setattr(trainer, "_time_steps", lambda: 0.5 / steps_per_epoch)
    result = trainer.train()
    # 60 s - (0.5/3 + 10 + 1.8) s of fixed costs = 48 s at 0.5 s per epoch -> 96 epochs
    assert messages[0].endswith("-> 96 epochs")
    shrunk = [m for m in messages if "to stay within the time budget" in m]
    grown = [m for m in messages if "to use the time budget" in m]
    assert shrunk and grown and messages.index(shrunk[0]) < messages.index(grown[0])
    assert 80 < result.epochs <= 96
    assert clock["now"] <= 60.0


def test_missing_classes_and_word_vector_mismatch(tmp_path, digits):
    config = digits_config(epochs=1)
    eight_classes = ArrayDataset(digits.images[digits.labels < 8], digits.labels[digits.labels < 8])
    with pytest.raises(ValueError, match="holds 8 classes but the model"):
        Trainer(config, DPQModel(config), eight_classes, orthogonal(10, 12), tmp_path, **QUIET)
    with pytest.raises(ValueError, match="12 rows but the data has 10 classes"):
        Trainer(config, DPQModel(config), digits, orthogonal(12, 12), tmp_path, **QUIET)


# ------------------------------------------------------------------------------ commands


def test_demo_runs_through_main(capsys):
    argv = ["demo", "--epochs", "2", "--train-per-class", "30", "--query-per-class", "5"]
    assert main([*argv, "--num-levels", "2", "--dim", "16", "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if " bit " in line]
    assert [int(r[0]) for r in rows] == [8, 16]
    assert all(0.0 <= float(r[2]) <= 1.0 for r in rows)
    assert "300 train / 50 query / 1447 database" in out and "mAP@1447" in out


def train_digits_argv(out: Path, codebook_size: int = 16, epochs: int = 1) -> list[str]:
    """`dpq train` on a small per-class digits split (26 train / 5 query per class)."""
    return [
        "train", "digits", "--backbone", "small_cnn", "--width", "0.25", "--split", "per-class",
        "--train-per-class", "26", "--query-per-class", "5", "--num-levels", "2",
        "--codebook-size", str(codebook_size), "--dim", "12", "--epochs", str(epochs),
        "--batch-size", "64", "--word-vectors", "orthogonal", "--out", str(out), "--quiet",
    ]  # fmt: skip


def test_train_command_writes_a_model_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_digits_argv(out)
    assert main(argv) == 0
    assert "model saved to" in capsys.readouterr().out
    assert (out / "model" / "model.safetensors").is_file() and (out / "split.json").is_file()
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0


def test_evaluate_command_scores_a_trained_model_on_its_split(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_digits_argv(out, codebook_size=256, epochs=2)) == 0  # 8-bit levels
    capsys.readouterr()
    results = tmp_path / "evaluation.json"
    evaluate = [
        "evaluate", "--model", str(out / "model"), "--images", "digits",
        "--split", str(out / "split.json"), "--baselines", "pq", "--out", str(results),
        "--no-progress",
    ]  # fmt: skip
    assert main(evaluate) == 0
    printed = capsys.readouterr().out
    assert "50 queries, 1487 database items" in printed and "mAP@1487" in printed
    saved = json.loads(results.read_text())
    assert set(saved["map"]) == {"8", "16"} and 0.0 <= saved["map"]["16"] <= 1.0
    assert set(saved["details"]["map"]) == {"dpq", "pq"} and 0.0 <= saved["float_map"] <= 1.0
    assert saved["details"]["baselines_fitted_on"] == "train"
    # the model's own evaluation is the same as the reproduce/demo path's
    assert 0.0 <= saved["database_accuracy"] <= 1.0
    # half a model input, or the two modes mixed, are refused with the fix
    assert main(["evaluate", "--model", str(out / "model"), "--images", "digits"]) == 2
    assert "--split" in capsys.readouterr().err
    assert main([*evaluate, "--query-features", str(results)]) == 2
    assert "saved-features mode" in capsys.readouterr().err
    assert main(["evaluate", "--db-labels", str(results)]) == 2
    assert "--query-features, --query-labels" in capsys.readouterr().err


def test_a_class_posterior_model_builds_inner_product_indexes(tmp_path, capsys):
    from dpq.index import DPQIndex

    out = tmp_path / "run"
    assert main([*train_digits_argv(out), "--feature", "class_posterior"]) == 0
    model = DPQModel.from_checkpoint(out / "model")
    assert model.config.model.feature == "class_posterior"
    index_path = tmp_path / "index.npz"
    encode = ["encode", "--model", str(out / "model"), "--images", "digits", "--quiet"]
    assert main([*encode, "--out", str(index_path)]) == 0
    index = DPQIndex.load(index_path)
    assert index.search_mode == "ip" and "search ip" in capsys.readouterr().out
    features = model.extract_features(load_training_source("digits")[0][:20])
    np.testing.assert_allclose(features[:, :10].sum(1), 12**0.5, rtol=1e-5)  # sqrt(D) p
    assert (features[:, 10:] == 0).all()
    np.testing.assert_array_equal(
        index.search(features, 5)[1], index.search(features, 5, mode="ip")[1]
    )
    assert main([*encode, "--search-mode", "aqd", "--out", str(tmp_path / "aqd.npz")]) == 0
    assert DPQIndex.load(tmp_path / "aqd.npz").search_mode == "aqd"


def test_train_command_rejects_bad_settings(tmp_path, capsys):
    base = ["train", "digits", "--out", str(tmp_path / "x"), "--quiet", "--epochs", "1"]
    assert main([*base, "--codebook-size", "100"]) == 2
    assert "power of two" in capsys.readouterr().err
    assert main([*base, "--backbone", "small_cnn"]) == 2
    assert "word vector" in capsys.readouterr().err


def test_reproduce_cifar10_smoke(tmp_path, monkeypatch):
    """The reproduce flow (load, split, train, encode, AQD search, results, report) on 150
    real CIFAR-10 images in the folder layout, with a small per-class split."""
    import zipfile

    from dpq.data import CIFAR10_CLASSES
    from dpq.experiments import reproduce_cifar10

    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    source = shared / "cifar10" / "cifar10-jpeg.zip"
    if not source.is_file():
        pytest.skip(f"the offline CIFAR-10 copy is not at {source}")
    monkeypatch.setenv("DPQ_CACHE_DIR", str(tmp_path / "cache"))
    small = tmp_path / "cifar-small.zip"
    with zipfile.ZipFile(source) as full, zipfile.ZipFile(small, "w") as out:
        for split, count in (("train", 10), ("test", 5)):
            for name in CIFAR10_CLASSES:
                members = sorted(
                    n
                    for n in full.namelist()
                    if n.startswith(f"{split}/{name}/") and n.endswith(".jpg")
                )
                for member in members[:count]:
                    out.writestr(member, full.read(member))
    recipe = DPQConfig(
        model=ModelConfig(backbone_kwargs={"width": 0.125}),
        # 80 training images < K: codebooks start from N(0, 0.01) instead of k-means
        quantizer=QuantizerConfig(num_levels=2, codebook_size=256, dim=300, init="normal"),
        train=TrainConfig(batch_size=40),
    )
    results = reproduce_cifar10(
        tmp_path / "run",
        data=small,
        base_config=recipe,
        epochs=1,
        word_vectors=shared / "wordvec" / "cifar10.txt",
        progress=False,
        log=lambda message: None,
        train_per_class=8,
        query_per_class=2,
    )
    evaluation = results["evaluation"]
    assert evaluation["num_queries"] == 20 and evaluation["num_database"] == 50
    assert evaluation["r"] == 50 and set(evaluation["map"]) == {"8", "16"}
    assert all(0.0 <= value <= 1.0 for value in evaluation["map"].values())
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["evaluation"]["map"] == evaluation["map"] and saved["epochs"] == 1
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "paper DPQ" in report and (tmp_path / "run" / "report" / "pr_16bits.png").is_file()
    assert 0.0 <= evaluation["database_accuracy"] <= 1.0
    assert 0.0 <= evaluation["class_probability_map"] <= 1.0


def test_class_probability_map_equals_a_full_ranking_by_probability_distance():
    from dpq.experiments import class_probability_map
    from dpq.metrics import map_at_r

    rng = np.random.default_rng(0)
    query_labels, database_labels = rng.integers(0, 4, 37), rng.integers(0, 4, 211)
    query_logits = rng.normal(size=(37, 4)) + 2.0 * np.eye(4)[query_labels]
    database_logits = rng.normal(size=(211, 4)) + 2.0 * np.eye(4)[database_labels]

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    qp, dp = softmax(query_logits), softmax(database_logits)
    distances = ((qp[:, None, :] - dp[None, :, :]) ** 2).sum(2)  # the slow way: (nq, N, C)
    expected = map_at_r(np.argsort(distances, axis=1, kind="stable"), query_labels, database_labels)
    for chunk in (5, 64):
        got = class_probability_map(
            query_logits, database_logits, query_labels, database_labels, 211, chunk=chunk
        )
        assert got == pytest.approx(expected, abs=1e-12)
    # a classifier that is always right and sure ranks every relevant item first
    perfect = class_probability_map(
        50.0 * np.eye(4)[query_labels], 50.0 * np.eye(4)[database_labels],
        query_labels, database_labels, 211,
    )  # fmt: skip
    assert perfect == pytest.approx(1.0)
