"""dpq.training.loop: the training loop (phases, checkpoints, resume, NaN, time budget with a fake
clock), on tiny data; its parts are tested alone in tests/test_training_*.py."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    QUIET,
    FakeClock,
    digits_config,
    feature_config,
    feature_data,
    orthogonal,
    wait_until,
)
from dpq.model.network import DPQModel
from dpq.training.loop import ArrayDataset, Trainer, TrainingDiverged, train_model

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


def test_training_options_each_do_what_they_say(tmp_path, digits):
    vectors = orthogonal(10, 12)
    plain = train_model(digits_config(epochs=2), digits, vectors, tmp_path / "plain", **QUIET)
    assert plain.precision == "fp32" and "train_accuracy" in plain.history[0]
    # weight average: the final weights are the average, not the last step's weights
    ema = train_model(
        digits_config(epochs=2, ema_decay=0.9), digits, vectors, tmp_path / "ema", **QUIET
    )
    last = tmp_path / "ema" / "checkpoints" / "epoch-0002"
    raw = load_file(str(last / "model.safetensors"))
    averaged = load_file(str(last / "optimizer.safetensors"))
    final = ema.model.state_dict()
    name = "semantic_head.weight"
    torch.testing.assert_close(final[name], averaged[f"ema.{name}"])
    assert not torch.equal(final[name], raw[name])
    # bf16 autocast and channels-last memory: used, and close to float32 but not equal
    fast = train_model(
        digits_config(epochs=2, precision="bf16", channels_last=True),
        digits,
        vectors,
        tmp_path / "bf16",
        **QUIET,
    )
    assert fast.precision == "bf16"
    conv = next(m for m in fast.model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    first = [run.history[0]["total"] for run in (plain, fast)]
    assert first[0] != first[1] and first[1] == pytest.approx(first[0], rel=0.05)
    # mixup turns targets into mixed probabilities (so no hard-label accuracy is counted);
    # RandAugment changes the images the network sees (so the losses change)
    mixed = train_model(
        digits_config(epochs=1, mixup_alpha=0.4), digits, vectors, tmp_path / "mix", **QUIET
    )
    assert "train_accuracy" not in mixed.history[0]
    augmented = train_model(
        digits_config(epochs=2, randaugment_ops=2, randaugment_magnitude=12),
        digits,
        vectors,
        tmp_path / "ra",
        **QUIET,
    )
    assert augmented.history[0]["total"] != plain.history[0]["total"]


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
        from conftest import feature_config, feature_data
        from dpq.training.loop import train_model
        train_model(feature_config(epochs=100), feature_data(), None, {str(tmp_path)!r},
                    progress=False, log=lambda m: None)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", script], env=env)
    marker = tmp_path / "checkpoints" / "epoch-0002"
    try:
        wait_until(
            lambda: marker.exists() or process.poll() is not None,
            120,
            "epoch 2's checkpoint (or the training's end)",
            interval=0.02,
        )
        assert process.poll() is None, "the training finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()  # a no-op after the SIGKILL above; ends it when a wait failed
        process.wait(30)
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


class _ClockedTrainer:
    """A Trainer whose fake clock only the training steps advance: ``seconds(epoch)`` per
    epoch, spread over its steps; the throw-away step timing says ``timed`` s per epoch."""

    def __init__(self, tmp_path, monkeypatch, minutes, seconds, timed, **train):
        config = feature_config(epochs=1000, time_budget_minutes=minutes, **train)
        self.clock = FakeClock()
        self.messages: list[str] = []
        self.trainer = Trainer(
            config,
            DPQModel(config),
            feature_data(),
            None,
            tmp_path,
            progress=False,
            log=self.messages.append,
            clock=self.clock,
        )
        steps = self.trainer.steps_per_epoch()
        original = self.trainer._forward_loss
        self.steps = 0

        def forward_loss(*args, **kwargs):
            epoch = self.steps // steps
            self.steps += 1
            self.clock.advance(seconds(epoch) / steps)
            return original(*args, **kwargs)

        monkeypatch.setattr(self.trainer, "_forward_loss", forward_loss)
        monkeypatch.setattr(self.trainer, "_seconds_per_step", lambda: timed / steps)

    def train(self):
        return self.trainer.train()


def test_a_run_that_slows_down_stops_within_its_budget(tmp_path, monkeypatch):
    """Epochs that become 4x slower after the plan was made: the trainer shortens the run
    (keeping at least one quantization epoch) instead of overrunning the budget by ~4x."""
    run = _ClockedTrainer(tmp_path, monkeypatch, 0.25, lambda epoch: 0.4, timed=0.1)
    result = run.train()
    first_plan = int(run.messages[0].rsplit("-> ", 1)[1].split()[0])
    assert result.epochs < first_plan and result.planned["replanned_after_epoch"] >= 1
    assert run.clock.now <= 0.25 * 60
    assert any(r["phase"] == "quantization" for r in result.history)


def test_a_run_whose_first_plan_was_pessimistic_grows_within_the_warm_up(tmp_path, monkeypatch):
    """The step timing said 10x slower than the real epochs: the plan grows after the first
    epochs (while the learning rate warms up), and the run still ends within its budget."""
    run = _ClockedTrainer(
        tmp_path, monkeypatch, 0.5, lambda epoch: 0.4, timed=1.0, warmup_fraction=0.5
    )
    result = run.train()
    first_plan = int(run.messages[0].rsplit("-> ", 1)[1].split()[0])
    assert result.epochs > first_plan
    assert any("to use the time budget" in m for m in run.messages)
    assert run.clock.now <= 0.5 * 60
    assert any(r["phase"] == "quantization" for r in result.history)


def test_a_plan_cut_by_a_passing_slowdown_grows_back_to_the_first_plan(tmp_path, monkeypatch):
    """Epochs 3-5 are slow (another process), the others are not: the plan shrinks, then grows
    back, but never beyond the first plan once the warm-up is over."""
    run = _ClockedTrainer(
        tmp_path,
        monkeypatch,
        1.0,
        lambda epoch: 4.0 if 2 <= epoch < 5 else 1.0,
        timed=1.0,
        warmup_fraction=0.0,
    )
    result = run.train()
    # 60 s - (1/3 + 10 + 1.8) s of fixed costs = 47.9 s at 1 s per epoch -> 47 epochs
    assert run.messages[0].endswith("-> 47 epochs")
    shrunk = [m for m in run.messages if "to stay within the time budget" in m]
    grown = [m for m in run.messages if "to use the time budget" in m]
    assert shrunk and grown and run.messages.index(shrunk[0]) < run.messages.index(grown[0])
    assert 47 - 10 <= result.epochs <= 47  # the 9 s lost to the slowdown cost ~9 epochs
    assert run.clock.now <= 60.0


def test_missing_classes_and_word_vector_mismatch(tmp_path, digits):
    config = digits_config(epochs=1)
    eight_classes = ArrayDataset(digits.images[digits.labels < 8], digits.labels[digits.labels < 8])
    with pytest.raises(ValueError, match="holds 8 classes but the model"):
        Trainer(config, DPQModel(config), eight_classes, orthogonal(10, 12), tmp_path, **QUIET)
    with pytest.raises(ValueError, match="12 rows but the data has 10 classes"):
        Trainer(config, DPQModel(config), digits, orthogonal(12, 12), tmp_path, **QUIET)


# ------------------------------------------------------------------------------ commands


def test_resuming_with_other_data_says_the_training_set_differs(tmp_path, digits):
    from dpq.training.experiments import complete_config

    vectors = orthogonal(10, 12)
    run = train_model(digits_config(epochs=2), digits, vectors, tmp_path, **QUIET)
    assert run.epochs == 2
    (tmp_path / "model" / "config.json").unlink()  # as if the run had been interrupted
    brighter = ArrayDataset(np.clip(digits.images.astype(int) + 40, 0, 255).astype(np.uint8),
                            digits.labels)  # fmt: skip
    from dpq.data import Source

    source = Source(brighter.images, brighter.labels, [str(i) for i in range(10)], "digits", "x")
    config = complete_config(digits_config(epochs=2), source, brighter.images)
    with pytest.raises(ValueError, match="different training set .*image statistics"):
        train_model(config, brighter, vectors, tmp_path, resume=True, **QUIET)


# ------------------------------------------------------------------------------ streaming,
# devices, precision, pretrained backbones


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """4 classes x 12 random 16 x 16 PNGs (48 images)."""
    from conftest import make_image_folder

    root = tmp_path_factory.mktemp("tiny-folder")
    make_image_folder(root, {name: 12 for name in "abcd"}, size=16, seed=5)
    return root


def _folder_config(**train):
    from dpq.config import DPQConfig, ModelConfig, QuantizerConfig, TrainConfig

    options = {"epochs": 2, "batch_size": 16, "lr": 0.05, "quantization_start": 0.5, **train}
    return DPQConfig(
        model=ModelConfig(backbone="small_cnn", backbone_kwargs={"width": 0.25}, num_classes=4),
        quantizer=QuantizerConfig(num_levels=2, codebook_size=8, dim=8),
        train=TrainConfig(**options),
    )


def test_streamed_and_in_memory_training_see_the_same_batches(tmp_path, tiny_folder, monkeypatch):
    from dpq.data import load_source
    from dpq.training.batches import EpochBatches

    seen: dict[str, list[torch.Tensor]] = {"memory": [], "stream": []}
    original = EpochBatches.prepare
    current = []

    def spy(self, raw, index, rng, augment):
        x, targets = original(self, raw, index, rng, augment)
        seen[current[-1]].append(x.detach().clone())
        return x, targets

    monkeypatch.setattr(EpochBatches, "prepare", spy)
    histories = {}
    for mode, in_memory, workers in (("memory", True, None), ("stream", False, 2)):
        current.append(mode)
        source = load_source(tiny_folder, image_size=16, in_memory=in_memory)
        assert isinstance(source.inputs, np.ndarray) == in_memory
        result = train_model(
            _folder_config(),
            ArrayDataset(source.inputs, source.labels),
            orthogonal(4, 8),
            tmp_path / mode,
            workers=workers,
            **QUIET,
        )
        histories[mode] = result.history
    assert len(seen["memory"]) == len(seen["stream"]) == 2 * 3  # 2 epochs of 48 // 16 steps
    for a, b in zip(seen["memory"], seen["stream"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(histories["memory"], histories["stream"], strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {
            k: v for k, v in b.items() if k != "seconds"
        }


def test_fp16_trains_with_a_gradient_scaler_and_the_model_encodes_in_float32(tmp_path, digits):
    vectors = orthogonal(10, 12)
    result = train_model(
        digits_config(epochs=2, precision="fp16"), digits, vectors, tmp_path, **QUIET
    )
    assert result.precision == "fp16"
    assert all(np.isfinite(record["total"]) for record in result.history)
    state = json.loads((tmp_path / "checkpoints" / "epoch-0002" / "trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] > 0  # the scaler's state travels with the checkpoint
    weights = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    loaded = DPQModel.from_checkpoint(tmp_path / "model", device="cpu")
    features = loaded.extract_features(digits.images[:6])
    assert features.dtype == np.float32 and np.isfinite(features).all()
    np.testing.assert_allclose(features, result.model.extract_features(digits.images[:6]))


def test_a_bf16_checkpoint_loads_and_encodes_in_float32(tmp_path, digits):
    result = train_model(
        digits_config(epochs=1, precision="bf16"), digits, orthogonal(10, 12), tmp_path, **QUIET
    )
    assert result.precision == "bf16"
    loaded = DPQModel.from_checkpoint(tmp_path / "model")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    codes = loaded.encode(digits.images[:6])
    np.testing.assert_array_equal(codes, result.model.encode(digits.images[:6]))


def test_the_device_is_checked_before_training(tmp_path, digits):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(ValueError, match="--device cuda: .*no CUDA device here"):
        train_model(digits_config(), digits, orthogonal(10, 12), tmp_path, device="cuda", **QUIET)
    assert not tmp_path.joinpath("checkpoints").exists()


def test_pretrained_backbone_end_to_end(tmp_path, tiny_folder, no_network):
    """A weights file the test makes (a random ResNet-18 in torchvision's layout, with its
    ImageNet classifier ``fc``): loaded before training, the frozen stages keep it (weights
    and BatchNorm statistics), the rest learns at lr * backbone_lr_scale, and nothing
    reaches for the network."""
    from safetensors.torch import save_file

    from dpq.config import DPQConfig, ModelConfig, QuantizerConfig, TrainConfig
    from dpq.data import load_source
    from dpq.model.backbones import create_backbone

    torch.manual_seed(7)
    state = {k: v.contiguous() for k, v in create_backbone("resnet18").state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    save_file(state, str(tmp_path / "resnet18.safetensors"))
    config = DPQConfig(
        model=ModelConfig(backbone="resnet18", num_classes=4, image_size=16),
        quantizer=QuantizerConfig(num_levels=2, codebook_size=8, dim=8),
        train=TrainConfig(
            epochs=1,
            batch_size=16,
            lr=0.05,
            lr_schedule="constant",
            backbone_weights=str(tmp_path / "resnet18.safetensors"),
            backbone_lr_scale=0.1,
            freeze_stages=4,  # the stem and layer1..layer3 kept
        ),
    )
    source = load_source(tiny_folder, image_size=16)
    trainer = Trainer(
        config,
        DPQModel(config),
        ArrayDataset(source.inputs, source.labels),
        orthogonal(4, 8),
        tmp_path / "run",
        **QUIET,
    )
    groups = trainer._make_optimizers()["network"].param_groups
    assert sorted({g["lr_scale"] for g in groups}) == [0.1, 1.0]
    result = trainer.train()
    trained = result.model.backbone.state_dict()
    for name in ("conv1.weight", "bn1.running_mean", "layer3.1.bn2.running_var"):
        torch.testing.assert_close(trained[name], state[name], rtol=0, atol=0)
    for name in ("layer4.0.conv1.weight", "layer4.1.bn2.running_mean"):
        assert not torch.equal(trained[name], state[name])
    loaded = DPQModel.from_checkpoint(tmp_path / "run" / "model")
    assert loaded.config.train.backbone_weights.endswith("resnet18.safetensors")
    assert loaded.extract_features(source.inputs[:3]).shape == (3, 8)
