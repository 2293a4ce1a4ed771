"""dpq.config: validation, JSON round trips, ablations (by what they make the loss compute),
recipes (the same on every machine)."""

import numpy as np
import pytest
import torch

from dpq.config import (
    DPQConfig,
    LossConfig,
    MethodConfig,
    ModelConfig,
    QuantizerConfig,
    TrainConfig,
)
from dpq.recipes import ABLATIONS, ablation_config


def test_config_json_round_trip(tmp_path):
    config = DPQConfig(
        model=ModelConfig(backbone_kwargs={"width": 0.75}, image_mean=(0.1, 0.2, 0.3)),
        loss=LossConfig(level_weights=(1.0, 1.0, 0.5, 0.5)),
        train=TrainConfig(time_budget_minutes=12.5, cutout=8, precision="auto"),
    )
    assert DPQConfig.from_json(config.to_json()) == config
    (tmp_path / "c.json").write_text(config.to_json())
    assert DPQConfig.load(tmp_path / "c.json") == config
    partial = DPQConfig.from_dict({"quantizer": {"num_levels": 2}})
    assert partial.quantizer.num_levels == 2 and partial.train == TrainConfig()


def test_the_method_section_defaults_to_dpq_so_older_configs_load_unchanged():
    old = DPQConfig().to_dict()
    del old["method"]  # a config.json written before the method section existed
    assert DPQConfig.from_dict(old) == DPQConfig()
    assert DPQConfig().method == MethodConfig(name="dpq", bits=None, options={})
    sign = DPQConfig().replace(method={"name": "sign", "bits": 32, "options": {"alpha": 0.1}})
    assert DPQConfig.from_json(sign.to_json()) == sign and sign.to_dict()["method"]["bits"] == 32
    with pytest.raises(ValueError, match="unknown config section 'methods'"):
        DPQConfig().replace(methods={})


def test_configs_written_before_precision_existed_still_load():
    assert DPQConfig.from_dict({"train": {"bf16": True}}).train.precision == "bf16"
    assert DPQConfig.from_dict({"train": {"bf16": False}}).train.precision == "fp32"
    both = DPQConfig.from_dict({"train": {"bf16": True, "precision": "fp16"}})
    assert both.train.precision == "fp16"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"quantizer": {"codebook_size": 100}}, "power of two"),
        ({"quantizer": {"similarity": "dot"}}, "similarity"),
        ({"train": {"schedule": "alternating"}}, "schedule"),
        ({"train": {"epochs": 0}}, "epochs"),
        ({"train": {"lr": -1}}, "lr"),
        ({"train": {"bf16": "yes"}}, "bf16"),
        ({"train": {"precision": "fp8"}}, "precision"),
        ({"train": {"randaugment_magnitude": 31}}, "0..30"),
        ({"train": {"randaugment_ops": -1}}, "randaugment_ops"),
        ({"loss": {"level_weights": [1, 1]}}, "level_weights has 2 entries"),
        ({"loss": {"tau": float("nan")}}, "tau"),
        ({"model": {"classifier_input": "fc7"}}, "classifier_input"),
        ({"model": {"image_std": [0.2, 0.2]}}, "image_std"),
        ({"model": {"depth": 3}}, "unknown keys"),
        ({"extras": {}}, "unknown sections"),
        ({"method": {"name": ""}}, "method.name"),
        ({"method": {"bits": 0}}, "method.bits"),
        ({"method": {"options": [1]}}, "method.options must be a mapping"),
        ({"method": {"options": {"f": float("inf")}}}, "JSON-ready"),
        ({"method": {"loss": "dsh"}}, "unknown keys"),
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


def _loss_terms(config: DPQConfig) -> set[str]:
    """The loss terms one forward/loss pass of a model built from ``config`` computes."""
    from dpq.methods.losses import DPQLoss
    from dpq.model.network import DPQModel

    torch.manual_seed(0)
    model = DPQModel(config)
    classes, dim = config.model.num_classes, config.quantizer.dim
    word_vectors = np.eye(classes, dim, dtype=np.float32)
    loss = DPQLoss(config.loss, word_vectors, classes, config.quantizer.num_levels, dim)
    x = torch.randn(8, 5)
    out = model(x, quantize=True)
    parts = loss(out.semantic, out.logits, torch.arange(8) % classes, out.quantized)
    return set(parts.parts) - {"total"}


@pytest.mark.parametrize(
    ("name", "terms", "schedule"),
    [
        ("full", {"semantic", "cls", "quan", "quan_hard", "match", "E"}, "two_phase"),
        ("E", {"quan", "quan_hard", "match", "E"}, "end_to_end"),
        ("E+LS", {"semantic", "quan", "quan_hard", "match", "E"}, "two_phase"),
        ("E+LC", {"cls", "quan", "quan_hard", "match", "E"}, "two_phase"),
        ("no-soft", {"semantic", "cls", "quan_hard", "E"}, "two_phase"),
        ("two-step", {"semantic", "cls", "quan", "quan_hard", "match", "E"}, "two_step"),
        ("end-to-end", {"semantic", "cls", "quan", "quan_hard", "match", "E"}, "end_to_end"),
    ],
)
def test_each_ablation_changes_what_the_loss_computes(name, terms, schedule):
    base = DPQConfig(
        model=ModelConfig(backbone="identity", backbone_kwargs={"in_features": 5}, num_classes=3),
        quantizer=QuantizerConfig(num_levels=2, codebook_size=4, dim=6),
    )
    config = ablation_config(name, base)
    assert _loss_terms(config) == terms
    assert config.train.schedule == schedule
    assert (config.train.quantization_start == 0.0) == (name == "E")


def test_ablations_of_a_class_posterior_recipe_without_a_classifier_fall_back():
    from dpq.recipes import cifar10_recipe

    recipe = cifar10_recipe()
    assert ablation_config("E+LC", recipe).model == recipe.model
    for name in ("E", "E+LS"):  # no classifier is trained: the semantic features are quantized
        assert ablation_config(name, recipe).model.feature == "semantic"
    assert set(ABLATIONS) >= {"full", "E", "E+LS", "E+LC", "two-step", "no-soft"}
    with pytest.raises(ValueError, match="unknown ablation"):
        ablation_config("E+XYZ")


def test_recipes_by_name_or_file_and_the_same_on_every_machine(tmp_path, monkeypatch):
    from dpq import devices
    from dpq.recipes import RECIPES, cifar10_recipe, load_recipe

    assert load_recipe("default") == DPQConfig()
    recipe = load_recipe("cifar10")
    assert recipe == cifar10_recipe() and set(RECIPES) == {"default", "cifar10", "paper"}
    assert recipe.model.normalize_features and recipe.train.time_budget_minutes == 30.0
    assert recipe.model.feature == "class_posterior" and recipe.train.precision == "auto"
    # what the CPU can do is decided when training starts, not when the recipe is built
    monkeypatch.setattr(devices, "native_bf16", lambda: False)
    assert cifar10_recipe() == recipe
    path = tmp_path / "recipe.json"
    path.write_text(recipe.to_json())
    assert load_recipe(path) == recipe
    with pytest.raises(ValueError, match="neither a recipe name"):
        load_recipe("cifar100")


def test_the_paper_recipe_holds_the_papers_values_and_says_where_each_comes_from():
    from dpq.recipes import OUR_PAPER_CHOICES, PAPER_SETTINGS, load_recipe, paper_recipe

    recipe = load_recipe("paper")
    assert recipe == paper_recipe()
    data = recipe.to_dict()
    stated = {
        "model.backbone": "alexnet",
        "model.classifier_input": "backbone",
        "model.feature": "semantic",
        "quantizer.dim": 300,
        "quantizer.num_levels": 4,
        "quantizer.codebook_size": 256,
        "quantizer.similarity": "cosine",
        "quantizer.assignment": "euclidean",
        "loss.lambda_cls": 0.1,
        "loss.tau": 1.0,
        "loss.mu": 1.0,
        "loss.nu": 0.1,
        "loss.semantic_reduction": "sum",
        "train.epochs": 64,
        "train.batch_size": 16,
        "train.optimizer": "adam",
        "train.weight_decay": 0.0,
        "train.schedule": "end_to_end",
        "train.quantization_start": 0.0,
        "train.backbone_weights": None,  # the file comes with --weights
    }
    assert set(stated) == set(PAPER_SETTINGS)
    for key, value in stated.items():
        section, name = key.split(".")
        assert data[section][name] == value, key
        assert PAPER_SETTINGS[key].startswith("paper ")  # a section of the paper
    # every value that is not a default is either cited or listed as our choice
    defaults = DPQConfig().to_dict()
    changed = {
        f"{section}.{name}"
        for section, fields in data.items()
        for name, value in fields.items()
        if value != defaults[section][name]
    }
    assert changed <= set(PAPER_SETTINGS) | set(OUR_PAPER_CHOICES)
    for key in OUR_PAPER_CHOICES:
        section, name = key.split(".")
        assert name in data[section], key
    assert recipe.model.image_size == 227 and recipe.train.backbone_lr_scale == 0.1
