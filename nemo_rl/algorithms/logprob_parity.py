"""Is the generator sampling from the model the trainer trains? The train/generate parity probe.

Every RL step has two copies of the policy: vLLM's, which samples and scores
the tokens it sampled, and the trainer's, which recomputes their
log-probabilities. If they compute different functions (RoPE overrides that
reached one engine only, a dtype mismatch, a refit that did not happen) the
run still produces numbers, but trains on samples from a model it is not
optimising. The probe compares the two on every generated token:
``token_mult_prob_error`` is the mean of ``exp(|log p_gen - log p_train|)``
over the rollout's generated tokens, 1.0 when both agree exactly (NeMo RL's
metric of the same name). It is logged every step; on the first step, before
any update, a large value means a set-up error, and the run stops.
"""

from __future__ import annotations

import torch


class ParityError(RuntimeError):
    """The generator and the trainer disagree on the first step: they are not the same model."""


def token_mult_prob_error(
    generation_logprobs: torch.Tensor, policy_logprobs: torch.Tensor, mask: torch.Tensor
) -> float:
    """Mean over masked tokens of ``exp(|generation - policy|)``; 1.0 means identical probabilities."""
    mask = mask.bool()
    if not mask.any():
        return 1.0
    gap = (generation_logprobs.double() - policy_logprobs.double()).abs()[mask]
    return float(torch.exp(gap).mean())


def check_first_step(error: float, threshold: float, long_context: bool, section: str) -> None:
    """Stop before the first update when the two engines are not computing the same model.

    ``section`` is the running algorithm's config block (``grpo``, ``distillation``): the message names the key
    the user would change.
    """
    if error <= threshold:
        return
    causes = [
        "the RoPE overrides reached only one engine (policy.hf_config_overrides drives the trainer, the vLLM "
        "engine and the checkpoint cache; a vLLM build that ignores some YaRN fields, or a hand-edited cache "
        "entry, breaks that: set policy.megatron_cfg.force_reconvert_from_hf=true after editing overrides)"
        if long_context
        else "the generator and the trainer load different weights or a different config",
        "different precisions: policy.precision sets both engines' dtype; bfloat16 alone typically gives "
        "errors around 1.01-1.05, float32 about 1.000001 (set the threshold to match)",
        "a tokenizer or chat template that differs between the engines",
    ]
    raise ParityError(
        f"token_mult_prob_error = {error:.4f} on the first step exceeds {section}.token_mult_prob_error_threshold = "
        f"{threshold} (1.0 means the generator's and the trainer's token probabilities agree). Nothing was "
        "trained. Likely causes:\n  - " + "\n  - ".join(causes)
    )
