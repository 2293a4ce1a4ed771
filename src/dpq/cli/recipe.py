"""The recipe flags of ``dpq train`` and ``dpq reproduce``: a recipe (a name or a config
file), an ablation of the paper's Table 2, then single settings on top (the retrieval method
among them: ``--method``, ``--bits``, ``--method-option``); and the flags of a run folder
(``--out``, ``--resume``, ``--word-vectors``).

:func:`recipe_from_args` turns them into one :class:`~dpq.config.DPQConfig`; each flag
below is one field of it (:data:`FLAG_FIELDS`).
"""

from __future__ import annotations

import argparse
import json

from dpq.cli.options import METHODS_PLACEHOLDER, add_device_options, add_quiet_option, log_for

# flag destination -> (config section, field); the flags whose value is the field as given
FLAG_FIELDS: dict[str, tuple[str, str]] = {
    "method": ("method", "name"),
    "bits": ("method", "bits"),
    "backbone": ("model", "backbone"),
    "tta_flip": ("model", "tta_flip"),
    "feature": ("model", "feature"),
    "posterior_temperature": ("model", "posterior_temperature"),
    "num_levels": ("quantizer", "num_levels"),
    "codebook_size": ("quantizer", "codebook_size"),
    "dim": ("quantizer", "dim"),
    "temperature": ("quantizer", "temperature"),
    "similarity": ("quantizer", "similarity"),
    "assignment": ("quantizer", "assignment"),
    "tau": ("loss", "tau"),
    "lambda_cls": ("loss", "lambda_cls"),
    "label_smoothing": ("loss", "label_smoothing"),
    "batch_size": ("train", "batch_size"),
    "lr": ("train", "lr"),
    "optimizer": ("train", "optimizer"),
    "schedule": ("train", "schedule"),
    "quantization_start": ("train", "quantization_start"),
    "cutout": ("train", "cutout"),
    "mixup": ("train", "mixup_alpha"),
    "randaugment": ("train", "randaugment_ops"),
    "randaugment_magnitude": ("train", "randaugment_magnitude"),
    "ema": ("train", "ema_decay"),
    "precision": ("train", "precision"),
    "channels_last": ("train", "channels_last"),
    "seed": ("train", "seed"),
    "weights": ("train", "backbone_weights"),
    "backbone_lr_scale": ("train", "backbone_lr_scale"),
    "freeze_stages": ("train", "freeze_stages"),
}


def add_recipe_options(parser: argparse.ArgumentParser) -> None:
    """The recipe, the ablation and one flag per setting, in the groups of the config."""
    from dpq.recipes import ABLATIONS

    recipe = parser.add_argument_group("recipe (a JSON config, then an ablation, then flags)")
    recipe.add_argument(
        "--config",
        metavar="RECIPE",
        help="a recipe name (default, cifar10, paper) or a DPQ config JSON file (sections "
        "model/quantizer/loss/train; missing keys take the defaults), e.g. the config.json of "
        "a checkpoint. `train` starts from 'default', `reproduce` from 'cifar10'",
    )
    recipe.add_argument(
        "--ablation",
        default="full",
        choices=list(ABLATIONS),
        help="a named configuration of the paper's Table 2 applied on top of the recipe",
    )
    _add_method_flags(parser.add_argument_group("retrieval method (default: the recipe's, dpq)"))
    _add_model_flags(parser.add_argument_group("model (default: the recipe's)"))
    loss = parser.add_argument_group("losses (default: the recipe's)")
    loss.add_argument("--tau", type=float, help="weight of the quantization loss E")
    loss.add_argument("--lambda-cls", type=float, help="weight of the classification loss")
    loss.add_argument("--label-smoothing", type=float, help="label smoothing of L_C")
    _add_training_flags(parser.add_argument_group("training (default: the recipe's)"))


def _add_method_flags(method: argparse._ArgumentGroup) -> None:
    method.add_argument(
        "--method",
        metavar="NAME",
        help=f"the retrieval method: {METHODS_PLACEHOLDER}. dpq gives every code length "
        "L log2 K from one model; the others train one model per code length (--bits)",
    )
    method.add_argument(
        "--bits",
        type=int,
        metavar="B",
        help="code length of a method that trains one model per length (a multiple of 8 for "
        "binary codes); dpq's lengths come from --num-levels and --codebook-size",
    )
    method.add_argument(
        "--method-option",
        action="append",
        metavar="KEY=VALUE",
        help="a setting of the method (e.g. margin=32 for sign); the value is read as JSON "
        "(numbers, true, false) or else as text; repeat the flag for several",
    )


def _add_model_flags(model: argparse._ArgumentGroup) -> None:
    model.add_argument("--backbone", help="resnet9, small_cnn, torchvision:<name>, timm:<name>")
    model.add_argument("--width", type=float, help="channel multiplier of resnet9 / small_cnn")
    model.add_argument("--num-levels", type=int, metavar="L", help="quantization levels (4)")
    model.add_argument(
        "--codebook-size", type=int, metavar="K", help="codewords per level, a power of two (256)"
    )
    model.add_argument("--dim", type=int, metavar="D", help="semantic feature size (300)")
    model.add_argument("--temperature", type=float, help="soft assignment softmax(s / temperature)")
    model.add_argument(
        "--similarity", choices=["euclidean", "cosine"], help="s of the soft assignment"
    )
    model.add_argument(
        "--assignment", choices=["euclidean", "cosine"], help="hard assignment rule of the codes"
    )
    model.add_argument(
        "--tta-flip", action="store_true", default=None, help="average features with the mirror"
    )
    model.add_argument(
        "--feature",
        choices=["semantic", "class_posterior"],
        help="what is quantized: semantic (the paper's tanh features, searched by AQD) or "
        "class_posterior (the classifier's class probabilities, searched by inner product: "
        "p_q . p_x ranks by the chance that two images share their class)",
    )
    model.add_argument(
        "--posterior-temperature",
        type=float,
        metavar="T",
        help="class_posterior features are softmax(logits / T) (1)",
    )


def _add_training_flags(train: argparse._ArgumentGroup) -> None:
    from dpq.config import SCHEDULES

    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, help="number of epochs")
    budget.add_argument(
        "--minutes",
        type=float,
        help="training time budget: the step speed is measured and the epochs that fit are fixed",
    )
    train.add_argument("--batch-size", type=int, help="images per step")
    train.add_argument("--lr", type=float, help="peak learning rate of the network")
    train.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], help="network optimizer")
    train.add_argument("--schedule", choices=list(SCHEDULES), help="training schedule")
    train.add_argument(
        "--quantization-start",
        type=float,
        metavar="FRACTION",
        help="fraction of the epochs before the quantization losses start",
    )
    train.add_argument("--cutout", type=int, metavar="PIXELS", help="cutout square side (0: off)")
    train.add_argument("--mixup", type=float, metavar="ALPHA", help="mixup alpha (0: off)")
    train.add_argument(
        "--randaugment",
        type=int,
        metavar="N",
        help="RandAugment operations per training image (0: off)",
    )
    train.add_argument(
        "--randaugment-magnitude",
        type=int,
        metavar="M",
        help="strength of the RandAugment operations, 0..30 (torchvision's scale; 9)",
    )
    train.add_argument("--ema", type=float, metavar="DECAY", help="weight EMA decay (0: off)")
    train.add_argument(
        "--channels-last", action="store_true", default=None, help="channels-last convolutions"
    )
    train.add_argument(
        "--weights",
        metavar="PATH",
        help="pretrained backbone weights from a local file (safetensors, or a state dict "
        "saved by torch.save), e.g. torchvision's ImageNet AlexNet for --backbone alexnet; "
        "nothing is downloaded",
    )
    train.add_argument(
        "--backbone-lr-scale",
        type=float,
        metavar="X",
        help="the backbone learns at lr * X (below 1 fine-tunes pretrained layers gently)",
    )
    train.add_argument(
        "--freeze-stages",
        type=int,
        metavar="N",
        help="do not train the first N stages of the backbone (alexnet: conv1..fc7; "
        "resnets: stem, layer1..layer4)",
    )
    train.add_argument("--seed", type=int, help="seed of init, shuffling and augmentation")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The run folder, its label word vectors, the hardware (with ``--precision``) and
    ``--quiet``: what ``train`` and ``reproduce`` share beside the recipe."""
    parser.add_argument(
        "--word-vectors",
        metavar="PATH",
        help="label word vectors, one row per class (needed by the semantic loss); "
        "'orthogonal' uses seeded orthonormal class vectors",
    )
    parser.add_argument("--out", required=True, help="output directory of the run")
    parser.add_argument(
        "--resume", action="store_true", help="continue the interrupted run in --out"
    )
    add_device_options(parser, precision=True)
    add_quiet_option(parser, "progress or log lines")


def run_settings(args: argparse.Namespace):  # -> RunSettings
    """The run flags (``add_run_options``) as a :class:`dpq.training.experiments.RunSettings`."""
    from dpq.training.experiments import RunSettings

    return RunSettings(
        args.out,
        word_vectors=args.word_vectors,
        resume=args.resume,
        progress=not args.quiet,
        log=log_for(args),
        device=args.device,
        workers=args.workers,
    )


def recipe_from_args(args: argparse.Namespace, default: str = "default"):  # -> DPQConfig
    """The recipe (``--config``, else ``default``) with the flags that were given on top,
    then ``--ablation``."""
    from dpq.recipes import ablation_config, load_recipe

    base = load_recipe(args.config or default)
    sections: dict[str, dict[str, object]] = {
        "model": {},
        "quantizer": {},
        "loss": {},
        "train": {},
        "method": {},
    }
    for dest, (section, name) in FLAG_FIELDS.items():
        value = getattr(args, dest)
        if value is not None:
            sections[section][name] = value
    method = sections["method"]
    if args.method is not None and args.method != base.method.name:  # another method: its own
        method.setdefault("bits", None)
        method["options"] = {}
    if args.method_option:
        known = method.get("options", base.method.options)
        method["options"] = {**known, **method_options(args.method_option)}
    if args.width is not None:
        sections["model"]["backbone_kwargs"] = {**base.model.backbone_kwargs, "width": args.width}
    if args.backbone is not None and args.width is None and args.backbone != base.model.backbone:
        sections["model"]["backbone_kwargs"] = {}
    if args.epochs is not None:
        sections["train"].update(epochs=args.epochs, time_budget_minutes=None)
    if args.minutes is not None:
        sections["train"]["time_budget_minutes"] = args.minutes
    return ablation_config(args.ablation, base.replace(**sections))


def method_options(pairs: list[str]) -> dict[str, object]:
    """``["margin=32", "name=x"]`` -> ``{"margin": 32, "name": "x"}`` (values read as JSON,
    else kept as text)."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--method-option takes KEY=VALUE (e.g. margin=32); got {pair!r}.")
        try:
            value: object = json.loads(text)
        except json.JSONDecodeError:
            value = text
        options[key.strip()] = value
    return options
