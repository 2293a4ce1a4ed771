"""dpq.methods.dpq: DPQ's answers to the method interface: its phases under each schedule,
where the quantization phase starts, its codebook hooks, its loss as the network and
DPQLoss give it, its code lengths and index."""

import numpy as np
import pytest
import torch

from conftest import feature_config, feature_data
from dpq.methods.base import Step
from dpq.methods.dpq import DPQMethod, DPQPhase
from dpq.model.network import DPQModel


def test_phases_follow_the_schedule():
    two_phase = DPQMethod(feature_config())
    assert two_phase.phase(False) == DPQPhase("features", detach=True)
    second = two_phase.phase(True)
    assert second.quantize and second.detach and second.trains_network
    assert second.trains_codebooks and second.init_codebooks == "as_trained"
    end_to_end = DPQMethod(feature_config(schedule="end_to_end"))
    assert not end_to_end.phase(True).detach and end_to_end.phase(True).quantize
    two_step = DPQMethod(feature_config(schedule="two_step"))
    frozen = two_step.phase(True)
    assert not frozen.trains_network and frozen.average_network_first
    assert frozen.init_codebooks == "eval"
    normal = DPQMethod(feature_config().replace(quantizer={"init": "normal"}))
    assert normal.phase(True).init_codebooks is None
    timed = two_phase.timed_phase()
    assert timed.quantize and not timed.detach


def test_the_quantization_phase_starts_where_the_fraction_says():
    starts = {
        (schedule, fraction, epochs): DPQMethod(
            feature_config(schedule=schedule, quantization_start=fraction)
        ).second_phase_start(epochs)
        for schedule, fraction in (("two_phase", 0.5), ("two_phase", 0.0), ("two_step", 0.5))
        for epochs in (1, 4, 7)
    }
    assert starts == {
        ("two_phase", 0.5, 1): 0, ("two_phase", 0.5, 4): 2, ("two_phase", 0.5, 7): 3,
        ("two_phase", 0.0, 1): 0, ("two_phase", 0.0, 4): 0, ("two_phase", 0.0, 7): 0,
        ("two_step", 0.5, 1): 0, ("two_step", 0.5, 4): 2, ("two_step", 0.5, 7): 3,
    }  # fmt: skip
    plain = feature_config().replace(
        loss={"use_soft": False, "use_hard": False, "use_match": False}
    )
    method = DPQMethod(plain)
    assert not method.has_second_phase and method.second_phase_start(5) == 5
    assert method.final_codebook_init()  # codebooks fitted after training instead


def test_the_step_loss_is_the_networks_output_through_dpq_loss():
    config = feature_config(schedule="end_to_end")
    method = DPQMethod(config)
    torch.manual_seed(0)
    network = DPQModel(config)
    loss = method.build_loss(None)
    data = feature_data()
    x, targets = torch.from_numpy(data.images[:10]), torch.from_numpy(data.labels[:10])
    out = method.forward_loss(network, loss, x, targets, Step(method.phase(True)), "fp32")
    direct = network(x)
    expected = loss(direct.semantic, direct.logits, targets, direct.quantized)
    assert out.loss.parts == expected.parts and out.logits.shape == (10, 3)
    assert "E" in out.loss.parts
    first = method.forward_loss(network, loss, x, targets, Step(method.phase(False)), "fp32")
    assert "E" not in first.loss.parts
    energy, _ = loss.energy(direct.features, network.quantizer(direct.features))
    frozen = method.frozen_features_loss(network, loss, direct.features.detach())
    torch.testing.assert_close(frozen.total, config.loss.tau * energy.detach())
    assert frozen.parts["total"] == frozen.parts["E"]
    with pytest.raises(TypeError, match="needs its DPQLoss"):
        method.frozen_features_loss(network, torch.nn.Identity(), direct.features)


def test_codebook_hooks_guards_and_settings():
    config = feature_config()
    method = DPQMethod(config)
    network = DPQModel(config)
    assert list(method.codebook_parameters(network)) == ["quantizer.codebooks"]
    features = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    errors = method.init_codebooks(network, features)
    assert len(errors) == 2 and errors[1] < errors[0]
    assert method.learning_rates() == {"codebook": 1e-4}
    assert (
        "--tau" in method.divergence_hint(["quan_hard"]) and method.divergence_hint(["cls"]) == ""
    )
    with pytest.raises(ValueError, match="at least K = 8 training items; got 7"):
        method.check_training_set(7)
    with pytest.raises(ValueError, match="codes are L log2 K = 6 bits"):
        DPQMethod(config.replace(method={"bits": 8}))
    with pytest.raises(ValueError, match="takes no method.options"):
        DPQMethod(config.replace(method={"options": {"margin": 2}}))
    assert DPQMethod(config.replace(method={"bits": 6})).code_lengths() == (3, 6)
    assert not method.uses_word_vectors  # the semantic loss is off in this config
    assert DPQMethod(config.replace(loss={"use_semantic": True})).uses_word_vectors


def test_codes_index_and_search_at_every_prefix():
    config = feature_config()
    method = DPQMethod(config)
    torch.manual_seed(0)
    network = DPQModel(config)
    features = network.extract_features(feature_data().images)
    method.init_codebooks(network, features)
    assert method.levels(3) == 1 and method.levels(None) is None
    with pytest.raises(ValueError, match="gives codes of 3, 6 bits; got 4"):
        method.levels(4)
    codes = method.encode(network, features)
    np.testing.assert_array_equal(method.encode(network, features, bits=3), codes[:, :1])
    index = method.new_index(network)
    np.testing.assert_array_equal(index.codebooks, network.codebooks())
    assert index.search_mode == "aqd" and index.assignment == "euclidean"
    index.add(codes)
    for bits, levels in ((3, 1), (6, 2)):
        expected = index.search(features[:7], 5, num_levels=levels)
        got = method.search(index, features[:7], 5, bits=bits)
        np.testing.assert_array_equal(got[1], expected[1])
