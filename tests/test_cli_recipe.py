"""dpq.cli.recipe: every recipe flag is a field of the config, given flags land on top of the
recipe, the ablation last; `train` and `reproduce` read the same flags."""

from __future__ import annotations

import dataclasses

import pytest

from dpq.cli import build_parser
from dpq.cli.recipe import FLAG_FIELDS, recipe_from_args
from dpq.config import DPQConfig
from dpq.recipes import ablation_config, load_recipe


def _train(*flags: str):
    return build_parser().parse_args(["train", "digits", "--out", "run", *flags])


@pytest.mark.parametrize("command", [["train", "digits"], ["reproduce", "cifar10"]])
def test_every_flag_of_the_table_is_a_flag_and_a_config_field(command):
    args = build_parser().parse_args([*command, "--out", "run"])
    config = DPQConfig()
    for dest, (section, name) in FLAG_FIELDS.items():
        assert hasattr(args, dest), dest
        assert name in {f.name for f in dataclasses.fields(getattr(config, section))}, name


def test_no_flags_is_the_recipe_and_its_ablation():
    assert recipe_from_args(_train()) == ablation_config("full", load_recipe("default"))
    reproduce = build_parser().parse_args(["reproduce", "cifar10", "--out", "run"])
    assert recipe_from_args(reproduce, default="cifar10") == ablation_config(
        "full", load_recipe("cifar10")
    )
    assert recipe_from_args(_train("--ablation", "E")) == ablation_config(
        "E", load_recipe("default")
    )


def test_given_flags_land_on_their_fields():
    config = recipe_from_args(
        _train("--num-levels", "3", "--mixup", "0.2", "--ema", "0.9", "--bf16", "--epochs", "2",
               "--width", "0.5", "--weights", "w.safetensors", "--randaugment", "2", "--seed", "4")
    )  # fmt: skip
    assert config.quantizer.num_levels == 3
    assert (config.train.mixup_alpha, config.train.ema_decay) == (0.2, 0.9)
    assert (config.train.precision, config.train.epochs, config.train.seed) == ("bf16", 2, 4)
    assert config.train.time_budget_minutes is None
    assert config.model.backbone_kwargs["width"] == 0.5
    assert config.train.backbone_weights == "w.safetensors"
    assert config.train.randaugment_ops == 2
    assert recipe_from_args(_train("--precision", "fp16")).train.precision == "fp16"
    assert recipe_from_args(_train("--minutes", "1.5")).train.time_budget_minutes == 1.5


def test_another_backbone_starts_from_its_own_defaults():
    base = load_recipe("cifar10")
    assert base.model.backbone_kwargs  # the recipe's half-width resnet9
    args = build_parser().parse_args(["reproduce", "cifar10", "--out", "r", "--backbone", "x"])
    config = recipe_from_args(args, default="cifar10")
    assert config.model.backbone == "x" and config.model.backbone_kwargs == {}
    same = build_parser().parse_args(
        ["reproduce", "cifar10", "--out", "r", "--backbone", base.model.backbone]
    )
    assert recipe_from_args(same, default="cifar10").model.backbone_kwargs == (
        base.model.backbone_kwargs
    )


def test_the_method_flags_name_the_method_its_bits_and_options():
    config = recipe_from_args(
        _train("--method", "sign", "--bits", "16", "--method-option", "margin=24",
               "--method-option", "alpha=0.5", "--method-option", "note=text")
    )  # fmt: skip
    assert (config.method.name, config.method.bits) == ("sign", 16)
    assert config.method.options == {"margin": 24, "alpha": 0.5, "note": "text"}
    assert recipe_from_args(_train()).method == load_recipe("default").method  # dpq, no bits
    reproduce = build_parser().parse_args(
        ["reproduce", "cifar10", "--out", "r", "--method", "sign", "--bits", "32"]
    )
    config = recipe_from_args(reproduce, default="cifar10")
    assert config.method.name == "sign" and config.model == load_recipe("cifar10").model
    with pytest.raises(ValueError, match="--method-option takes KEY=VALUE"):
        recipe_from_args(_train("--method-option", "margin"))


def test_another_method_starts_without_the_recipes_bits_and_options(tmp_path):
    sign = DPQConfig().replace(method={"name": "sign", "bits": 16, "options": {"margin": 3}})
    (tmp_path / "sign.json").write_text(sign.to_json())
    back = recipe_from_args(_train("--config", str(tmp_path / "sign.json"), "--method", "dpq"))
    assert (back.method.name, back.method.bits, back.method.options) == ("dpq", None, {})
    more = recipe_from_args(
        _train("--config", str(tmp_path / "sign.json"), "--method-option", "alpha=0.1")
    )
    assert more.method.options == {"margin": 3, "alpha": 0.1} and more.method.bits == 16


def test_the_help_lists_the_registered_methods(capsys, monkeypatch):
    from dpq.methods import available_methods

    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"the retrieval method: {', '.join(available_methods())}." in text
