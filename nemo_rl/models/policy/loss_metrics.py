"""The one reducer of a loss's metrics: parts add up everywhere, means are taken once, as declared.

A loss reports per micro-batch parts: sums over its tokens or pairs
(``loss_sum``, ``num_tokens``, ...). Sums of parts are exact however the global
batch was split, so they are what the workers (over micro-batches), ``Policy``
(over ranks) and the algorithms (over optimizer steps and validation batches)
combine, with ``add_totals``; the logged metrics come from the final totals
through the loss's ``metrics`` declaration (``logged_metrics``), so no
algorithm divides by a count it names itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from nemo_rl.models.policy.interfaces import LossFunction


def declared_parts(loss_fn: LossFunction) -> set[str]:
    return {part for metric in loss_fn.metrics.values() for part in metric.parts()}


def add_totals(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            totals[key] = totals.get(key, 0.0) + value
    return totals


def micro_batch_totals(reported: list[dict[str, torch.Tensor]], loss_fn: LossFunction) -> dict[str, float]:
    """A worker's totals of what its loss reported over its micro-batches.

    A part the loss does not declare is refused: nothing would log it, and
    summing a value that is not a sum (a mean, a max) gives a wrong number silently.
    """
    declared = declared_parts(loss_fn)
    for out in reported:
        if undeclared := set(out) - declared:
            raise ValueError(
                f"{type(loss_fn).__name__} reported {sorted(undeclared)}, which its `metrics` declaration does not use"
            )
    return add_totals({key: float(value) for key, value in out.items()} for out in reported)


def logged_metrics(totals: Mapping[str, float], loss_fn: LossFunction) -> dict[str, float]:
    """The loss's logged metrics from the totals of its parts, in its declaration's order."""
    return {name: metric.of(totals) for name, metric in loss_fn.metrics.items()}
