"""The training loop of a retrieval method, read as timm's ``train.py``: for every epoch,
train one epoch -> keep the ranks in sync -> check the weights -> save a checkpoint ->
revise the plan; then the final weights and the saved model.

:class:`Trainer` trains the network of any registered method (:mod:`dpq.methods`; the
config's ``method`` section names it, DPQ by default) on labelled inputs (uint8 images
(N, H, W, 3), or float32 features (N, F) for the identity backbone). It never knows the
method by name: it asks it for the network, the loss of a batch, the phases of its schedule
(whether the network or the codebooks learn, what happens when a phase starts) and its
codebooks (:class:`~dpq.methods.base.RetrievalMethod`).

Beside the loop, each part is its own module, testable alone: what a step reads
(:mod:`.batches`, :mod:`.augment`); optimizers, learning rates and the weight average
(:mod:`.optim`); codebooks from the training features (:mod:`.codebook_init`); the epoch plan
under a time budget (:mod:`.budget`); what a checkpoint records and a resume restores
(:mod:`.resume`, files in :mod:`.checkpoints`); what the ranks of a torchrun run agree on
(:mod:`.agreement`, primitives in :mod:`.ddp`); data checks and divergence stops
(:mod:`.guards`); the lines it logs (:mod:`.log_lines`).

Batches are the same whether the inputs are in memory or decoded on demand by ``workers``
processes. Pretrained backbone weights (``train.backbone_weights``) are loaded when a fresh
run starts. Every epoch ends with a checkpoint, so ``train(resume=True)`` continues from the
newest one after the process was killed, with bit-identical results; the run folder is
locked for the whole run. Under ``torchrun`` (``WORLD_SIZE > 1``) the same loop runs in every
process with DistributedDataParallel, each rank on its share of every global batch, and rank
0 alone decides what must agree and writes the run.
"""

from __future__ import annotations

import contextlib
import copy
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpq.config import DPQConfig
from dpq.data.loading import BatchReader
from dpq.devices import available_cores, gradient_scaler, resolve_device, resolve_precision
from dpq.methods import method_for
from dpq.methods.base import LossOutput, Phase, Step, StepOutput
from dpq.model.imagenet import load_backbone_weights
from dpq.model.retrieval_network import RetrievalNetwork
from dpq.progress import is_terminal, progress_bar
from dpq.training import agreement, ddp, log_lines
from dpq.training.batches import ArrayDataset, EpochBatches, LabelledInputs
from dpq.training.budget import EpochPlanner, measure_step_seconds
from dpq.training.checkpoints import RunDirectory
from dpq.training.codebook_init import TrainingFeatures, initialise_codebooks
from dpq.training.ddp import DistributedContext
from dpq.training.guards import (
    DivergenceGuard,
    TrainingDiverged,
    check_model_config,
    check_training_data,
)
from dpq.training.optim import (
    WeightAverage,
    build_optimizers,
    codebook_optimizers,
    learning_rate,
    set_learning_rate,
)
from dpq.training.resume import RunState, dataset_fingerprint, resume_run, trainer_state

__all__ = [
    "ArrayDataset",
    "LabelledInputs",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "seed_everything",
    "train_model",
]


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns.

    Attributes:
        model: the trained network (eval mode; EMA weights when EMA was on).
        epochs: number of epochs of the run.
        history: one dict per epoch (mean loss parts, learning rate, seconds, accuracy).
        wall_seconds: wall time of this call.
        model_dir: directory of the saved final model.
        resumed_from_epoch: epochs already done when this call started (0 for a fresh run).
        planned: how the epoch count was chosen (time-budget measurements), for the log.
        precision: the arithmetic the network trained in ("fp32", "bf16", "fp16").
        rank, world_size: this process in a multi-process run (0 and 1 otherwise); rank 0
            wrote the checkpoints and the model.
    """

    model: RetrievalNetwork
    epochs: int
    history: list[dict[str, Any]]
    wall_seconds: float
    model_dir: Path
    resumed_from_epoch: int = 0
    planned: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True in a single process and on rank 0 (the process that wrote the run)."""
        return self.rank == 0


def seed_everything(seed: int) -> None:
    """Seed Python and torch (call before building the model for a reproducible init).

    dpq itself draws numpy randomness from explicitly seeded generators only."""
    random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Train a retrieval network; see the module docstring.

    Args:
        config: the full configuration (its model, quantizer and method sections must be
            the model's); it is saved with every checkpoint.
        model: the network to train (built from ``config``, e.g.
            ``method_for(config).build_network()``).
        dataset: labelled training inputs (``.images``, ``.labels``), e.g.
            :class:`ArrayDataset`.
        word_vectors: float (C, D) label word vectors (for a loss that needs them).
        out_dir: where checkpoints, the log and the final model go (a path or a
            :class:`~dpq.training.checkpoints.RunDirectory`).
        progress: show progress (a bar on a terminal, one line per epoch elsewhere).
        log: function receiving one-line messages (default: print to stderr).
        clock: seconds as a float (default ``time.perf_counter``; tests inject a fake one).
        device: where to train ("auto", "cpu", "cuda", "cuda:N", "mps", a torch.device);
            None: where the model is. The model is moved there.
        workers: data-loading processes for an on-demand image reader (None: one per core,
            up to 8); in-memory arrays are always read in this process.
        distributed: the multi-process run this process belongs to; "auto" (the default)
            joins the one torchrun describes (:func:`dpq.training.ddp.init_from_environment`),
            None trains alone. On CUDA each rank trains on its ``LOCAL_RANK`` GPU.
    """

    def __init__(
        self,
        config: DPQConfig,
        model: RetrievalNetwork,
        dataset: LabelledInputs,
        word_vectors: np.ndarray | None,
        out_dir: str | Path | RunDirectory,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        device: str | torch.device | None = None,
        workers: int | None = None,
        distributed: DistributedContext | None | str = "auto",
    ) -> None:
        self.method = method_for(config)
        check_model_config(model, config)
        self.config = config
        requested = resolve_device(device) if device is not None else model.device
        self.dist, target = agreement.joined_run(distributed, requested)
        self.is_main = self.dist is None or self.dist.is_main
        if device is not None or target != model.device:
            model.to(target)
        self.model = model
        self._net: nn.Module | None = None  # the DistributedDataParallel wrapper, when training
        if config.train.channels_last:
            model.set_channels_last(True)
        if config.train.freeze_stages:
            model.freeze_backbone_stages(config.train.freeze_stages)
        self.device = model.device
        self.inputs = dataset.images
        self.labels = np.asarray(dataset.labels)
        world = self.dist.world_size if self.dist is not None else 1
        check_training_data(self.inputs, self.labels, model, config, self.method, world)
        self.loss_fn = self.method.build_loss(word_vectors).to(self.device)
        self.run_dir = out_dir if isinstance(out_dir, RunDirectory) else RunDirectory(out_dir)
        self.checkpoints = self.run_dir.checkpoints
        self.checkpoints.keep = config.train.keep_checkpoints
        self.progress = progress and self.is_main
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        if not self.is_main:
            self.log = lambda message: None
        self.clock = clock
        self.fingerprint = dataset_fingerprint(self.inputs, self.labels)
        self.precision = resolve_precision(config.train.precision, self.device)
        self.scaler = gradient_scaler(self.device, self.precision)
        self.reader = BatchReader(self.inputs, workers=workers, device=self.device)
        batch = max(256, config.train.batch_size)
        self.features = TrainingFeatures(
            model, self.inputs, self.reader, batch, self.precision, workers, self.dist
        )
        self.batches = EpochBatches(self.labels, config, model, self.dist)
        self.guard = DivergenceGuard(self.method, self.precision, self.checkpoints.latest)

    @property
    def out_dir(self) -> Path:
        return self.run_dir.path

    def steps_per_epoch(self) -> int:
        """Batches per epoch (the last incomplete batch is dropped when there is a full one)."""
        return self.batches.steps_per_epoch()

    # -------------------------------------------------------------- the loop

    def train(self, resume: bool = False) -> TrainResult:
        """Run (or continue) the training and save the final model to ``out_dir/model``.

        Args:
            resume: continue from the newest checkpoint in ``out_dir`` (the config and the
                training set must be the same as in the interrupted run).

        Raises:
            ValueError: ``out_dir`` already holds a run and ``resume`` is false; no
                checkpoint to resume from; a config or data mismatch on resume.
            dpq.training.checkpoints.RunInProgressError: another process is training into
                ``out_dir``.
            TrainingDiverged: the loss became NaN/inf (the last good checkpoint is kept).
        """
        with contextlib.ExitStack() as stack:
            agreement.claim_run_folder(self.run_dir, resume, stack, self.dist)
            try:
                return self._train_locked(resume)
            finally:
                self.reader.close()
                self._net = None

    def _train_locked(self, resume: bool) -> TrainResult:
        started = self.clock()
        cfg = self.config.train
        torch.set_num_threads(cfg.num_threads or available_cores())
        if cfg.backbone_weights is not None and not resume:
            loaded = load_backbone_weights(self.model.backbone, cfg.backbone_weights)
            self.log(log_lines.backbone_weights_line(cfg.backbone_weights, loaded))
        optimizers = self._make_optimizers()
        ema = WeightAverage(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        method = self.method
        planner = EpochPlanner(
            cfg,
            self.steps_per_epoch(),
            method.second_phase_start,
            method.has_second_phase,
            self.clock,
            started,
            self.log,
        )
        run = self._start_run(resume, planner, optimizers, ema)
        self._net = agreement.wrap_for_ddp(
            agreement.StepModule(method, self.model, self.loss_fn, self.precision),
            self.device,
            self.dist,
        )
        streamed = (len(self.labels), self.reader.workers) if self.reader.streams else None
        scaled = self.scaler.is_enabled()
        for line in log_lines.setup_lines(
            cfg.batch_size, self.device, self.precision, scaled, self.dist, streamed
        ):
            self.log(line)
        steps = self.steps_per_epoch()
        bar = None
        if self.progress and is_terminal():
            bar = progress_bar(
                run.epochs * steps, "train", "step", initial=run.epoch * steps, leave=True
            )
        try:
            while run.epoch < run.epochs:
                epoch_start = self.clock()
                if run.epoch == run.switch_epoch:
                    self._start_second_phase(optimizers, ema)
                record = self._train_one_epoch(run, optimizers, ema, bar)
                agreement.end_epoch_in_sync(self.model, ema, record, self.dist)
                record["seconds"] = round(self.clock() - epoch_start, 3)
                self.guard.check_weights(self.model, run.epoch, cfg.lr)
                run.history.append(record)
                run.epoch += 1
                if self.is_main:
                    self.run_dir.append_log(record)
                    state = trainer_state(run, self.config, self.fingerprint, ema, self.scaler)
                    self.checkpoints.save(
                        run.epoch,
                        self.model,
                        self.config,
                        state,
                        optimizers,
                        ema.state if ema is not None else None,
                    )
                if self.progress and bar is None:
                    self.log(log_lines.epoch_line(record, run.epochs, method.shown_losses))
                if planner.budget is not None and run.resumed_from == 0 and run.epoch < run.epochs:
                    wall = self.clock() - epoch_start
                    agreement.agreed_revision(planner, run, wall, record["seconds"], self.dist)
                    if bar is not None:
                        bar.total = run.epochs * steps
                        bar.refresh()
        finally:
            if bar is not None:
                bar.close()
        return self._finish(run, ema, started)

    def _start_run(
        self,
        resume: bool,
        planner: EpochPlanner,
        optimizers: dict[str, torch.optim.Optimizer],
        ema: WeightAverage | None,
    ) -> RunState:
        """A fresh run as planned, or the state of the newest checkpoint, loaded."""
        if not resume:
            epochs, plan = agreement.agreed_first_plan(planner, self._seconds_per_step, self.dist)
            return planner.new_run(epochs, plan)
        path = agreement.chosen_checkpoint(self.checkpoints, self.dist)
        run = resume_run(
            self.checkpoints,
            path,
            self.config,
            self.fingerprint,
            self.model,
            optimizers,
            ema,
            self.scaler,
            self.method.second_phase_start,
        )
        self.log(f"resuming from {path} (epoch {run.epoch} of {run.epochs})")
        return run

    def _start_second_phase(
        self, optimizers: dict[str, torch.optim.Optimizer], ema: WeightAverage | None
    ) -> None:
        """The second phase begins: the averaged network (when asked), codebooks from the
        training features (when asked), and fresh codebook optimizers."""
        phase = self.method.phase(second=True)
        if phase.average_network_first and ema is not None:
            self.model.load_state_dict(ema.state)
        if phase.init_codebooks is not None:
            features = self.features.of_kind(phase.init_codebooks)
            initialise_codebooks(self.method, self.model, features, self.dist, self.log)
            if ema is not None:
                ema.reset(self.model, self.method.codebook_parameters(self.model))
        optimizers.update(codebook_optimizers(self.model, self.method))

    def _train_one_epoch(
        self,
        run: RunState,
        optimizers: dict[str, torch.optim.Optimizer],
        ema: WeightAverage | None,
        bar: Any,
    ) -> dict[str, Any]:
        """One epoch of the current phase; returns its log record (mean losses, lr, ...)."""
        phase = self.method.phase(second=run.epoch >= run.switch_epoch)
        order, rng = self.batches.order(run.epoch)
        record: dict[str, Any] = {"epoch": run.epoch + 1, "phase": phase.name}
        if not phase.trains_network:
            if run.frozen_features is None:
                run.frozen_features = self.features.eval_mode()
            codebooks = optimizers["codebooks"]
            sums = self._frozen_network_epoch(
                run, phase, run.frozen_features, order, codebooks, bar
            )
            record["lr"] = 0.0
        else:
            sums, lr, accuracy = self._network_epoch(run, phase, order, rng, optimizers, ema, bar)
            record["lr"] = lr
            if accuracy is not None:
                record["train_accuracy"] = accuracy
        record.update({k: v / len(order) for k, v in sums.items()})
        return record

    def _network_epoch(
        self,
        run: RunState,
        phase: Phase,
        order: np.ndarray,
        rng: np.random.Generator,
        optimizers: dict[str, torch.optim.Optimizer],
        ema: WeightAverage | None,
        bar: Any,
    ) -> tuple[dict[str, float], float, float | None]:
        """Network steps over one epoch: (summed loss parts, last lr, training accuracy)."""
        cfg = self.config.train
        network_opt = optimizers["network"]
        total_steps = self._network_steps(run)
        steps = self.steps_per_epoch()
        sums: dict[str, float] = {}
        correct = seen = 0
        lr = 0.0
        self.model.train()
        for step, (index, raw) in enumerate(zip(order, self.reader.read(order), strict=True)):
            position = run.epoch * steps + step
            lr = learning_rate(position, total_steps, cfg.lr, cfg.lr_schedule, cfg.warmup_fraction)
            set_learning_rate(network_opt, lr)
            x, targets = self.batches.prepare(raw, index, rng, augment=True)
            out = self._forward_loss(
                x, targets, Step(phase, run.epoch, position, run.epochs * steps)
            )
            parts = agreement.agreed_parts(out.loss.parts, self.dist)
            self.guard.check_loss(parts, run.epoch, step, lr)
            self._update(out.loss.total, optimizers, phase, self.scaler)
            if ema is not None:
                ema.update(self.model)
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value
            if out.logits is not None and not self.config.model.multilabel and targets.ndim == 1:
                correct += int((out.logits.argmax(1) == targets).sum())
                seen += len(targets)
            if bar is not None:
                bar.update(1)
                if step % 5 == 0 or step == len(order) - 1:
                    shown = log_lines.running_losses(sums, step + 1, self.method.shown_losses)
                    bar.set_postfix_str(f"epoch {run.epoch + 1}/{run.epochs}, {shown}")
        return sums, lr, agreement.agreed_accuracy(correct, seen, self.dist)

    def _frozen_network_epoch(
        self,
        run: RunState,
        phase: Phase,
        features: np.ndarray,
        order: np.ndarray,
        optimizer: torch.optim.Optimizer,
        bar: Any,
    ) -> dict[str, float]:
        """One epoch of codebook-only training on float32 (N, D) features of the frozen
        network."""
        codebooks = list(self.method.codebook_parameters(self.model).values())
        sums: dict[str, float] = {}
        for step, index in enumerate(order):
            x = torch.from_numpy(features[index]).to(self.device)
            loss = self.method.frozen_features_loss(self.model, self.loss_fn, x)
            parts = agreement.agreed_parts(loss.parts, self.dist)
            self.guard.check_loss(parts, run.epoch, step, 0.0)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            agreement.agreed_gradients(codebooks, self.dist)  # not through DDP: all-reduced here
            optimizer.step()
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value
            if bar is not None:
                bar.update(1)
                shown = log_lines.running_losses(sums, step + 1, self.method.shown_losses)
                bar.set_postfix_str(f"phase {phase.name} (network frozen), {shown}")
        return sums

    def _finish(self, run: RunState, ema: WeightAverage | None, started: float) -> TrainResult:
        """Final weights (the average, unless a frozen network was already the average),
        the method's final codebook initialisation, the saved model."""
        frozen = not self.method.phase(second=True).trains_network
        if ema is not None and not (frozen and run.switch_epoch < run.epochs):
            self.model.load_state_dict(ema.state)
        if self.method.final_codebook_init():
            features = self.features.eval_mode()
            initialise_codebooks(self.method, self.model, features, self.dist, self.log)
        self.model.eval()
        wall = self.clock() - started
        extra = {
            "epochs": run.epochs,
            "plan": run.plan,
            "history": run.history,
            "precision": self.precision,
        }

        def save() -> str:
            path = self.model.save_checkpoint(self.run_dir.model_dir, extra, self.config)
            return str(path)

        model_dir = Path(ddp.rank0_decides(self.dist, save, "saving the final model"))
        self.log(f"saved the model to {model_dir} ({run.epochs} epochs, {wall:.1f} s in this call)")
        return TrainResult(
            model=self.model,
            epochs=run.epochs,
            history=run.history,
            wall_seconds=wall,
            model_dir=model_dir,
            resumed_from_epoch=run.resumed_from,
            planned=run.plan,
            precision=self.precision,
            rank=self.dist.rank if self.dist is not None else 0,
            world_size=self.dist.world_size if self.dist is not None else 1,
        )

    # -------------------------------------------------------------- steps and batches

    def _forward_loss(self, x: torch.Tensor, targets: torch.Tensor, step: Step) -> StepOutput:
        if self._net is not None:  # DistributedDataParallel around a StepModule
            total, logits, parts = self._net(x, targets, step)
            return StepOutput(LossOutput(total, parts), logits)
        return self.method.forward_loss(self.model, self.loss_fn, x, targets, step, self.precision)

    def _network_steps(self, run: RunState) -> int:
        """Steps of the network's learning-rate schedule (up to a frozen second phase)."""
        frozen = not self.method.phase(second=True).trains_network
        return (run.switch_epoch if frozen else run.epochs) * self.steps_per_epoch()

    # -------------------------------------------------------------- optimizers

    def _make_optimizers(
        self, model: RetrievalNetwork | None = None
    ) -> dict[str, torch.optim.Optimizer]:
        """The network's optimizer ("network") and the method's codebooks' ("codebooks")."""
        return build_optimizers(
            self.model if model is None else model, self.method, self.config.train
        )

    def _update(
        self,
        loss: torch.Tensor,
        optimizers: dict[str, torch.optim.Optimizer],
        phase: Phase,
        scaler: torch.amp.GradScaler,
    ) -> None:
        """Back-propagate a batch's loss and step the network (its gradient clipped when
        ``train.grad_clip`` says so) and, in a phase that trains them, the codebooks."""
        network = optimizers["network"]
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        if not loss.requires_grad:
            return
        scaler.scale(loss).backward()
        clip = self.config.train.grad_clip
        if clip > 0:
            scaler.unscale_(network)
            torch.nn.utils.clip_grad_norm_(
                [p for g in network.param_groups for p in g["params"]], clip
            )
        scaler.step(network)
        if phase.trains_codebooks:
            for name, optimizer in optimizers.items():
                if name != "network":
                    scaler.step(optimizer)
        scaler.update()

    def _seconds_per_step(self, max_steps: int = 12, warmup_steps: int = 2) -> float:
        """Seconds per training step, measured on a throw-away copy of model and optimizers
        (and a scaler of their own; torch's random state is put back)."""
        rng_state = torch.get_rng_state()
        model = copy.deepcopy(self.model)
        try:
            optimizers = self._make_optimizers(model)
            model.train()
            order, rng = self.batches.order(10**6)
            rows = list(order[: max_steps + warmup_steps])
            timed = Step(self.method.timed_phase())
            scaler = gradient_scaler(self.device, self.precision)

            def one_step(step: int, raw: torch.Tensor) -> None:
                x, targets = self.batches.prepare(raw, rows[step], rng, augment=True)
                out = self.method.forward_loss(
                    model, self.loss_fn, x, targets, timed, self.precision
                )
                self._update(out.loss.total, optimizers, timed.phase, scaler)

            return measure_step_seconds(self.reader.read(rows), one_step, self.clock, warmup_steps)
        finally:
            torch.set_rng_state(rng_state)


def train_model(
    config: DPQConfig,
    dataset: LabelledInputs,
    word_vectors: np.ndarray | None,
    out_dir: str | Path | RunDirectory,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    device: str | torch.device | None = "cpu",
    workers: int | None = None,
    distributed: DistributedContext | None | str = "auto",
) -> TrainResult:
    """Build the network of ``config``'s method (seeded by ``train.seed``) and train it on
    ``device`` (``"auto"``: CUDA where there is a GPU), reading on-demand images with
    ``workers`` processes; under torchrun with DistributedDataParallel (``distributed``,
    see :class:`Trainer`).

    On ``resume`` the network is rebuilt from the same config and then loaded from the newest
    checkpoint in ``out_dir``.
    """
    target = resolve_device(device)  # a clear error before anything is built
    method = method_for(config)
    seed_everything(config.train.seed)
    model = method.build_network()
    trainer = Trainer(
        config,
        model,
        dataset,
        word_vectors,
        out_dir,
        progress=progress,
        log=log,
        device=target,
        workers=workers,
        distributed=distributed,
    )
    return trainer.train(resume=resume)
