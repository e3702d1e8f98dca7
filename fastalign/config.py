"""Training configuration: dataclasses, YAML files and ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fastalign.methods.dias import DiasConfig
from fastalign.models import ModelConfig

METHODS = ("baseline", "dias")


@dataclass
class TrainConfig:
    """Everything a training run needs; ``model`` holds the backbone and similarity.

    ``data_root`` is a folder in the SCAN / VSE++ precomputed-feature format; the value
    ``"synthetic"`` means the bundled synthetic dataset (generated under
    ``synthetic_root`` on first use).
    """

    name: str = "run"
    data_root: str = "synthetic"
    synthetic_root: str = ".data/synthetic"
    train_split: str = "train"
    val_split: str = "dev"
    test_split: str = "test"
    captions_per_image: int = 5
    word_vectors: str | None = None
    max_val_images: int | None = None
    epochs: int = 25
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 5e-4
    weight_decay: float = 0.0
    lr_decay_epochs: list[int] = field(default_factory=lambda: [15])
    lr_decay: float = 0.1
    grad_clip: float = 2.0
    loss: str = "hinge"
    margin: float = 0.2
    warmup_epochs: int = 1
    temperature: float = 0.05
    amp: bool = False
    device: str = "auto"
    seed: int = 0
    output_dir: str = "runs/run"
    val_every: int = 1
    # "baseline": the matching loss alone (VSE++, CHAN, LAPS by their model options);
    # "dias": plus the DIAS regularizers configured in ``dias``.
    method: str = "baseline"
    model: ModelConfig = field(default_factory=ModelConfig)
    dias: DiasConfig = field(default_factory=DiasConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        values = dict(values)
        sections = {name: values.pop(name, {}) or {} for name in _SECTIONS}
        names = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        for name, section in sections.items():
            if not isinstance(section, dict):
                raise ValueError(f"{name} must be a mapping, got {section!r}")
            known = {f.name for f in dataclasses.fields(_SECTIONS[name])}
            names += sorted(f"{name}.{key}" for key in set(section) - known)
        if names:
            raise ValueError(f"unknown configuration keys: {', '.join(names)}")
        return cls(**values, **{name: _SECTIONS[name](**s) for name, s in sections.items()})


# The nested sections of a TrainConfig: ``model.embed_dim=256``, ``dias.dim_weight=0``.
_SECTIONS = {"model": ModelConfig, "dias": DiasConfig}


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file (or the defaults) and ``key=value`` overrides
    (``model.embed_dim=256``; values are parsed as YAML)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
        values = loaded
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value")
        target = values
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = _parse_value(text)
    return TrainConfig.from_dict(values)
