"""dpq.methods: the registry, and one test matrix every registered method goes through (as
timm's registry is its test matrix): build the network and loss, a training step in each
phase, codes, an index, a search, a saved index that searches the same, a checkpoint that
loads back into the right network."""

import numpy as np
import pytest
import torch

from conftest import feature_config, feature_data, orthogonal, seeded_network
from dpq.config import DPQConfig
from dpq.methods import (
    DPQMethod,
    available_methods,
    load_network,
    method_class,
    method_for,
    register_method,
)
from dpq.methods.base import Phase, RetrievalMethod, Step

CONFIGS = {
    "dpq": feature_config(),
    **{
        name: feature_config().replace(method={"name": name, "bits": 16})
        for name in ("sign", "dvsq", "dqn", "dsh", "dhn", "hashnet", "csq")
    },
}
"""A small config per registered method (a new method adds its own here)."""
WORD_VECTORS = orthogonal(3, 6)
"""Label word vectors for the configs' 3 classes and D = 6 (methods without L_S ignore them)."""


def test_the_registry_finds_methods_by_name_and_names_the_known_ones():
    assert available_methods() == sorted(CONFIGS)
    assert method_class("dpq") is DPQMethod
    assert isinstance(method_for(DPQConfig()), DPQMethod)  # a config without a method: DPQ
    known = "csq, dhn, dpq, dqn, dsh, dvsq, hashnet, sign"
    with pytest.raises(ValueError, match=f"unknown method 'nope'; known methods are {known}"):
        method_for(DPQConfig().replace(method={"name": "nope"}))
    with pytest.raises(ValueError, match="not 'sign'"):
        method_class("sign")(DPQConfig())
    with pytest.raises(TypeError, match="must subclass RetrievalMethod"):
        register_method(dict)  # type: ignore[arg-type]


def test_a_step_knows_how_far_the_run_is():
    step = Step(Phase("training"), epoch=1, step=30, total_steps=40)
    assert step.progress == 0.75 and Step(Phase("x"), step=50, total_steps=40).progress == 1.0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_method_trains_encodes_indexes_and_searches(name, tmp_path):
    config = CONFIGS[name]
    method = method_for(config)
    assert isinstance(method, RetrievalMethod) and method.name == name
    network = seeded_network(method)
    loss = method.build_loss(WORD_VECTORS).to(network.device)
    data = feature_data()
    x = network.prepare_inputs(torch.from_numpy(data.images[:16]))
    targets = torch.from_numpy(data.labels[:16])
    for second in (False, True):
        phase = method.phase(second)
        if not phase.trains_network:
            continue
        network.zero_grad()
        out = method.forward_loss(network, loss, x, targets, Step(phase), "fp32")
        assert out.loss.total.ndim == 0 and np.isfinite(out.loss.parts["total"])
        out.loss.total.backward()
        head_grads = [p.grad for n, p in network.named_parameters() if not n.startswith("quant")]
        assert any(g is not None and g.abs().sum() > 0 for g in head_grads)
        assert out.logits is None or out.logits.shape == (16, 3)
    assert network.feature_dim > 0 and method.code_lengths()[-1] >= method.code_lengths()[0]

    network.eval()
    features = network.extract_features(data.images)
    codes = method.encode(network, features)
    index = method.new_index(network, metadata={"method": name})
    ids = index.add(codes, labels=data.labels)
    np.testing.assert_array_equal(ids, np.arange(len(data.labels)))
    distances, found = method.search(index, features[:5], k=4)
    assert found.shape == (5, 4) and (found >= 0).all()
    assert (np.diff(distances, axis=1) >= 0).all() and len(set(found[0])) == 4
    for bits in method.code_lengths():
        assert method.search(index, features[:5], k=4, bits=bits)[1].shape == (5, 4)
    path = index.save(tmp_path / "index.npz")
    again = method.search(method.load_index(path), features[:5], k=4)
    np.testing.assert_array_equal(again[1], found)
    np.testing.assert_array_equal(again[0], distances)

    network.save_checkpoint(tmp_path / "model", config=config)
    loaded = load_network(tmp_path / "model")
    assert type(loaded) is type(network)
    np.testing.assert_array_equal(loaded.extract_features(data.images[:5]), features[:5])
