"""Training configuration: dataclasses, YAML files and ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from fastalign.data.synthetic import preset_names
from fastalign.distributed import LOSSES
from fastalign.fields import check_fields, setting
from fastalign.methods import get_method, method_names
from fastalign.models import ModelConfig

OPTIMIZERS = ("adam", "adamw")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class TrainConfig:
    """Everything a training run needs; ``model`` holds the backbone and similarity,
    ``options`` the section of the method named by ``method`` (written, in files and
    overrides, under the method's name: ``dias.dim_weight=0``).

    ``data_root`` is a folder in the SCAN / VSE++ precomputed-feature format; the value
    ``"synthetic"`` means the bundled synthetic dataset of preset ``synthetic_preset`` and
    seed ``data_seed``, generated on first use in a folder under ``synthetic_root`` named
    after both (the training ``seed`` never changes the data).

    A training step whose loss or gradient norm is not finite (NaN or inf, e.g. from a NaN
    feature in the data) stops the run with an error naming the step, its samples and the
    data rows at fault, keeping the last good checkpoint; with ``skip_nonfinite`` such a
    batch is skipped instead (no update) and counted (``skipped_batches`` in log.csv and
    on the epoch line).
    ``dist_timeout_minutes``: under torchrun, how long a rank waits in a collective (the
    gathers of the loss, the gradient all-reduce, the checkpoint barriers) for the others
    before failing with an error that names the collective, instead of hanging.
    """

    name: str = "run"
    data_root: str = "synthetic"
    synthetic_root: str = ".data/synthetic"
    synthetic_preset: str = setting("easy", choices=preset_names())
    data_seed: int = setting(0, minimum=0)
    train_split: str = "train"
    val_split: str = "dev"
    test_split: str = "test"
    captions_per_image: int = setting(5, minimum=1)
    word_vectors: str | None = None
    max_val_images: int | None = setting(None, minimum=1)
    epochs: int = setting(25, minimum=0)  # 0: a training-free method
    batch_size: int = setting(128, minimum=2)  # hinge and InfoNCE need negatives
    optimizer: str = setting("adam", choices=OPTIMIZERS)
    lr: float = setting(5e-4, above=0)
    weight_decay: float = setting(0.0, minimum=0)
    lr_decay_epochs: list[int] = setting(default_factory=lambda: [15], minimum=1)
    lr_decay: float = setting(0.1, above=0, maximum=1)
    grad_clip: float = setting(2.0, minimum=0)  # 0: no clipping
    skip_nonfinite: bool = False
    loss: str = setting("hinge", choices=LOSSES)
    margin: float = setting(0.2, minimum=0)
    warmup_epochs: int = setting(1, minimum=0)
    temperature: float = setting(0.05, above=0)
    amp: bool = False
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    seed: int = setting(0, minimum=0)
    output_dir: str = "runs/run"
    val_every: int = setting(1, minimum=1)
    dist_timeout_minutes: float = setting(10.0, above=0)
    # A registered method (fastalign.methods); "baseline" is the matching loss alone
    # (CHAN, LAPS by their model options).
    method: str = "baseline"
    model: ModelConfig = field(default_factory=ModelConfig)
    options: Any = None  # the method's section; None: its defaults

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """TypeError / ValueError naming the first key whose value has the wrong type or is out
        of its range (every section: this one, ``model.*`` and the method's)."""
        check_fields(self)
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        options_class = get_method(self.method).Options
        if self.options is None:
            self.options = options_class()
        elif not isinstance(self.options, options_class):
            raise TypeError(
                f"options of method {self.method!r} must be a {options_class.__name__}, got "
                f"{type(self.options).__name__}"
            )
        check_fields(self.model, "model.")
        check_fields(self.options, f"{self.method}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain values; the method's section under the method's name."""
        values = {
            f.name: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
            for f in dataclasses.fields(self)
            if f.name != "options"
            for v in [getattr(self, f.name)]
        }
        values[self.method] = dataclasses.asdict(self.options)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        values = dict(values)
        method = values.get("method", "baseline")
        if not isinstance(method, str):
            raise ValueError(f"method must be a name, got {method!r}")
        sections = {"model": ModelConfig, method: get_method(method).Options}
        loaded = {name: values.pop(name, {}) or {} for name in sections}
        fields = {f.name for f in dataclasses.fields(cls)} - {"options"}
        names = []
        for name in sorted(set(values) - fields):
            owner = f" (the section of method {name!r}; this config's method is {method!r})"
            names.append(name + (owner if name in method_names() else ""))
        for name, section in loaded.items():
            if not isinstance(section, dict):
                raise ValueError(f"{name} must be a mapping, got {section!r}")
            known = {f.name for f in dataclasses.fields(sections[name])}
            names += sorted(f"{name}.{key}" for key in set(section) - known)
        if names:
            raise ValueError(f"unknown configuration keys: {', '.join(names)}")
        return cls(
            **values,
            model=ModelConfig(**loaded["model"]),
            options=sections[method](**loaded[method]),
        )


def _parse_value(item: str, text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as error:
        raise ValueError(f"override {item!r}: its value is not valid YAML ({error})") from None


def bundled_configs() -> list[str]:
    """Names of the configs that ship with fastalign (``fastalign/configs/*.yaml``)."""
    folder = resources.files("fastalign") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def find_config(name: str | os.PathLike) -> Path:
    """A config file: ``name`` as a path (``.yaml`` may be left out), else the bundled
    config of that name."""
    for path in (Path(name), Path(f"{name}.yaml")):
        if path.is_file():
            return path
    bundled = resources.files("fastalign") / "configs" / f"{Path(name).stem}.yaml"
    if str(name) == Path(name).stem and bundled.is_file():
        return Path(str(bundled))
    raise FileNotFoundError(
        f"no config {str(name)!r}: not a file, nor a bundled config "
        f"({', '.join(bundled_configs())})"
    )


def load_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file or bundled config name (see
    :func:`find_config`; the defaults when None) and ``key=value`` overrides
    (``model.embed_dim=256``, ``dias.dim_weight=0``; values are parsed as YAML)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = find_config(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ValueError(f"config file {path} is not valid YAML: {error}") from None
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
        target[leaf] = _parse_value(item, text)
    return TrainConfig.from_dict(values)
