"""The scalar head that turns megatron-core's GPTModel into a reward model.

A Bradley-Terry reward model is the policy's transformer with its vocabulary
projection replaced by one linear map to a scalar per position (the score of
the sequence so far); the score at a sequence's last token is its reward. The
head takes the place of ``GPTModel.output_layer``, so megatron's own forward,
pipeline schedule and DDP run unchanged, and ``forward(labels=None)`` returns
``[B, L, 1]`` scores.

The head is replicated on every tensor-parallel rank (one output cannot be
split); its parameter is ``output_layer.score.weight``, a name the TP sharding
rules leave whole, and HF's ``score.weight`` of ``*ForSequenceClassification``
on export.
"""

from __future__ import annotations

import copy

import torch

SCORE_WEIGHT = "output_layer.score.weight"


class ScalarHead(torch.nn.Module):
    def __init__(self, hidden_size: int, sequence_parallel: bool, dtype: torch.dtype):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1, bias=False, dtype=dtype)
        self.sequence_parallel = sequence_parallel  # GPTModel reads this attribute of its output layer

    def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
        """``[S, B, H] -> ([S, B, 1], None)``, the output-layer signature GPTModel calls.

        Under sequence parallelism each TP rank holds a slice of the sequence;
        every rank needs every position's score, so the slices are gathered.
        Every rank then computes the same loss, so the backward pass only splits
        the gradient again (``tensor_parallel_output_grad=False``) instead of
        summing TP copies of it.
        """
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        return self.score(hidden_states), None


def reward_model_config(lm_config):
    """The HF config of the reward model made from a causal LM's: the sequence-classification class, one label.

    The output projection is no longer the embedding, so the model is untied.
    HF's sequence-classification models read the score at the last non-padding
    token, which needs ``pad_token_id``.
    """
    if getattr(lm_config, "pad_token_id", None) is None:
        raise ValueError(
            "the model's config.json has no pad_token_id; a reward model scores each sequence at its last "
            "non-padding token (as HF's *ForSequenceClassification does), so set pad_token_id in the model's config"
        )
    config = copy.deepcopy(lm_config)
    config.architectures = [_sequence_classification_class(a) for a in lm_config.architectures or []]
    config.num_labels = 1
    config.tie_word_embeddings = False
    return config


def _sequence_classification_class(architecture: str) -> str:
    for suffix in ("ForCausalLM", "ForSequenceClassification"):
        if architecture.endswith(suffix):
            return architecture.removesuffix(suffix) + "ForSequenceClassification"
    raise ValueError(f"cannot make a reward model from architecture {architecture!r} (expected *ForCausalLM)")


def attach_scalar_head(model, hf_config, sequence_parallel: bool, dtype: torch.dtype, seed: int) -> None:
    """Replace the last pipeline stage's vocabulary projection by a scalar head initialised as HF initialises one.

    The initial weights come from a generator seeded identically on every rank,
    so the TP replicas start equal without a broadcast.
    """
    if not getattr(model, "post_process", False):
        return
    head = ScalarHead(hf_config.hidden_size, sequence_parallel, dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.score.weight.copy_(torch.randn(head.score.weight.shape, generator=generator) * hf_config.initializer_range)
    model.output_layer = head
