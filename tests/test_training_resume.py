"""dpq.training.resume: the training-set fingerprint, the trainer state a checkpoint records,
and a resume that restores model, optimizers, weight average and run state, or says why it
cannot (another config, another training set, a checkpoint not on this machine)."""

import pytest
import torch

from conftest import feature_config, feature_data
from dpq.devices import gradient_scaler
from dpq.methods import method_for
from dpq.model.network import DPQModel
from dpq.training.checkpoints import CheckpointStore
from dpq.training.optim import WeightAverage
from dpq.training.resume import (
    RunState,
    check_resumable,
    dataset_fingerprint,
    resume_run,
    trainer_state,
)


def test_the_fingerprint_follows_inputs_and_labels():
    data = feature_data()
    same = dataset_fingerprint(data.images, data.labels)
    assert same == dataset_fingerprint(data.images.copy(), data.labels.copy())
    other_labels = data.labels.copy()
    other_labels[5] = (other_labels[5] + 1) % 3
    assert dataset_fingerprint(data.images, other_labels) != same
    assert dataset_fingerprint(data.images + 1, data.labels) != same
    assert dataset_fingerprint(data.images[:-1], data.labels[:-1]) != same


def _parts(config):
    torch.manual_seed(0)
    model = DPQModel(config)
    method = method_for(config)
    optimizers = {
        "network": torch.optim.SGD(model.semantic_head.parameters(), lr=0.1, momentum=0.9),
        "codebooks": method.codebook_optimizer([model.quantizer.codebooks]),
    }
    return model, optimizers, WeightAverage(model, 0.9)


def _step(model, optimizers):
    x = torch.from_numpy(feature_data().images[:8])
    out = model(x)
    (out.semantic.pow(2).sum() + out.quantized.soft.pow(2).sum()).backward()
    for optimizer in optimizers.values():
        optimizer.step()


def test_a_saved_run_resumes_with_everything_it_recorded(tmp_path):
    config = feature_config(epochs=5)
    data = feature_data()
    fingerprint = dataset_fingerprint(data.images, data.labels)
    model, optimizers, ema = _parts(config)
    _step(model, optimizers)
    ema.update(model)
    scaler = gradient_scaler(torch.device("cpu"), "fp32")
    run = RunState(epochs=5, plan={"epochs": 5, "source": "config"}, epoch=2, switch_epoch=2)
    run.history = [{"epoch": 1}, {"epoch": 2}]
    state = trainer_state(run, config, fingerprint, ema, scaler)
    assert state["epoch"] == 2 and state["ema_updates"] == 1 and state["grad_scaler"] is None
    store = CheckpointStore(tmp_path)
    path = store.save(2, model, config, state, optimizers, ema.state)

    fresh, fresh_optimizers, fresh_ema = _parts(config)
    resumed = resume_run(
        store, path, config, fingerprint, fresh, fresh_optimizers, fresh_ema, scaler,
        method_for(config).second_phase_start,
    )  # fmt: skip
    assert (resumed.epochs, resumed.epoch, resumed.resumed_from) == (5, 2, 2)
    assert resumed.switch_epoch == 2 and resumed.history == run.history
    assert fresh_ema.updates == 1
    for name, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0)
        torch.testing.assert_close(fresh_ema.state[name], ema.state[name], rtol=0, atol=0)
    momentum = optimizers["network"].state_dict()["state"][0]["momentum_buffer"]
    restored = fresh_optimizers["network"].state_dict()["state"][0]["momentum_buffer"]
    torch.testing.assert_close(restored, momentum, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="not on this machine"):
        resume_run(
            store, tmp_path / "epoch-0009", config, fingerprint, fresh, fresh_optimizers,
            None, scaler, lambda epochs: epochs,
        )  # fmt: skip


def test_another_config_or_training_set_is_refused_with_the_difference():
    config = feature_config(epochs=5)
    data = feature_data()
    fingerprint = dataset_fingerprint(data.images, data.labels)
    run = RunState(epochs=5, plan={})
    scaler = gradient_scaler(torch.device("cpu"), "fp32")
    state = trainer_state(run, config, fingerprint, None, scaler)
    tmp = "run/epoch-0001"
    check_resumable(tmp, state, config, fingerprint)  # the same run: no error
    with pytest.raises(ValueError, match="train.lr: 0.05 vs 0.1"):
        check_resumable(tmp, state, feature_config(epochs=5, lr=0.1), fingerprint)
    with pytest.raises(ValueError, match="image statistics or classes"):
        check_resumable(tmp, state, config.replace(model={"image_mean": (0.1,) * 3}), fingerprint)
    with pytest.raises(ValueError, match="different training set than the one given now"):
        check_resumable(tmp, state, config, "0" * 64)
