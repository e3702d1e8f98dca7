"""The training loop of any registered method: seeded data order, the method's loss terms
weighted and summed, step decay, gradient clipping, validation by rSum keeping the best
checkpoint, CSV logs, atomic checkpoints and an exact ``resume``."""

from __future__ import annotations

import csv
import io
import math
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastalign import distributed
from fastalign._files import atomic_write, partial_path, remove_partial
from fastalign.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_atomic
from fastalign.config import TrainConfig
from fastalign.data import (
    GLOVE_FILE,
    PrecompDataset,
    data_fingerprint,
    ensure_synthetic,
    synthetic_folder,
)
from fastalign.methods import LossContext, get_method
from fastalign.methods.base import RunData
from fastalign.model_evaluation import evaluate_trained
from fastalign.progress import progress_iter

# What a run writes into its output_dir: an existing one is resumed or overwritten, never
# silently replaced.
RUN_FILES = ("last.pt", "best.pt", "log.csv", "tensorboard")
# The files a run writes through a temporary ``NAME.partial`` (fastalign._files).
_ATOMIC_FILES = ("last.pt", "best.pt", "log.csv")

# Settings a resumed run may change: they do not change what was trained so far. Any other
# difference from the run's saved configuration is an error. The data are identified by
# their fingerprint (checked separately), so data_root and synthetic_root may name the same
# data elsewhere; word_vectors only initialise a new run; skip_nonfinite may be turned on
# to get past a bad batch; model.backend picks a kernel, not the model.
RESUME_MAY_CHANGE = (
    "name",
    "epochs",
    "val_every",
    "output_dir",
    "device",
    "max_val_images",
    "test_split",
    "data_root",
    "synthetic_root",
    "word_vectors",
    "skip_nonfinite",
    "model.backend",
)


class NonFiniteError(RuntimeError):
    """A training step met a non-finite loss or gradient norm (the message says where)."""


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def config_differences(saved: TrainConfig, current: TrainConfig) -> list[tuple[str, Any, Any]]:
    """``(key, value in current, value in saved)`` for every setting (``model.x``,
    ``<method>.x`` as dotted keys) that differs, in the order of the configuration. When
    the methods differ only ``method`` is named, not each option of the two sections."""
    old, new = _flatten(saved.to_dict()), _flatten(current.to_dict())
    if saved.method != current.method:
        sections = (f"{saved.method}.", f"{current.method}.")
        old = {k: v for k, v in old.items() if not k.startswith(sections)}
        new = {k: v for k, v in new.items() if not k.startswith(sections)}
    keys = dict.fromkeys([*new, *old])
    return [(k, new.get(k), old.get(k)) for k in keys if new.get(k) != old.get(k)]


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def data_root_of(config: TrainConfig) -> Path:
    """The dataset folder of ``config``, resolved (absolute); the synthetic one is generated
    if absent, after saying where."""
    if config.data_root != "synthetic":
        return Path(config.data_root).resolve()
    kind = {"preset": config.synthetic_preset, "seed": config.data_seed}
    folder = synthetic_folder(config.synthetic_root, **kind).resolve()
    if not (folder / "meta.json").is_file() and distributed.rank() == 0:
        print(
            f"generating the synthetic dataset (preset {kind['preset']}, data seed "
            f"{kind['seed']}) in {folder}",
            file=sys.stderr,
            flush=True,
        )
    return ensure_synthetic(folder.parent, **kind).resolve()


def _word_vectors_path(config: TrainConfig, root: Path) -> Path | None:
    """The run's word-vector file: ``word_vectors``, or the synthetic set's own."""
    if config.word_vectors is not None:
        return Path(config.word_vectors)
    return root / GLOVE_FILE if config.data_root == "synthetic" else None


def check_same_data(recorded: dict, root: Path, fingerprint: str, what: str) -> None:
    """ValueError when ``fingerprint`` (of ``root``) differs from a checkpoint's record."""
    if recorded.get("fingerprint") not in (None, fingerprint):
        raise ValueError(
            f"{what}: the data at {root} (fingerprint {fingerprint}) are not the data the "
            f"checkpoint was trained on ({recorded.get('root')}, fingerprint "
            f"{recorded['fingerprint']})"
        )


def _available(device: torch.device) -> torch.device:
    """``device`` if this machine has it, else ValueError naming the ``device`` key."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device={device}, but torch finds no CUDA device here (torch "
                f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use "
                f"device=cpu or device=auto"
            )
        if device.index is not None and device.index >= count:
            raise ValueError(f"device={device}, but this machine has {count} CUDA device(s)")
    return device


# --------------------------------------------------------------------------- training
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class Trainer:
    """Trains the method ``config.method`` as ``config`` says; ``fit()`` returns the best
    validation results.

    ``output_dir`` must not hold a run unless ``resume`` (continue from ``last.pt`` exactly
    where it stopped: same data order, optimiser, random and method state, on the same data)
    or ``overwrite`` (delete it and start again).
    """

    def __init__(
        self,
        config: TrainConfig,
        resume: bool = False,
        progress: bool = True,
        overwrite: bool = False,
    ) -> None:
        config.check()  # again: fields may have been assigned since it was built
        if resume and overwrite:
            raise ValueError("resume and overwrite exclude each other")
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.progress = progress
        # Under torchrun every process trains on its share of each global batch.
        self.device = distributed.setup_from_env(
            timeout=distributed.timeout_from_minutes(config.dist_timeout_minutes)
        )
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        if config.batch_size % self.world_size:
            raise ValueError(
                f"batch_size = {config.batch_size} must be a multiple of the "
                f"world size {self.world_size}"
            )
        if self.world_size == 1:
            if config.device == "auto":
                self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            else:
                self.device = _available(torch.device(config.device))
        checkpoint = None
        if resume:
            last = self.output_dir / "last.pt"
            if not last.exists():
                raise FileNotFoundError(
                    f"--resume: {last} does not exist, so there is no run to continue; start "
                    f"it without --resume"
                )
            checkpoint = load_checkpoint(last)
            self._check_resumed_config(checkpoint)
        else:
            self._claim_output_dir(overwrite)
        self.resumed = resume
        self._remove_partials()
        self.data_root = root = data_root_of(config)
        self.data_fingerprint = data_fingerprint(root)
        if checkpoint is not None:
            check_same_data(checkpoint["data"], root, self.data_fingerprint, "--resume")
        self.method = get_method(config.method)(config)
        if self.method.training_free and config.epochs > 0:
            raise ValueError(
                f"method {config.method!r} has nothing to train: set epochs=0 (got "
                f"epochs={config.epochs})"
            )
        self.data = RunData(root, _word_vectors_path(config, root))
        self.vocab = self.method.tokenizer(self.data, checkpoint["vocab"] if checkpoint else None)
        word_vectors = None
        if checkpoint is None:
            word_vectors = self.method.initial_word_vectors(self.data, self.vocab)
        if self.method.paired_training:
            self.data.train_set = PrecompDataset(
                root, config.train_split, self.vocab, config.captions_per_image
            )
            self.data.train_set.check_feature_dim(config.model.feature_dim, "the model")
        self.val_set = PrecompDataset(
            root,
            config.val_split,
            self.vocab,
            config.captions_per_image,
            max_images=config.max_val_images,
        )
        self.val_set.check_feature_dim(config.model.feature_dim, "the model")
        # Seeded once the data are ready: whatever preparing them ran (generating the
        # synthetic set or not) cannot shift the random streams of the run.
        _seed_everything(config.seed)
        self.model = self.method.build_model(len(self.vocab), word_vectors).to(self.device)
        if checkpoint is None:
            self.method.prepare(self.model, self.data, self.vocab)
        self.ddp = None
        if self.world_size > 1:
            device_ids = [self.device] if self.device.type == "cuda" else None
            with distributed.collective("broadcast of the initial parameters (DDP)"):
                self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids)
        optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
        # A training-free method has no optimiser.
        self.optimizer = self.scheduler = None
        if not self.method.training_free:
            self.optimizer = optimizers[config.optimizer](
                self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
            )
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
                self.optimizer, milestones=config.lr_decay_epochs, gamma=config.lr_decay
            )
        self.epoch, self.step, self.best_rsum = 0, 0, float("-inf")
        self.history: list[dict] = []
        if checkpoint is not None:
            self._restore(checkpoint)
        self.tensorboard = (
            _tensorboard_writer(self.output_dir / "tensorboard") if self.rank == 0 else None
        )

    def _claim_output_dir(self, overwrite: bool) -> None:
        found = [name for name in RUN_FILES if (self.output_dir / name).exists()]
        if not found:
            return
        if not overwrite:
            raise FileExistsError(
                f"output_dir {self.output_dir} holds a run ({', '.join(found)}): pass --resume "
                f"to continue it or --overwrite to start again"
            )
        if self.rank == 0:
            for name in found:
                path = self.output_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        if self.world_size > 1:
            with distributed.collective("barrier after rank 0 cleared output_dir"):
                torch.distributed.barrier()

    def _check_resumed_config(self, checkpoint: dict) -> None:
        """ValueError naming every setting that differs from the run's saved configuration
        and may not change mid-run (RESUME_MAY_CHANGE); the others are printed."""
        where = self.output_dir
        try:
            saved = TrainConfig.from_dict(checkpoint["config"])
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"resume: the configuration of the run at {where} cannot be loaded: {exc}"
            ) from exc
        differences = config_differences(saved, self.config)
        refused = [d for d in differences if d[0] not in RESUME_MAY_CHANGE]
        if refused:
            parts = [
                f"{key} is {_show(new)} in this config but {_show(old)} in the run"
                for key, new, old in refused
            ]
            parts[0] += f" at {where}"
            raise ValueError(
                f"resume: {'; '.join(parts)}. A resumed run may change only "
                f"{', '.join(RESUME_MAY_CHANGE)}: use the run's settings, or start a new run "
                f"(--overwrite, or another output_dir)"
            )
        if self.rank == 0:
            for key, new, old in differences:
                print(f"resume: {key} is {_show(new)} (was {_show(old)})", file=sys.stderr)

    def _remove_partials(self) -> None:
        """Removes the temporary files that a killed write left in the output folder."""
        if self.rank != 0:
            return
        for name in _ATOMIC_FILES:
            if remove_partial(self.output_dir / name):
                print(
                    f"removed {partial_path(self.output_dir / name)}, left by an interrupted write",
                    file=sys.stderr,
                )

    def _restore(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.method.load_state_dict(checkpoint["method_state"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.epoch, self.step = checkpoint["epoch"], checkpoint["step"]
        self.best_rsum, self.history = checkpoint["best_rsum"], checkpoint["history"]
        _set_rng_state(checkpoint["rng"])

    def _checkpoint(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "vocab": self.vocab.to_dict(),
            "model": self.model.state_dict(),
            "method_state": self.method.state_dict(),
            "data": {"root": str(self.data_root), "fingerprint": self.data_fingerprint},
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "epoch": self.epoch,
            "step": self.step,
            "best_rsum": self.best_rsum,
            "history": self.history,
            "rng": _rng_state(),
        }

    def _loss(self, batch, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the weighted sum of the method's terms to differentiate, each unweighted term's
        value on the global batch, detached: read them with one sync, after backward)."""
        c = self.config
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if c.amp and self.device.type == "cuda"
            else nullcontext()
        )
        if self.ddp is not None:  # this rank's slice of the global batch
            share = len(batch.regions) // self.world_size
            batch = type(batch)(*(x[self.rank * share : (self.rank + 1) * share] for x in batch))
        batch = batch.to(self.device)
        with autocast:
            terms = self.method.batch_terms(
                self.model, self.ddp or self.model, batch, LossContext(batch=batch, epoch=epoch)
            )
        weights = self.method.loss_weights()
        total = sum((weights[name] * term for name, term in terms.items()), 0.0)
        # One reduction for every term: each is reported as its mean over the processes.
        term_values = torch.stack([term.detach().float() for term in terms.values()])
        if self.ddp is not None:
            with distributed.collective("all_reduce of the loss values"):
                torch.distributed.all_reduce(term_values)
            term_values /= self.world_size
        return total, dict(zip(terms, term_values))

    def _grad_norm(self) -> torch.Tensor:
        """The gradients' total 2-norm, clipped to ``grad_clip`` when that is > 0 (the
        norm before clipping either way); no sync."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        if self.config.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        if not grads:
            return torch.zeros((), device=self.device)
        if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
            return torch.nn.utils.get_total_norm(grads)
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
        )

    def train_step(self, batch) -> dict[str, float]:
        """One optimiser step on a global batch (a :class:`~fastalign.data.PairBatch`);
        returns the logged values (``loss`` and each ``loss_<term>``) and appends them to
        the history. The gradients stay in the parameters' ``.grad`` until the next step.

        A non-finite loss or gradient norm (or input features, which the operators refuse
        on the CPU) raises :class:`NonFiniteError` before any weight changes; with
        ``skip_nonfinite`` the batch is skipped instead (no update, a warning, and
        ``skipped_batches: 1`` in the returned values and its history row)."""
        self.optimizer.zero_grad(set_to_none=True)
        try:
            total, terms = self._loss(batch, self.epoch)
        except ValueError as exc:
            # The operators check their inputs where that costs no sync (CPU tensors).
            if not self._nonfinite_images(batch):
                raise
            return self._nonfinite_step(batch, {"loss": math.nan}, f"input ({exc})", exc)
        # Under DDP the backward all-reduces the gradients.
        with distributed.collective("all_reduce of the gradients (backward)"):
            total.backward()
        grad_norm = self._grad_norm()
        # One sync per step reads the terms and the norm together.
        numbers = torch.cat([*(t.reshape(1) for t in terms.values()), grad_norm.reshape(1)])
        *term_values, norm = numbers.tolist()
        values = {f"loss_{name}": v for name, v in zip(terms, term_values)}
        weights = self.method.loss_weights()
        loss = sum(weights[name] * values[f"loss_{name}"] for name in terms)
        values = {"loss": loss, **values}
        if not (math.isfinite(loss) and math.isfinite(norm)):
            what = [
                f"{name} ({value})"
                for name, value in (("loss", loss), ("gradient norm", norm))
                if not math.isfinite(value)
            ]
            return self._nonfinite_step(batch, values, " and ".join(what))
        self.optimizer.step()
        self.step += 1
        self._record_step(values)
        return values

    def _record_step(self, values: dict[str, float]) -> None:
        self.history.append(
            {
                "epoch": self.epoch + 1,
                "step": self.step,
                **values,
                "lr": self.optimizer.param_groups[0]["lr"],
            }
        )

    def _nonfinite_images(self, batch) -> list[int]:
        """The rows of the features file (``batch.source_rows()``) whose features in
        ``batch`` are not all finite."""
        finite = torch.isfinite(batch.regions.flatten(1)).all(dim=1).cpu()
        return sorted(set(batch.source_rows()[~finite].tolist()))

    def _nonfinite_step(
        self, batch, values: dict[str, float], what: str, cause: Exception | None = None
    ) -> dict[str, float]:
        """Raises NonFiniteError, or with ``skip_nonfinite`` records the step as skipped."""
        step = self.step + 1
        problem = f"epoch {self.epoch + 1}, step {step}: non-finite {what} on {batch.describe()}"
        bad = self._nonfinite_images(batch)
        rows = ", ".join(map(str, bad))
        if bad:
            plural = "s" if len(bad) > 1 else ""
            source = self.method.train_features_file(self.data)
            problem += f"; the features of row{plural} {rows} of {source} are not finite"
        else:
            problem += (
                "; every feature of the batch is finite: the model or the loss overflowed "
                "(a lower lr or a grad_clip may help)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if not self.config.skip_nonfinite:
            kept = self.output_dir / "last.pt"
            kept = (
                f"the last good checkpoint {kept} (epoch {self.epoch}) is kept"
                if kept.is_file()
                else f"no checkpoint was written in {self.output_dir}"
            )
            raise NonFiniteError(
                f"{problem}. Training stopped before this step changed any weight; {kept}. "
                f"Fix the data, or set skip_nonfinite=true to skip such batches"
            ) from cause
        if self.rank == 0:
            print(f"warning: {problem}: batch skipped (skip_nonfinite)", file=sys.stderr)
        self.step = step
        values = values | {"skipped_batches": 1}
        self._record_step(values)
        return values

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training set; returns the epoch's mean of every logged value
        (``loss`` and each ``loss_<term>``) over the batches not skipped, the number of
        ``skipped_batches`` (non-finite, with ``skip_nonfinite``) and ``epoch_seconds``."""
        c = self.config
        loader = self.method.train_loader(self.data, self.epoch, self.world_size)
        self.model.train()
        bar = _progress(loader, f"epoch {self.epoch + 1}/{c.epochs}", self.progress)
        totals: dict[str, float] = {}
        skipped = 0
        start = time.perf_counter()
        for k, batch in enumerate(bar):
            values = self.train_step(batch)
            if values.get("skipped_batches"):
                skipped += 1
                continue  # out of the means: its values need not be finite
            for name, value in values.items():
                totals[name] = totals.get(name, 0.0) + value
            pairs_per_s = (k + 1) * c.batch_size / (time.perf_counter() - start)
            if self.tensorboard is not None:
                for name, term in values.items():
                    self.tensorboard.add_scalar(f"train/{name}", term, self.step)
            if hasattr(bar, "set_postfix"):
                shown = {_term_label(name): f"{value:.4g}" for name, value in values.items()}
                bar.set_postfix(**shown, pairs_per_s=f"{pairs_per_s:.0f}")
        self.scheduler.step()
        taken = len(loader) - skipped
        means = {name: total / taken for name, total in totals.items()} if taken else {}
        means.setdefault("loss", math.nan)  # every batch skipped
        return means | {"skipped_batches": skipped, "epoch_seconds": time.perf_counter() - start}

    def fit(self) -> dict:
        """Trains to ``config.epochs``; returns the best validation results of the run
        (empty before its first validation)."""
        out = self.output_dir
        if self.resumed and self.rank == 0:
            # The log is rewritten from the checkpoint's history: a kill between the two
            # writes of an epoch leaves them disagreeing until then.
            self._write_log()
        if self.config.epochs == 0 and not self.history:
            # A training-free method: the prepared model is the run's result.
            results = self._validate({})
            if self.rank == 0:
                shown = f"val rSum {results['rsum']:.1f}"
                print(f"epochs 0, nothing to train: {shown}", file=sys.stderr)
                self._write_log()
            self._save("last.pt")
        elif self.epoch >= self.config.epochs and self.rank == 0:
            best = self._best_results()
            shown = f" (best validation rSum {best['rsum']:.1f})" if best else ""
            print(
                f"{out}: the run is finished ({self.epoch} of {self.config.epochs} "
                f"epochs); nothing to train. Results: {out / 'best.pt'}{shown}, "
                f"{out / 'last.pt'}, {out / 'log.csv'}",
                file=sys.stderr,
            )
        while self.epoch < self.config.epochs:
            means = self.train_epoch()
            self.epoch += 1
            self.method.on_epoch_end(self.model, self.epoch)
            method_values = self._method_epoch_logs()
            means |= method_values  # logged with the epoch's means
            self._check_finite_weights()
            if self.epoch % self.config.val_every == 0 or self.epoch == self.config.epochs:
                results = self._validate(means)
                if self.rank == 0:
                    print(_epoch_line(self.epoch, means, results, method_values), file=sys.stderr)
            # The log first: a kill before last.pt is written makes a resume redo the
            # epoch and rewrite the log from the checkpoint's history.
            if self.rank == 0:
                self._write_log()
            self._save("last.pt")
        return self._best_results()

    def _validate(self, means: dict[str, float]) -> dict[str, float]:
        """Validation results of the model as it is now; recorded in the history with the
        epoch's training ``means``, sent to TensorBoard, and saved as best.pt when best."""
        results = evaluate_trained(self.method, self.model, self.val_set)
        self.history.append(
            {
                "epoch": self.epoch,
                "step": self.step,
                **means,
                **{f"val_{k}": v for k, v in results.items()},
            }
        )
        if self.tensorboard is not None:
            for key, value in results.items():
                self.tensorboard.add_scalar(f"val/{key}", value, self.step)
        if results["rsum"] > self.best_rsum:
            self.best_rsum = results["rsum"]
            self._save("best.pt")
        return results

    def _method_epoch_logs(self) -> dict[str, float]:
        """The method's epoch values (:meth:`Method.epoch_logs`): its tensors go to TensorBoard
        as histograms; its floats are returned, to be logged with the epoch's means."""
        scalars = {}
        for name, value in self.method.epoch_logs().items():
            if isinstance(value, torch.Tensor):
                if self.tensorboard is not None:
                    self.tensorboard.add_histogram(f"method/{name}", value, self.step)
                continue
            scalars[name] = float(value)
            if self.tensorboard is not None:
                self.tensorboard.add_scalar(f"method/{name}", value, self.step)
        return scalars

    def _best_results(self) -> dict:
        """The validation results of best.pt (from the history), or {} before any."""
        for row in self.history:
            if row.get("val_rsum") == self.best_rsum:
                return {k[4:]: v for k, v in row.items() if k.startswith("val_")}
        return {}

    def _check_finite_weights(self) -> None:
        """RuntimeError naming the parameters that are not finite: they are never saved."""
        state = self.model.state_dict()
        floats = {k: v for k, v in state.items() if v.is_floating_point()}
        if not floats or bool(
            torch.stack([torch.isfinite(v).all() for v in floats.values()]).all()
        ):
            return
        bad = [k for k, v in floats.items() if not torch.isfinite(v).all()]
        raise NonFiniteError(
            f"epoch {self.epoch}: the weights {', '.join(bad)} are not finite; nothing of this "
            f"epoch is saved (the last good checkpoint in {self.output_dir} is kept)"
        )

    def _save(self, name: str) -> None:
        """Rank 0 writes (every rank holds the same weights); the others wait for it."""
        if self.rank == 0:
            save_atomic(self._checkpoint(), self.output_dir / name)
        if self.world_size > 1:
            with distributed.collective(f"barrier while rank 0 writes {name}"):
                torch.distributed.barrier()

    def _write_log(self) -> None:
        """log.csv from the history (written whole or not at all)."""
        columns = list(dict.fromkeys(k for row in self.history for k in row))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.history)
        with atomic_write(self.output_dir / "log.csv") as f:
            f.write(text.getvalue().encode("utf-8"))


def _tensorboard_writer(folder: Path):
    """A TensorBoard SummaryWriter when tensorboard is installed, else None (CSV only)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def _progress(iterable, description: str, enabled: bool):
    # Rank 0 only, on a terminal only: see fastalign.progress.
    return progress_iter(iterable, description, enabled)


def _term_label(name: str) -> str:
    """``loss_match`` -> ``match``; ``loss`` stays."""
    return name.removeprefix("loss_")


def _epoch_line(
    epoch: int,
    means: dict[str, float],
    results: dict[str, float],
    method_values: dict[str, float],
) -> str:
    terms = [f"{_term_label(k)} {v:.4g}" for k, v in means.items() if k.startswith("loss_")]
    skipped = means.get("skipped_batches", 0)
    plural = "es" if skipped > 1 else ""
    shown = ", ".join(f"{k} {v:.4g}" for k, v in method_values.items())
    return (
        f"epoch {epoch}: loss {means['loss']:.4f} ({', '.join(terms)})  "
        f"val rSum {results['rsum']:.1f}  [{means['epoch_seconds']:.0f} s]"
        + (f"  skipped {skipped} non-finite batch{plural}" if skipped else "")
        + (f"  ({shown})" if shown else "")
    )


def train_and_test(
    config: TrainConfig, progress: bool = True, overwrite: bool = False
) -> tuple[dict, Trainer, PrecompDataset]:
    """Trains ``config`` from scratch and evaluates the final model on its test split:
    (the recall table, the trainer, the test set)."""
    trainer = Trainer(config, resume=False, progress=progress, overwrite=overwrite)
    trainer.fit()
    test_set = PrecompDataset(
        trainer.data_root, config.test_split, trainer.vocab, config.captions_per_image
    )
    return evaluate_trained(trainer.method, trainer.model, test_set), trainer, test_set
