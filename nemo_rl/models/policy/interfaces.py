"""The contracts between the algorithms, the driver's ``Policy``, its workers and the losses, as Protocols.

Losses live with the algorithms, the workers with the models; the workers may
not import the algorithms, so the contract between them is ``LossFunction``. A loss
declares in ``model_output`` what it reads from the model, because the worker must
know it before the forward pass: ``"token_logprobs"`` (``[B, L]``, the
log-probability of each position's next token), ``"scores"`` (a reward model's
``[B, L]`` scalar head output) or ``"logits"`` (``[B, L, V/TP]``, this tensor-parallel
rank's slice of the vocabulary). It is called once per micro-batch on every rank
with the model output and the micro-batch's fields aligned to prediction positions
(``nemo_rl.data.token_alignment``) and returns ``(numerator, count, metrics)``:
megatron-core sums the numerators' gradients over micro-batches and data-parallel
ranks and divides by the summed counts, so a step follows the mean over the global
batch however it was split. The ``metrics`` are parts that add up the same way;
the loss declares in ``metrics`` which logged metric each part feeds (``Metric``,
reduced by ``loss_metrics``).

``PolicyInterface`` is what the algorithms use of a model (``lm_policy.Policy``),
``PolicyWorkerInterface`` what ``Policy`` dispatches to each backend's workers.
The concrete classes are checked against them by basedpyright where they are
defined.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, get_args, runtime_checkable

import torch

from nemo_rl.distributed.parallel_dims import ParallelDims
from nemo_rl.models.generation.weight_sync import BucketHeader, WeightSource

ModelOutput = Literal["token_logprobs", "scores", "logits"]
LossResult = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Metric:
    """A logged metric of a loss: the total of its part ``total`` over every micro-batch, rank, optimizer step
    and validation batch, divided by the total of the part ``per`` when it is a mean over tokens or pairs.

    A ratio of totals, not a mean of per-micro-batch means: those would weigh a
    micro-batch of 3 tokens like one of 300 and change with the micro-batch size
    and the parallel layout. A count of 0 divides by 1 (a batch without loss tokens).
    """

    total: str
    per: str | None = None

    def parts(self) -> tuple[str, ...]:
        return (self.total,) if self.per is None else (self.total, self.per)

    def of(self, totals: Mapping[str, float]) -> float:
        value = totals[self.total]
        return value if self.per is None else value / max(totals[self.per], 1)


@runtime_checkable
class LossFunction(Protocol):
    model_output: ClassVar[ModelOutput]
    metrics: ClassVar[Mapping[str, Metric]]  # logged name -> how it comes from the parts the loss reports

    # Positional-only: each loss names its first argument after what it asked for (token_logprobs, scores, ...).
    def __call__(self, model_output: torch.Tensor, batch: dict[str, torch.Tensor], /) -> LossResult: ...


# A worker's (live, reference) log-probs of its rows and the seconds of each pass ("policy", "reference").
WorkerLogprobsWithReference = tuple[tuple[torch.Tensor, torch.Tensor], dict[str, float]]


@dataclass(frozen=True)
class LogprobsWithReference:
    """The live and the reference weights' log-probs of the same rows (each as ``get_logprobs`` gives them) and
    the seconds each pass took on the workers (``"policy"``, ``"reference"``: the slowest reporting worker's)."""

    policy: torch.Tensor
    reference: torch.Tensor
    seconds: dict[str, float]


def model_output_of(loss_fn: LossFunction) -> ModelOutput:
    """The loss's declared model output, refused by name when it is not one a worker can produce."""
    output = getattr(loss_fn, "model_output", None)
    if output not in get_args(ModelOutput):
        raise TypeError(f"{type(loss_fn).__name__}.model_output must be one of {get_args(ModelOutput)}, got {output!r}")
    return output


class PolicyInterface(WeightSource, Protocol):
    """A model as the algorithms see it: global batches in, global results out, whatever the backend and layout.

    ``train`` and ``evaluate`` return ``{"metrics": totals of the loss's parts}``
    (``train`` adds ``grad_norm``, ``lr``, ``update_successful``, with
    sequence packing ``packing_efficiency``, and with token-budget batching
    ``dynamic_batching/utilisation`` and ``/micro_batches``). ``get_topk_logprobs`` and
    ``get_scores`` exist on the Megatron backend only; the config check refuses
    distillation and reward-model runs on DTensor before Ray starts.
    ``stream_hf_weights`` (``WeightSource``) is the refit source.
    """

    @property
    def dims(self) -> ParallelDims:
        """The layout the policy runs (data-parallel size, sequence multiple, ...)."""
        ...

    @property
    def checkpoint_dir(self) -> Path | None:
        """The converted Megatron checkpoint the workers loaded (None on DTensor, which loads HF directly)."""
        ...

    @property
    def converted_now(self) -> bool: ...

    def train(self, batch: Batch, loss_fn: LossFunction, micro_batch_size: int) -> dict[str, Any]: ...

    def evaluate(self, batch: Batch, loss_fn: LossFunction, micro_batch_size: int) -> dict[str, Any]: ...

    def get_logprobs(self, batch: Batch, micro_batch_size: int, reference: bool = False) -> torch.Tensor: ...

    def get_logprobs_with_reference(self, batch: Batch, micro_batch_size: int) -> LogprobsWithReference: ...

    def get_topk_logprobs(self, batch: Batch, micro_batch_size: int, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def get_scores(self, batch: Batch, micro_batch_size: int) -> torch.Tensor: ...

    def save_checkpoint(self, directory: Path) -> None: ...

    def load_checkpoint(self, directory: Path) -> None: ...

    def export_hf(self, directory: Path, model_dir: Path | None = None, tokenizer_dir: Path | None = None) -> None: ...

    def shutdown(self) -> None: ...


class PolicyWorkerInterface(Protocol):
    """One rank of a policy backend (``MegatronPolicyWorker``, ``DTensorPolicyWorker``), as ``Policy`` calls it.

    Results that live on one pipeline stage (or one rank) are None elsewhere;
    ``Policy`` reads them from the ranks ``info`` names. ``hf_weight_buckets``
    runs as a Ray streaming generator on every rank (``weight_sync``).
    """

    def info(self) -> dict[str, Any]: ...

    def train_step(self, microbatches: list[Batch], loss_fn: LossFunction) -> dict[str, Any]: ...

    def evaluate(self, microbatches: list[Batch], loss_fn: LossFunction) -> dict[str, Any]: ...

    def get_logits(self, input_ids: torch.Tensor) -> torch.Tensor | None: ...

    def get_logprobs(self, microbatches: list[Batch], reference: bool = False) -> torch.Tensor | None: ...

    def get_logprobs_with_reference(self, microbatches: list[Batch]) -> WorkerLogprobsWithReference | None: ...

    def hf_weight_buckets(self, bucket_bytes: int) -> Iterator[BucketHeader | bytes]: ...

    def gathered_state(self, what: str = "params") -> dict[str, torch.Tensor] | None: ...

    def save_checkpoint(self, directory: str) -> None: ...

    def load_checkpoint(self, directory: str) -> None: ...

    def export_hf(self, directory: str, model_dir: str | None = None, tokenizer_dir: str | None = None) -> None: ...

    def shutdown(self) -> None: ...


class MegatronWorkerInterface(PolicyWorkerInterface, Protocol):
    """What only the Megatron worker answers: top-k log-probs from vocab-parallel logits (a distillation teacher)
    and the scalar head's scores (a reward model). The DTensor worker has neither; runs that need them are
    refused on DTensor by the config check."""

    def get_topk_logprobs(self, microbatches: list[Batch], k: int) -> tuple[torch.Tensor, torch.Tensor] | None: ...

    def get_scores(self, microbatches: list[Batch]) -> torch.Tensor | None: ...
