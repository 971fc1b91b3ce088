"""The vLLM generation worker (a Ray actor) matches the Megatron policy, before and after a weight refit.

With one engine process and with vLLM tensor parallelism 2. Both sides get the default recipe's YaRN block (4x the tiny model's 256-token
window) from the same config; prompts are 600 tokens long so the comparison
covers positions beyond the original window. After one training step the
policy's weights are refitted into the running engine, which must then give the
trained policy's log-probabilities (not the initial ones), whichever transport
carried the weights. An engine of one process makes its 13 gloo groups on one
transport device (``gloo_groups_share_device``), so it has one event-loop thread.
"""

from __future__ import annotations

import os

import pytest
import torch

from nemo_rl.algorithms.loss_functions import NLLLoss
from tests.helpers import gloo_loop_threads, local_ray, running_policy, sft_config

pytestmark = [pytest.mark.functional, pytest.mark.slow]

# float32 on both sides; measured max |diff| 2.5e-6 (see test_yarn_logprob_parity.py for the
# loaded-machine outlier that sets this bound).
ATOL = 1e-2
# Well below the tiny model's fused modules (~100 KiB to ~400 KiB): most buckets hold a single one.
REFIT_BUCKET_BYTES = 64 * 1024


def _policy_logprobs(policy, ids: torch.Tensor) -> torch.Tensor:
    logits = policy.get_logits(ids)
    return torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]


# One engine process with the object store, and vLLM tensor parallelism 2 with the broadcast (each TP rank
# its own rank in the weight group): the two refit transports and both engine shapes in two runs.
@pytest.mark.parametrize(
    ("engine_tp", "transport"), [(1, "object_store"), (2, "collective")], ids=["tp1_object_store", "tp2_collective"]
)
def test_generation_matches_the_policy_and_follows_a_refit(tmp_path, engine_tp, transport):
    import ray

    from nemo_rl.models.builtin_models import resolve_model_path
    from nemo_rl.models.generation.vllm_worker import VllmGenerationWorker
    from nemo_rl.models.generation.weight_sync import WeightSync
    from nemo_rl.models.megatron.hf_weights import megatron_to_hf

    cfg = sft_config("policy.megatron_cfg.scheduler.lr_warmup_iters=0")
    ids = torch.randint(3, 550, (1, 600), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids.repeat(2, 1), "loss_mask": torch.ones(2, 600, dtype=torch.long)}
    with local_ray(2, tmp_path / "mcore"), running_policy(cfg.policy, 1) as policy:
        model_path = str(resolve_model_path("tiny-qwen2"))
        # The policy's bundle holds every CPU of the local cluster; the generator shares them (GRPO will
        # place generation in bundles of its own or colocated ones).
        # engine_tp 2: one engine over two processes (vLLM-CPU's tensor parallelism, a core each); the refit
        # sends each rank the whole bucket and vLLM's loaders keep the rank's shard.
        generator = (
            ray.remote(VllmGenerationWorker)
            .options(num_cpus=0)
            .remote(cfg.policy, model_path, {"tensor_parallel_size": engine_tp})
        )
        try:
            before = torch.tensor(ray.get(generator.prompt_logprobs.remote([ids[0].tolist()]))[0], dtype=torch.float64)
            if engine_tp == 1:  # the engine runs in the actor: its 13 gloo groups share one event loop
                assert gloo_loop_threads(ray.get(generator.__ray_call__.remote(lambda _: os.getpid()))) == 1
            torch.testing.assert_close(before, _policy_logprobs(policy, ids), rtol=0, atol=ATOL)

            policy.train(batch, NLLLoss(), micro_batch_size=2)
            hf_state = megatron_to_hf(policy.gathered_state("params"), policy_hf_config(model_path, cfg))
            # Small buckets, so the refit arrives in many parts straight from the policy worker (weight_sync),
            # through the object store or by broadcast over a gloo group of the policy worker and the engine.
            assert WeightSync([generator], REFIT_BUCKET_BYTES, transport).refit(policy) == len(hf_state)
            after = torch.tensor(ray.get(generator.prompt_logprobs.remote([ids[0].tolist()]))[0], dtype=torch.float64)
            trained = _policy_logprobs(policy, ids)
            torch.testing.assert_close(after, trained, rtol=0, atol=ATOL)
            assert (trained - before).abs().max() > 10 * ATOL  # the step changed what the check compares

            (completion,) = ray.get(generator.generate.remote([ids[0, :300].tolist()], max_new_tokens=8, temperature=0))
            assert len(completion.token_ids) == len(completion.logprobs) == 8
            assert all(lp <= 0 for lp in completion.logprobs)
        finally:
            ray.get(generator.shutdown.remote())
            ray.kill(generator)


def policy_hf_config(model_path: str, cfg):
    from transformers import AutoConfig

    from nemo_rl.rope.hf_config import apply_hf_config_overrides

    return apply_hf_config_overrides(
        AutoConfig.from_pretrained(model_path),
        cfg.policy.effective_hf_config_overrides,
        cfg.policy.max_total_sequence_length,
    )
