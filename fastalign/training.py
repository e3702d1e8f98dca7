"""The training loop of any registered method: seeded data order, the method's loss terms
weighted and summed, step decay, gradient clipping, validation by rSum keeping the best
checkpoint, CSV logs, atomic checkpoints and an exact ``resume``."""

from __future__ import annotations

import csv
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from fastalign import distributed
from fastalign.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_atomic
from fastalign.config import TrainConfig
from fastalign.data import (
    PrecompDataset,
    data_fingerprint,
    ensure_synthetic,
    load_word_vectors,
    make_loader,
)
from fastalign.encoders import caption_tokenizer
from fastalign.methods import LossContext, get_method
from fastalign.model_evaluation import evaluate_trained
from fastalign.progress import progress_iter

# What a run writes into its output_dir: an existing one is resumed or overwritten, never
# silently replaced.
RUN_FILES = ("last.pt", "best.pt", "log.csv", "tensorboard")


def data_root_of(config: TrainConfig) -> Path:
    """The dataset folder of ``config``; the synthetic one is generated if absent."""
    if config.data_root == "synthetic":
        return ensure_synthetic(
            config.synthetic_root, preset=config.synthetic_preset, seed=config.data_seed
        )
    return Path(config.data_root)


def check_same_data(recorded: dict, root: Path, fingerprint: str, what: str) -> None:
    """ValueError when ``fingerprint`` (of ``root``) differs from a checkpoint's record."""
    if recorded.get("fingerprint") not in (None, fingerprint):
        raise ValueError(
            f"{what}: the data at {root} (fingerprint {fingerprint}) are not the data the "
            f"checkpoint was trained on ({recorded.get('root')}, fingerprint "
            f"{recorded['fingerprint']})"
        )


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
        optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
        if config.optimizer not in optimizers:
            raise ValueError(
                f"optimizer must be one of {sorted(optimizers)}, got {config.optimizer!r}"
            )
        if config.loss not in distributed.LOSSES:
            raise ValueError(f"loss must be one of {distributed.LOSSES}, got {config.loss!r}")
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
                self.device = torch.device(config.device)
        if not resume:
            self._claim_output_dir(overwrite)
        self.data_root = root = data_root_of(config)
        self.data_fingerprint = data_fingerprint(root)
        checkpoint = load_checkpoint(self.output_dir / "last.pt") if resume else None
        if checkpoint is not None:
            check_same_data(checkpoint["data"], root, self.data_fingerprint, "--resume")
        self.vocab = caption_tokenizer(
            config.model, checkpoint["vocab"] if checkpoint else None, root, config.train_split
        )
        vectors = config.word_vectors
        if vectors is None and config.data_root == "synthetic":
            vectors = str(root / "glove_synthetic.txt")
        word_vectors = None
        if vectors is not None and checkpoint is None and config.model.text_encoder == "bigru":
            word_vectors, _ = load_word_vectors(vectors, self.vocab, dim=config.model.word_dim)
        self.train_set = PrecompDataset(
            root, config.train_split, self.vocab, config.captions_per_image
        )
        self.val_set = PrecompDataset(
            root,
            config.val_split,
            self.vocab,
            config.captions_per_image,
            max_images=config.max_val_images,
        )
        # Seeded once the data are ready: whatever preparing them ran (generating the
        # synthetic set or not) cannot shift the random streams of the run.
        _seed_everything(config.seed)
        self.method = get_method(config.method)(config)
        self.model = self.method.build_model(len(self.vocab), word_vectors).to(self.device)
        self.ddp = None
        if self.world_size > 1:
            device_ids = [self.device] if self.device.type == "cuda" else None
            with distributed.collective("broadcast of the initial parameters (DDP)"):
                self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids)
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

    def _restore(self, checkpoint: dict) -> None:
        saved = TrainConfig.from_dict(checkpoint["config"])
        for part in ("method", "model", "options"):
            if getattr(saved, part) != getattr(self.config, part):
                raise ValueError(
                    f"checkpoint {part} configuration differs from this run's "
                    f"({getattr(saved, part)} vs {getattr(self.config, part)})"
                )
        self.model.load_state_dict(checkpoint["model"])
        self.method.load_state_dict(checkpoint["method_state"])
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
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_rsum": self.best_rsum,
            "history": self.history,
            "rng": _rng_state(),
        }

    def _loss(self, batch, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        """(the weighted sum of the method's terms to differentiate, the values on the
        global batch of the total ``loss`` and of each unweighted term ``loss_<name>``)."""
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
            images, captions = (self.ddp or self.model)(
                batch.regions, batch.region_lengths, batch.captions, batch.caption_lengths
            )
            terms = self.method.loss_terms(
                self.model, images, captions, LossContext(batch=batch, epoch=epoch)
            )
        weights = self.method.loss_weights()
        total = sum((weights[name] * term for name, term in terms.items()), 0.0)
        # One reduction for every term: each is reported as its mean over the processes.
        term_values = torch.stack([term.detach().float() for term in terms.values()])
        if self.ddp is not None:
            with distributed.collective("all_reduce of the loss values"):
                torch.distributed.all_reduce(term_values)
            term_values /= self.world_size
        values = {f"loss_{name}": v for name, v in zip(terms, term_values.tolist())}
        loss = sum(weights[name] * values[f"loss_{name}"] for name in terms)
        return total, {"loss": loss, **values}

    def train_step(self, batch) -> dict[str, float]:
        """One optimiser step on a global batch (a :class:`~fastalign.data.PairBatch`);
        returns the logged values (``loss`` and each ``loss_<term>``) and appends them to
        the history. The gradients stay in the parameters' ``.grad`` until the next step."""
        c = self.config
        loss, values = self._loss(batch, self.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        # Under DDP the backward all-reduces the gradients.
        with distributed.collective("all_reduce of the gradients (backward)"):
            loss.backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.history.append(
            {
                "epoch": self.epoch + 1,
                "step": self.step,
                **values,
                "lr": self.optimizer.param_groups[0]["lr"],
            }
        )
        return values

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training set; returns the epoch's mean of every logged value
        (``loss`` and each ``loss_<term>``) and its ``epoch_seconds``."""
        c = self.config
        loader = make_loader(
            self.train_set, c.batch_size, shuffle=True, seed=c.seed, drop_last=self.world_size > 1
        )
        loader.sampler.set_epoch(self.epoch)  # the order depends on (seed, epoch) only
        self.model.train()
        bar = _progress(loader, f"epoch {self.epoch + 1}/{c.epochs}", self.progress)
        totals: dict[str, float] = {}
        start = time.perf_counter()
        for k, batch in enumerate(bar):
            values = self.train_step(batch)
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
        means = {name: total / max(len(loader), 1) for name, total in totals.items()}
        return means | {"epoch_seconds": time.perf_counter() - start}

    def fit(self) -> dict:
        """Trains to ``config.epochs``; returns the best validation results."""
        best = {}
        if self.epoch >= self.config.epochs and self.rank == 0:
            print(
                f"{self.output_dir}: the run is finished ({self.epoch} of {self.config.epochs} "
                f"epochs); nothing to train",
                file=sys.stderr,
            )
        while self.epoch < self.config.epochs:
            means = self.train_epoch()
            self.epoch += 1
            self.method.on_epoch_end(self.model, self.epoch)
            if self.epoch % self.config.val_every == 0 or self.epoch == self.config.epochs:
                results = evaluate_trained(self.method, self.model, self.val_set)
                # A validation row holds the epoch's means of the training values.
                self.history.append(
                    {
                        "epoch": self.epoch,
                        "step": self.step,
                        **means,
                        **{f"val_{k}": v for k, v in results.items()},
                    }
                )
                if self.rank == 0:
                    print(_epoch_line(self.epoch, means, results), file=sys.stderr)
                if self.tensorboard is not None:
                    for key, value in results.items():
                        self.tensorboard.add_scalar(f"val/{key}", value, self.step)
                if results["rsum"] > self.best_rsum:
                    self.best_rsum, best = results["rsum"], results
                    self._save("best.pt")
            self._save("last.pt")
            if self.rank == 0:
                self._write_log()
        return best

    def _save(self, name: str) -> None:
        """Rank 0 writes (every rank holds the same weights); the others wait for it."""
        if self.rank == 0:
            save_atomic(self._checkpoint(), self.output_dir / name)
        if self.world_size > 1:
            with distributed.collective(f"barrier while rank 0 writes {name}"):
                torch.distributed.barrier()

    def _write_log(self) -> None:
        columns = list(dict.fromkeys(k for row in self.history for k in row))
        path = self.output_dir / "log.csv"
        partial = path.with_name("log.csv.partial")
        with partial.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)
        os.replace(partial, path)


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


def _epoch_line(epoch: int, means: dict[str, float], results: dict[str, float]) -> str:
    terms = [f"{_term_label(k)} {v:.4g}" for k, v in means.items() if k.startswith("loss_")]
    return (
        f"epoch {epoch}: loss {means['loss']:.4f} ({', '.join(terms)})  "
        f"val rSum {results['rsum']:.1f}  [{means['epoch_seconds']:.0f} s]"
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
