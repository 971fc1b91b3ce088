"""Greedy generation for the long-context tasks, through transformers or vLLM, with the same answers from both.

The retrieval tasks only need "token ids in, greedy text out", so both backends
sit behind one small interface. The HF generator runs any in-memory model (a
benchmark's freshly trained ``nn.Module``) and batches prompts with left
padding; the vLLM generator builds its engine with the trainer's RoPE through
``vllm_engine_kwargs``, so a YaRN run is evaluated with the RoPE
it was trained with, by the engine it will be served with.

Both stop at the same tokens (the tokenizer's end-of-sequence token and the
model's generation-config ``eos_token_id``s, as vLLM does) and decode the
tokens before the first of them with the same tokenizer, so their texts can be
compared exactly. No other generation-config default (sampling, repetition
penalty) applies: the score of these tasks is defined on greedy output.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoConfig, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from nemo_rl.rope.vllm_engine import vllm_engine_kwargs


class Generator(Protocol):
    def generate(self, prompt_token_ids: list[list[int]], max_new_tokens: int) -> list[str]:
        """The greedy completion of each prompt, as text, in prompt order."""
        ...


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig | None) -> list[int]:
    """The tokenizer's eos plus the generation config's ``eos_token_id``s: where vLLM stops, so HF stops there too."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = generation_config.eos_token_id if generation_config is not None else None
    ids |= {configured} if isinstance(configured, int) else set(configured or ())
    return sorted(ids)


def completion_text(tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int], stop_ids: Sequence[int]) -> str:
    """The text of the generated tokens before the first stop token (vLLM keeps the stop token, HF pads after it)."""
    ids = list(token_ids)
    end = next((i for i, token in enumerate(ids) if token in stop_ids), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True)


class HFGenerator:
    """Greedy ``model.generate`` on batches of prompts of similar length, left-padded."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, batch_size: int = 16) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; batched generation needs one")
        self.pad_id = pad

    def generate(self, prompt_token_ids: list[list[int]], max_new_tokens: int) -> list[str]:
        # Sorting by length keeps the padding (and the wasted compute) of each batch small.
        order = sorted(range(len(prompt_token_ids)), key=lambda i: len(prompt_token_ids[i]))
        texts: list[str] = [""] * len(prompt_token_ids)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            answers = self._generate_batch([prompt_token_ids[i] for i in batch], max_new_tokens)
            for i, text in zip(batch, answers, strict=True):
                texts[i] = text
        return texts

    @torch.inference_mode()
    def _generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[str]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.stop_ids, pad_token_id=self.pad_id
        )
        device = next(self.model.parameters()).device
        out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        return [completion_text(self.tokenizer, row[width:].tolist(), self.stop_ids) for row in out]


class VllmGenerator:
    """An in-process ``vllm.LLM`` with the run's RoPE overrides and window (``max_model_len``).

    vLLM runs its engine core in a subprocess; the caller's module must be
    import-safe (entry points behind ``if __name__ == "__main__"``).
    """

    def __init__(
        self,
        model_dir: Path,
        overrides: Mapping[str, Any] | None,
        max_total_sequence_length: int,
        tokenizer: PreTrainedTokenizerBase,
        dtype: str = "float32",
        seed: int = 0,
    ) -> None:
        from vllm import LLM

        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM-CPU's default takes a large share
        hf_config = AutoConfig.from_pretrained(model_dir)
        kwargs = vllm_engine_kwargs(hf_config, overrides, max_total_sequence_length)
        self.max_model_len = kwargs["max_model_len"]
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer, _generation_config(model_dir, hf_config))
        self.llm = LLM(model=str(model_dir), dtype=dtype, enforce_eager=True, seed=seed, **kwargs)

    def generate(self, prompt_token_ids: list[list[int]], max_new_tokens: int) -> list[str]:
        from vllm import SamplingParams

        too_long = [len(p) for p in prompt_token_ids if len(p) + max_new_tokens > self.max_model_len]
        if too_long:
            raise ValueError(
                f"a prompt of {max(too_long)} tokens plus {max_new_tokens} generated ones exceeds vLLM's "
                f"max_model_len = {self.max_model_len} (max_total_sequence_length); shorten the evaluation lengths "
                "or raise max_total_sequence_length"
            )
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=self.stop_ids)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_token_ids], params, use_tqdm=False)
        return [completion_text(self.tokenizer, out.outputs[0].token_ids, self.stop_ids) for out in outputs]

    def prompt_logprobs(self, prompt_token_ids: list[list[int]]) -> list[list[float]]:
        """Each prompt's tokens scored teacher-forced (t >= 1): the generator's side of a parity comparison."""
        from nemo_rl.models.generation.vllm_worker import prompt_logprobs

        return prompt_logprobs(self.llm, prompt_token_ids)

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def _generation_config(model_dir: Path, hf_config: PretrainedConfig) -> GenerationConfig:
    """What vLLM reads its extra stop tokens from: ``generation_config.json``, else the model config."""
    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:
        return GenerationConfig.from_model_config(hf_config)


@contextmanager
def open_generator(
    backend: str,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    model_dir: Path,
    overrides: Mapping[str, Any] | None,
    max_total_sequence_length: int,
    batch_size: int,
) -> Iterator[Generator]:
    """The ``long_context_eval.generation_backend`` generator for a model loaded from ``model_dir``; a vLLM engine
    is shut down on exit (its memory and subprocess are not released otherwise)."""
    if backend == "hf":
        yield HFGenerator(model, tokenizer, batch_size)
        return
    if backend != "vllm":
        raise ValueError(f"long_context_eval.generation_backend: {backend!r} is neither 'hf' nor 'vllm'")
    generator = VllmGenerator(model_dir, overrides, max_total_sequence_length, tokenizer)
    try:
        yield generator
    finally:
        generator.close()
