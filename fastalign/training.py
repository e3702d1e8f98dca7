"""The training loop: seeded data order, VSE++ hinge / InfoNCE on the fused score matrix,
step decay, gradient clipping, validation by rSum keeping the best checkpoint, CSV logs,
atomic checkpoints and an exact ``resume``."""

from __future__ import annotations

import csv
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from fastalign import distributed
from fastalign.config import TrainConfig
from fastalign.data import (
    PrecompDataset,
    Vocabulary,
    ensure_synthetic,
    load_word_vectors,
    make_loader,
    read_captions,
)
from fastalign.evaluation import evaluate, similarity_matrix
from fastalign.losses import hinge_triplet_loss, info_nce_loss, positives_from_image_index
from fastalign.methods.dias import dias_loss
from fastalign.models import MatchingModel, ModelConfig

CHECKPOINT_FORMAT = "fastalign-checkpoint-1"


# --------------------------------------------------------------------------- checkpoints
def save_atomic(obj: object, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, then rename: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(obj, partial)
    os.replace(partial, path)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :class:`Trainer`; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle, zip and torch errors alike
        raise ValueError(f"checkpoint {path} is corrupt or not a torch file: {exc}") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} checkpoint")
    return checkpoint


def caption_tokenizer(
    model_config: ModelConfig, state: dict | None, root: Path | None = None, split: str = "train"
):
    """The captions' tokenizer: BERT's own for the BERT encoder, else the vocabulary saved in
    ``state`` (a checkpoint's), else one built from the ``split`` captions under ``root``."""
    if model_config.text_encoder == "bert":
        from fastalign.bert import BertCaptionTokenizer  # transformers is optional

        return BertCaptionTokenizer(model_config.bert_path)
    if state is not None:
        return Vocabulary.from_dict(state)
    return Vocabulary.build(read_captions(root, split))


def build_model(checkpoint: dict) -> tuple[MatchingModel, Vocabulary]:
    """The model and caption tokenizer (vocabulary) stored in a checkpoint."""
    config = ModelConfig(**checkpoint["config"]["model"])
    vocab = caption_tokenizer(config, checkpoint["vocab"])
    model = MatchingModel(len(vocab), config)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        raise ValueError(f"checkpoint weights do not fit its configuration: {exc}") from exc
    return model, vocab


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def encode_dataset(model: MatchingModel, dataset: PrecompDataset, batch_size: int = 256):
    """Embeddings of every image and caption of ``dataset``, in float32.

    Returns (region_embs (n_images, R, D), region_lengths (n_images,),
    word_embs (n_captions, L, D), word_lengths (n_captions,)) on the model's device.
    """
    device = next(model.parameters()).device
    model.eval()
    images = dataset.images
    n_images, n_regions = images.shape[0], images.shape[1]
    region_lengths = torch.full((n_images,), n_regions, dtype=torch.long, device=device)
    region_embs = torch.empty(n_images, n_regions, model.config.embed_dim, device=device)
    for start in range(0, n_images, batch_size):
        block = torch.from_numpy(np.array(images[start : start + batch_size], dtype=np.float32))
        region_embs[start : start + len(block)] = model.encode_images(
            block.to(device), region_lengths[start : start + len(block)]
        )
    captions = dataset.captions
    word_lengths = torch.as_tensor(captions.lengths, dtype=torch.long, device=device)
    word_embs = torch.zeros(
        len(captions), int(word_lengths.max()), model.config.embed_dim, device=device
    )
    for start in range(0, len(captions), batch_size):
        stop = min(start + batch_size, len(captions))
        ids, lengths = captions.padded(range(start, stop))
        word_embs[start:stop, : ids.shape[1]] = model.encode_captions(
            torch.as_tensor(ids).to(device), torch.as_tensor(lengths).to(device)
        )
    return region_embs, region_lengths, word_embs, word_lengths


@torch.no_grad()
def evaluate_model(model: MatchingModel, dataset: PrecompDataset, progress: bool = False) -> dict:
    """Recall table (see :func:`fastalign.evaluate`) of ``model`` on ``dataset``."""
    region_embs, region_lengths, word_embs, word_lengths = encode_dataset(model, dataset)
    sims = similarity_matrix(
        region_embs,
        region_lengths,
        word_embs,
        word_lengths,
        progress=progress,
        **model.config.similarity_options(),
    )
    return evaluate(sims, captions_per_image=dataset.captions_per_image)


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
    """Trains a :class:`MatchingModel` as ``config`` says; ``fit()`` returns the best
    validation results. With ``resume=True`` it continues from ``output_dir/last.pt``
    exactly where that run stopped (same data order, optimiser and random state)."""

    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True) -> None:
        optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
        if config.optimizer not in optimizers:
            raise ValueError(
                f"optimizer must be one of {sorted(optimizers)}, got {config.optimizer!r}"
            )
        if config.loss not in ("hinge", "infonce"):
            raise ValueError(f"loss must be 'hinge' or 'infonce', got {config.loss!r}")
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.progress = progress
        # Under torchrun every process trains on its share of each global batch.
        self.device = distributed.setup_from_env()
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
        _seed_everything(config.seed)
        self.data_root, vectors = self._data_root()
        root = self.data_root
        checkpoint = load_checkpoint(self.output_dir / "last.pt") if resume else None
        self.vocab = caption_tokenizer(
            config.model, checkpoint["vocab"] if checkpoint else None, root, config.train_split
        )
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
        self.model = MatchingModel(len(self.vocab), config.model, word_vectors).to(self.device)
        self.ddp = None
        if self.world_size > 1:
            device_ids = [self.device] if self.device.type == "cuda" else None
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

    def _data_root(self) -> tuple[Path, str | None]:
        if self.config.data_root == "synthetic":
            root = ensure_synthetic(self.config.synthetic_root, seed=self.config.seed)
            return root, self.config.word_vectors or str(root / "glove_synthetic.txt")
        return Path(self.config.data_root), self.config.word_vectors

    def _restore(self, checkpoint: dict) -> None:
        saved = TrainConfig.from_dict(checkpoint["config"])
        if saved.model != self.config.model:
            raise ValueError(
                "checkpoint model configuration differs from this run's "
                f"({saved.model} vs {self.config.model})"
            )
        self.model.load_state_dict(checkpoint["model"])
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
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_rsum": self.best_rsum,
            "history": self.history,
            "rng": _rng_state(),
        }

    def _similarity(self, regions, words, region_lengths, word_lengths):
        """The order fastalign.distributed expects: (regions, words, lengths, lengths)."""
        return self.model.similarity(regions, region_lengths, words, word_lengths)

    def _loss(self, batch, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        """(the loss to differentiate, the values on the global batch of the total ``loss``,
        the matching loss ``loss_match`` and, with DIAS, each unweighted regularizer)."""
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
        max_violation = epoch >= c.warmup_epochs
        with autocast:
            region_embs, word_embs = (self.ddp or self.model)(
                batch.regions,
                batch.region_lengths,
                batch.captions,
                batch.caption_lengths,
                embeddings_only=True,
            )
            if self.ddp is not None:
                match = distributed.global_batch_loss(
                    region_embs.float(),
                    batch.region_lengths,
                    word_embs.float(),
                    batch.caption_lengths,
                    batch.image_index,
                    self._similarity,
                    loss=c.loss,
                    margin=c.margin,
                    max_violation=max_violation,
                    temperature=c.temperature,
                )
            else:
                scores = self.model.similarity(
                    region_embs, batch.region_lengths, word_embs, batch.caption_lengths
                ).float()
        if self.ddp is not None:
            match_value = match.detach().clone()
            torch.distributed.all_reduce(match_value)
            match_value = match_value.item() / self.world_size
        else:
            positives = positives_from_image_index(batch.image_index)
            if c.loss == "infonce":
                match = info_nce_loss(scores, c.temperature, positives)
            else:
                match = hinge_triplet_loss(scores, c.margin, max_violation, positives)
            match_value = match.item()
        values = {"loss": match_value, "loss_match": match_value}
        if c.method != "dias":
            return match, values
        weighted, regularizers = dias_loss(
            region_embs,
            batch.region_lengths,
            word_embs,
            batch.caption_lengths,
            c.dias,
            c.model.backend,
            # under DDP every rank computes the same regularizers of the global batch
            gather=distributed.all_gather_with_grad if self.ddp is not None else None,
        )
        total = match + weighted
        for name, value in regularizers.items():
            values[f"loss_{name}"] = value.item()
            values["loss"] += c.dias.weight(name) * values[f"loss_{name}"]
        return total, values

    def train_epoch(self) -> float:
        """One pass over the training set; returns the mean loss."""
        c = self.config
        loader = make_loader(
            self.train_set, c.batch_size, shuffle=True, seed=c.seed, drop_last=self.world_size > 1
        )
        loader.sampler.set_epoch(self.epoch)  # the order depends on (seed, epoch) only
        self.model.train()
        bar = _progress(loader, f"epoch {self.epoch + 1}/{c.epochs}", self.progress)
        total, start = 0.0, time.perf_counter()
        for k, batch in enumerate(bar):
            loss, values = self._loss(batch, self.epoch)
            value = values["loss"]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.optimizer.step()
            self.step += 1
            total += value
            pairs_per_s = (k + 1) * c.batch_size / (time.perf_counter() - start)
            self.history.append(
                {
                    "epoch": self.epoch + 1,
                    "step": self.step,
                    **values,
                    "lr": self.optimizer.param_groups[0]["lr"],
                }
            )
            if self.tensorboard is not None:
                for name, term in values.items():
                    self.tensorboard.add_scalar(f"train/{name}", term, self.step)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{value:.4f}", pairs_per_s=f"{pairs_per_s:.0f}")
        self.scheduler.step()
        return total / max(len(loader), 1)

    def fit(self) -> dict:
        """Trains to ``config.epochs``; returns the best validation results."""
        best = {}
        while self.epoch < self.config.epochs:
            mean_loss = self.train_epoch()
            self.epoch += 1
            if self.epoch % self.config.val_every == 0 or self.epoch == self.config.epochs:
                results = evaluate_model(self.model, self.val_set)
                self.history.append(
                    {
                        "epoch": self.epoch,
                        "step": self.step,
                        "loss": mean_loss,
                        **{f"val_{k}": v for k, v in results.items()},
                    }
                )
                print(
                    f"epoch {self.epoch}: loss {mean_loss:.4f}  val rSum {results['rsum']:.1f}",
                    file=sys.stderr,
                )
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
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True)


def train_and_test(
    config: TrainConfig, progress: bool = True
) -> tuple[dict, Trainer, PrecompDataset]:
    """Trains ``config`` from scratch and evaluates the final model on its test split:
    (the recall table, the trainer, the test set)."""
    trainer = Trainer(config, resume=False, progress=progress)
    trainer.fit()
    test_set = PrecompDataset(
        trainer.data_root, config.test_split, trainer.vocab, config.captions_per_image
    )
    return evaluate_model(trainer.model, test_set), trainer, test_set
