"""Progress bars of the long loops: training epochs, encoding a dataset, scoring in blocks.

One convention everywhere: a bar is drawn (by tqdm, on stderr) when the caller asks for one
(``progress=True``), only by rank 0 of a distributed run (the other ranks' bars would
overwrite it), and only when stderr is a terminal (a log file or a pipe would collect every
redrawn frame).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from fastalign import distributed

T = TypeVar("T")


def _interactive() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty is not None and isatty())


def progress_enabled(progress: bool) -> bool:
    """Whether a bar is drawn: ``progress`` asked for, on rank 0, stderr a terminal."""
    return bool(progress) and distributed.rank() == 0 and _interactive()


def progress_iter(iterable: Iterable[T], desc: str, progress: bool, **options: Any) -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar labelled ``desc`` when :func:`progress_enabled`,
    else ``iterable`` itself. ``options`` go to tqdm (``unit``, ``total``, ...)."""
    if not progress_enabled(progress):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, **options)


def progress_bar(total: int, desc: str, progress: bool, unit: str = "it") -> Any | None:
    """A tqdm bar of ``total`` steps (advance it with ``update(n)``, end it with
    ``close()``) when :func:`progress_enabled`, else None."""
    if not progress_enabled(progress):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
