"""Is the generator sampling from the model the trainer trains? The train/generate parity probe.

Every RL step has two copies of the policy: vLLM's, which samples and scores
the tokens it sampled, and the trainer's, which recomputes their
log-probabilities. If they compute different functions (RoPE overrides that
reached one engine only, a dtype mismatch, a refit that did not happen) the
run still produces numbers, but trains on samples from a model it is not
optimising. The probe compares the two on every generated token:
``token_mult_prob_error`` is the mean of ``exp(|log p_gen - log p_train|)``
over the rollout's generated tokens, 1.0 when both agree exactly (NeMo RL's
metric of the same name), and ``generator_kl`` estimates KL(generator ||
trainer) per token from the same samples (k3: ``exp(r) - r - 1`` with
``r = log p_train - log p_gen``, non-negative, 0 when they agree).

Both are also reported per *position bucket* relative to the original RoPE
window W (``window``: positions below W, then ``1-2x``, ``2-4x``, ... by
doublings): a RoPE difference that only matters beyond the window (a YaRN
field one engine ignores) moves the tokens there and hides in the overall mean
when most generated tokens sit inside it. It is logged every step; on the
first step, before any update, the worst bucket with enough tokens deciding
means a set-up error beyond the window stops the run as surely as one inside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A bucket decides the first-step stop only with at least this many generated tokens: fewer make its mean
# noise (one unlucky low-probability token) rather than evidence about the engines.
MIN_BUCKET_TOKENS = 32


class ParityError(RuntimeError):
    """The generator and the trainer disagree on the first step: they are not the same model."""


@dataclass(frozen=True)
class PositionBucket:
    """Positions ``[start, end)`` of a sequence, named by their multiple of the original window."""

    name: str
    start: int
    end: int

    @property
    def span(self) -> str:
        return f"positions {self.start}-{self.end - 1}"


def position_buckets(window: int, max_length: int) -> list[PositionBucket]:
    """``window`` (below W), then doublings ``1-2x``, ``2-4x``, ... until one holds position ``max_length - 1``."""
    buckets = [PositionBucket("window", 0, window)]
    low = 1
    while buckets[-1].end < max_length:
        buckets.append(PositionBucket(f"{low}-{2 * low}x", low * window, 2 * low * window))
        low *= 2
    return buckets


@dataclass(frozen=True)
class Agreement:
    """The two engines' agreement over a set of generated tokens."""

    error: float  # token_mult_prob_error: mean exp(|gap|), 1.0 = identical
    kl: float  # generator_kl: mean k3 estimate of KL(generator || trainer), 0.0 = identical
    tokens: int


def _agreement(gap: torch.Tensor) -> Agreement:
    """``gap``: log p_train - log p_gen of the selected tokens (float64)."""
    if gap.numel() == 0:
        return Agreement(1.0, 0.0, 0)
    return Agreement(float(torch.exp(gap.abs()).mean()), float((torch.exp(gap) - gap - 1).mean()), gap.numel())


@dataclass(frozen=True)
class ParityReport:
    """A rollout's parity overall and per position bucket (buckets without generated tokens left out)."""

    overall: Agreement
    buckets: dict[str, tuple[PositionBucket, Agreement]]

    def metrics(self) -> dict[str, float]:
        out = {"token_mult_prob_error": self.overall.error, "generator_kl": self.overall.kl}
        for name, (_, agreement) in self.buckets.items():
            out[f"token_mult_prob_error/{name}"] = agreement.error
            out[f"generator_kl/{name}"] = agreement.kl
        return out

    def deciding(self, min_tokens: int = MIN_BUCKET_TOKENS) -> tuple[str, Agreement]:
        """The worst bucket with ``min_tokens`` tokens or more (the overall value when none has that many)."""
        candidates = [(f"/{name}", a) for name, (_, a) in self.buckets.items() if a.tokens >= min_tokens]
        return max(candidates or [("", self.overall)], key=lambda item: item[1].error)


def token_mult_prob_error(
    generation_logprobs: torch.Tensor, policy_logprobs: torch.Tensor, mask: torch.Tensor
) -> float:
    """Mean over masked tokens of ``exp(|generation - policy|)``; 1.0 means identical probabilities."""
    mask = mask.bool()
    return _agreement((policy_logprobs.double() - generation_logprobs.double())[mask]).error


def measure_parity(
    generation_logprobs: torch.Tensor, policy_logprobs: torch.Tensor, mask: torch.Tensor, window: int
) -> ParityReport:
    """The probe over ``[B, L]`` rows whose column is the token's position in its sequence (unpacked rows)."""
    mask = mask.bool()
    gap = policy_logprobs.double() - generation_logprobs.double()
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    buckets = {}
    for bucket in position_buckets(window, mask.shape[1]):
        selected = mask & (positions >= bucket.start) & (positions < bucket.end)
        if selected.any():
            buckets[bucket.name] = (bucket, _agreement(gap[selected]))
    return ParityReport(_agreement(gap[mask]), buckets)


def check_first_step(report: ParityReport, threshold: float, long_context: bool, section: str) -> None:
    """Stop before the first update when the two engines are not computing the same model.

    The deciding value is the worst position bucket with enough tokens, so a
    mismatch confined to positions beyond the original window is caught even
    when the overall mean, dominated by positions inside it, looks fine.
    ``section`` is the running algorithm's config block (``grpo``,
    ``distillation``): the message names the key the user would change.
    """
    suffix, worst = report.deciding()
    if worst.error <= threshold:
        return
    where = ""
    if suffix:
        bucket = report.buckets[suffix[1:]][0]
        where = f" over {worst.tokens} generated tokens at {bucket.span}"
    others = ", ".join(f"{name} {a.error:.6f}" for name, (_, a) in report.buckets.items())
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
        f"token_mult_prob_error{suffix} = {worst.error:.4f}{where} on the first step exceeds "
        f"{section}.token_mult_prob_error_threshold = {threshold} (1.0 means the generator's and the trainer's "
        f"token probabilities agree; overall {report.overall.error:.6f}, by position bucket: {others}). "
        "Nothing was trained. Likely causes:\n  - " + "\n  - ".join(causes)
    )
