"""What a training run keeps on disk: epoch checkpoints and the run folder (a model
checkpoint itself is :mod:`dpq.model.files`).

- A :class:`CheckpointStore` keeps the epoch checkpoints of a run,
  ``<run>/checkpoints/epoch-NNNN/`` (a model checkpoint plus ``optimizer.safetensors`` and
  ``trainer_state.json``), each written to a temporary folder and renamed, so an epoch
  checkpoint is complete or absent; it finds the newest, loads it for a resume, prunes old
  ones and removes what a crashed writer left behind.
- A :class:`RunDirectory` is a run's output folder: it tells whether the folder already
  holds a run (a checkpoint, or a final ``model/``), and holds an advisory lock
  (``fcntl.flock`` on ``.dpq-run.lock``) for the whole run, so a second process writing
  into the same folder is refused instead of interleaving with the first.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dpq.atomic import write_json_atomic
from dpq.config import DPQConfig
from dpq.model.files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_architecture,
    load_weights,
    read_checkpoint_config,
    save_model,
    save_tensors,
)

if TYPE_CHECKING:  # pragma: no cover
    from dpq.model.retrieval_network import RetrievalNetwork

CHECKPOINTS_DIR = "checkpoints"
FINAL_MODEL_DIR = "model"
LOG_FILE = "train_log.jsonl"
LOCK_FILE = ".dpq-run.lock"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FORMAT = "dpq-trainer-state"
STATE_VERSION = 1
_TEMPORARY = re.compile(r"^\.epoch-\d+\.tmp-\d+$")


# ------------------------------------------------------------------------- optimizer state


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, prefix: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON metadata."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for index, entries in state["state"].items():
        plain: dict[str, Any] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{key}"] = value
            else:
                plain[key] = value
        meta["state"][str(index)] = plain
    return tensors, meta


def restore_optimizer(
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    meta: dict[str, Any],
    prefix: str,
) -> None:
    """Inverse of :func:`optimizer_tensors` (tensors follow the parameters' device)."""
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, value in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        index, key = name[len(prefix) + 1 :].split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ------------------------------------------------------------------------- the run folder


class RunInProgressError(RuntimeError):
    """Another process holds the run folder's lock (it is training into it right now)."""


class RunDirectory:
    """A training run's output folder: final model, epoch checkpoints, log, split, lock.

    Args:
        path: the folder (created when the run starts).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_handle: Any = None
        self._lock_depth = 0

    @property
    def model_dir(self) -> Path:
        return self.path / FINAL_MODEL_DIR

    @property
    def log_file(self) -> Path:
        return self.path / LOG_FILE

    @property
    def checkpoints(self) -> CheckpointStore:
        return CheckpointStore(self.path / CHECKPOINTS_DIR)

    def check_writable(self) -> None:
        """ValueError (one sentence) unless the run folder can be created and written."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out {path} is an existing file; give a folder for the run.")
        parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
        if not parent.is_dir():
            raise ValueError(f"--out {path} lies under {parent}, which is a file, not a folder.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"--out {path}: {parent} is not writable; choose another folder.")

    def existing_run(self) -> str | None:
        """What already makes this folder a run ("checkpoint epoch-0007", "final model"), or
        None for a fresh folder."""
        latest = self.checkpoints.latest()
        if latest is not None:
            return f"checkpoint {latest.name}"
        if (self.model_dir / CONFIG_FILE).exists() or (self.model_dir / WEIGHTS_FILE).exists():
            return f"a final model in {self.model_dir}"
        return None

    def running_holder(self) -> str | None:
        """Who holds the lock when another process trains into this folder right now
        ("pid 123 on host"), else None."""
        if self._lock_depth or not (self.path / LOCK_FILE).is_file():
            return None
        with open(self.path / LOCK_FILE, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                return handle.read().strip() or "another process"
            fcntl.flock(handle, fcntl.LOCK_UN)
        return None

    def check_can_start(self, resume: bool) -> None:
        """Refuse to start while another process trains here, to start a fresh run over an
        existing one, or to resume nothing.

        Raises:
            RunInProgressError: another process holds the folder's lock.
            ValueError: the folder holds a run (a checkpoint or a final model) and ``resume``
                is false; ``resume`` is true but there is no checkpoint to continue.
        """
        holder = self.running_holder()
        if holder is not None:
            raise RunInProgressError(
                f"{self.path} is in use by a training run right now ({holder}); wait for it "
                "to finish, or choose another --out."
            )
        existing = self.existing_run()
        if existing is not None and not resume:
            raise ValueError(
                f"{self.path} already holds a training run ({existing}); pass --resume to "
                "continue it, or choose another output directory."
            )
        if resume and self.checkpoints.latest() is None:
            finished = " (its final model is there: the run finished)" if existing else ""
            raise ValueError(
                f"nothing to resume: {self.checkpoints.root} holds no complete checkpoint"
                f"{finished}."
            )

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's advisory lock for the block (re-entrant for this object).

        Raises RunInProgressError naming the process that holds it.
        """
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.check_writable()
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK_FILE, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunInProgressError(
                f"{self.path} is in use by a training run right now ({holder}); wait for it "
                "to finish, or choose another --out."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        self._lock_handle, self._lock_depth = handle, 1
        try:
            yield
        finally:
            self._lock_depth = 0
            self._lock_handle = None
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    def append_log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``train_log.jsonl``."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "a") as handle:
            handle.write(json.dumps(record) + "\n")


class CheckpointStore:
    """The epoch checkpoints of a run, ``<root>/epoch-NNNN/``.

    Args:
        root: the ``checkpoints`` folder of the run.
        keep: how many of the newest checkpoints :meth:`save` leaves on disk.
    """

    def __init__(self, root: str | Path, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep

    def complete(self) -> list[Path]:
        """Complete epoch checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [
            p
            for p in self.root.iterdir()
            if p.is_dir() and p.name.startswith("epoch-") and (p / STATE_FILE).is_file()
        ]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.complete()
        return found[-1] if found else None

    def remove_temporaries(self) -> list[Path]:
        """Delete ``.epoch-NNNN.tmp-PID`` folders left by a writer that crashed; returns them.
        Call only while holding the run's lock (then no other writer is active)."""
        if not self.root.is_dir():
            return []
        stale = [p for p in self.root.iterdir() if p.is_dir() and _TEMPORARY.match(p.name)]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return stale

    def save(
        self,
        epoch: int,
        model: RetrievalNetwork,
        config: DPQConfig,
        state: dict[str, Any],
        optimizers: Mapping[str, torch.optim.Optimizer],
        averaged: Mapping[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write the checkpoint after ``epoch`` (1-based) and prune old ones.

        Args:
            epoch: epochs completed.
            model, config: the model and the run's config.
            state: JSON-ready trainer state (plan, history, ...).
            optimizers: name -> optimizer, saved in ``optimizer.safetensors``.
            averaged: the weight average's tensors (EMA), or None.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"epoch-{epoch:04d}"
        tmp = self.root / f".{final.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        save_model(model, tmp, config=config, extra={"epoch": epoch})
        tensors: dict[str, torch.Tensor] = {}
        metas: dict[str, Any] = {}
        for name, optimizer in optimizers.items():
            optimizer_state, metas[name] = optimizer_tensors(optimizer, name)
            tensors.update(optimizer_state)
        if averaged is not None:
            tensors.update({f"ema.{k}": v for k, v in averaged.items()})
        save_tensors(tmp / OPTIMIZER_FILE, tensors)
        record = {"format": STATE_FORMAT, "version": STATE_VERSION, **state, "optimizers": metas}
        write_json_atomic(tmp / STATE_FILE, record, indent=1)
        if final.exists():  # a re-run of this epoch after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def read_state(self, path: Path) -> dict[str, Any]:
        """The trainer state of a checkpoint (format and version checked)."""
        state = json.loads((path / STATE_FILE).read_text())
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"{path / STATE_FILE} is not a dpq trainer state (version {STATE_VERSION})."
            )
        return state

    def restore(
        self,
        path: Path,
        model: RetrievalNetwork,
        optimizers: Mapping[str, torch.optim.Optimizer],
        averaged: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Load a checkpoint's weights, optimizer states and weight average in place."""
        from safetensors.torch import load_file

        state = self.read_state(path)
        saved, meta = read_checkpoint_config(path)
        check_architecture(path, saved, model.config)
        load_weights(model, path, meta)
        tensors = load_file(str(path / OPTIMIZER_FILE), device=str(model.device))
        for name, optimizer in optimizers.items():
            restore_optimizer(optimizer, tensors, state["optimizers"][name], name)
        if averaged is not None:
            for name in averaged:
                averaged[name].copy_(tensors[f"ema.{name}"])
