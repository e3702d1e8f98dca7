"""Alignment methods as plug-ins.

A method is one :class:`~fastalign.methods.base.Method` subclass registered under its name
with :func:`register_method`: it owns its configuration section (a dataclass), its model,
its unweighted loss terms and their weights, its similarity for evaluation, an optional
per-epoch hook and the state it keeps in checkpoints. The trainer, the config loader, the
evaluator and the command line only go through this registry, so adding a method is adding
a module to this package (every module here is imported on first use of the registry) or,
for a method living in another package, an entry point in the group ``fastalign.methods``.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from fastalign.methods.base import LossContext, Method

__all__ = ["LossContext", "Method", "get_method", "method_names", "register_method"]

_REGISTRY: dict[str, type[Method]] = {}
_RESERVED = {"model"}  # config sections that are not methods'
_discovered = False


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: registers ``cls`` under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier() or name in _RESERVED:
        raise ValueError(f"a method's name must be an identifier other than 'model', got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name]} and {cls})")
    _REGISTRY[name] = cls
    return cls


def _discover() -> None:
    """Imports every module of this package and every ``fastalign.methods`` entry point."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    for entry in entry_points(group="fastalign.methods"):
        entry.load()


def method_names() -> tuple[str, ...]:
    """The registered methods' names, sorted."""
    _discover()
    return tuple(sorted(_REGISTRY))


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; ValueError naming the known ones otherwise."""
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of {', '.join(method_names())}; got {name!r}")
    return _REGISTRY[name]
