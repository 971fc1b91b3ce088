"""Splitting a list of requests over a pool of equal Ray actors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def split_evenly(items: Sequence[T], parts: int) -> list[Sequence[T]]:
    """Contiguous shares whose sizes differ by at most one (the first ones take the remainder).

    Contiguous, so concatenating the actors' answers restores the request order.
    """
    size, extra = divmod(len(items), parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + size + (1 if i < extra else 0))
    return [items[bounds[i] : bounds[i + 1]] for i in range(parts)]
