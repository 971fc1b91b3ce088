"""What the policy workers ask of a loss, written down as a Protocol.

Losses live with the algorithms, the workers with the models; the workers may
not import the algorithms, so the contract between them is this Protocol. A loss
declares in ``model_output`` what it reads from the model, because the worker must
know it before the forward pass: ``"token_logprobs"`` (``[B, L]``, the
log-probability of each position's next token), ``"scores"`` (a reward model's
``[B, L]`` scalar head output) or ``"logits"`` (``[B, L, V/TP]``, this tensor-parallel
rank's slice of the vocabulary). It is called once per micro-batch on every rank
with the model output and the micro-batch's fields aligned to prediction positions
(``nemo_rl.data.token_alignment``) and returns ``(numerator, count, metrics)``:
megatron-core sums the numerators' gradients over micro-batches and data-parallel
ranks and divides by the summed counts, so a step follows the mean over the global
batch however it was split.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Protocol, get_args, runtime_checkable

import torch

ModelOutput = Literal["token_logprobs", "scores", "logits"]
LossResult = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


@runtime_checkable
class LossFunction(Protocol):
    model_output: ClassVar[ModelOutput]

    def __call__(self, model_output: torch.Tensor, batch: dict[str, torch.Tensor]) -> LossResult: ...


def model_output_of(loss_fn: LossFunction) -> ModelOutput:
    """The loss's declared model output, refused by name when it is not one a worker can produce."""
    output = getattr(loss_fn, "model_output", None)
    if output not in get_args(ModelOutput):
        raise TypeError(f"{type(loss_fn).__name__}.model_output must be one of {get_args(ModelOutput)}, got {output!r}")
    return output
