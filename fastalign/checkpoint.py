"""Checkpoint files: atomic writes, loading with clear errors, and the trained method they
hold (its configuration, vocabulary, weights, method state and data fingerprint)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastalign._files import atomic_write
from fastalign.config import TrainConfig
from fastalign.methods import Method, get_method

CHECKPOINT_FORMAT = "fastalign-checkpoint-2"
# Format 1 (before methods were plug-ins) had the same weights; its configuration carried a
# ``dias`` section whatever the method, and its synthetic data were generated with the
# training seed.
_FORMAT_1 = "fastalign-checkpoint-1"
# What restoring a trained method reads from a checkpoint.
_ENTRIES = ("config", "vocab", "model", "method_state", "data")


def save_atomic(obj: object, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside ``path``, then rename: never half-written, and
    the temporary file is removed when the write fails.

    Raises:
        OSError: the write failed; the message names ``path`` and the cause (``no space
            left on device``, ``permission denied``).
    """
    # torch.save into a file that Python opened: a failed write raises the OSError (with
    # its errno) instead of torch's own ``iostream error`` without a path.
    with atomic_write(path) as f:
        torch.save(obj, f)


def _upgrade_format_1(checkpoint: dict) -> dict:
    config = dict(checkpoint["config"])
    if config.get("method") != "dias":
        config.pop("dias", None)
    config.setdefault("data_seed", config.get("seed", 0))
    return checkpoint | {
        "format": CHECKPOINT_FORMAT,
        "config": config,
        "method_state": {},
        "data": {"root": None, "fingerprint": None},
    }


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by :class:`fastalign.training.Trainer` (older formats upgraded);
    clear errors for anything else."""
    path = Path(path)
    if path.is_dir():
        files = [p.name for p in (path / "best.pt", path / "last.pt") if p.is_file()]
        hint = f": pass a checkpoint file in it ({', '.join(files)})" if files else ""
        raise IsADirectoryError(f"checkpoint {path} is a folder, not a .pt file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle, zip and torch errors alike
        raise ValueError(f"checkpoint {path} is corrupt or not a torch file: {exc}") from exc
    found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if found == _FORMAT_1:
        checkpoint = _upgrade_format_1(checkpoint)
    elif found != CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {path} is not a {CHECKPOINT_FORMAT} checkpoint (format {found!r})"
        )
    missing = [key for key in _ENTRIES if key not in checkpoint]
    if missing:
        raise ValueError(
            f"checkpoint {path} lacks {', '.join(missing)}: it is damaged or was not written by "
            f"fastalign train"
        )
    return checkpoint


def restore_trained(checkpoint: dict[str, Any]) -> tuple[Method, nn.Module, Any]:
    """The method, its trained model and the caption tokenizer that a checkpoint holds."""
    try:
        config = TrainConfig.from_dict(checkpoint["config"])
    except (TypeError, ValueError) as exc:  # a method not installed here, a bad value
        raise ValueError(f"checkpoint configuration cannot be loaded: {exc}") from exc
    method = get_method(config.method)(config)
    tokenizer = method.tokenizer(None, checkpoint["vocab"])
    model = method.build_model(len(tokenizer))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        raise ValueError(f"checkpoint weights do not fit its configuration: {exc}") from exc
    method.load_state_dict(checkpoint["method_state"])
    return method, model, tokenizer
