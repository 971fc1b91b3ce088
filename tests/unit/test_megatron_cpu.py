"""megatron-core's own training machinery on CPU through the compatibility layer.

References are plain PyTorch computations on the same model, so these tests
would catch the layer changing what megatron computes, not just crashes.
"""

from __future__ import annotations

import torch

from nemo_rl.models.megatron.model_builder import ParallelLayout, build_gpt_model, transformer_config_from_hf
from tests.helpers import tiny_qwen2_config, yarn_block

HF = tiny_qwen2_config(
    num_hidden_layers=2,
    max_position_embeddings=128,
    rope_parameters=yarn_block(original_max_position_embeddings=32),
)


def _loss(model, ids):
    length = ids.shape[1]
    per_token = model(
        input_ids=ids,
        position_ids=torch.arange(length).expand(ids.shape[0], -1),
        attention_mask=None,
        labels=torch.roll(ids, -1, 1),
    )
    return per_token.mean()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_recomputation_gives_identical_gradients(megatron_single_process):
    torch.manual_seed(0)
    plain = build_gpt_model(HF, transformer_config_from_hf(HF, "float32", ParallelLayout()))
    recompute = build_gpt_model(
        HF, transformer_config_from_hf(HF, "float32", ParallelLayout(), activation_checkpointing=True)
    )
    recompute.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(1))  # 3x the window
    _loss(plain, ids).backward()
    _loss(recompute, ids).backward()
    expected, got = _grads(plain), _grads(recompute)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_megatron_optimizer_step_matches_torch_adamw_with_clipping(megatron_single_process):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    torch.manual_seed(0)
    tf_config = transformer_config_from_hf(HF, "float32", ParallelLayout())
    model = build_gpt_model(HF, tf_config)
    reference = build_gpt_model(HF, transformer_config_from_hf(HF, "float32", ParallelLayout()))
    reference.load_state_dict(model.state_dict())
    ddp = DistributedDataParallel(tf_config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, clip_grad=0.05, params_dtype=torch.float32),
        [ddp],
    )
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(2))
    ddp.zero_grad_buffer()
    _loss(ddp, ids).backward()
    ddp.finish_grad_sync()
    ok, grad_norm, _ = optimizer.step()

    torch_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    _loss(reference, ids).backward()
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    torch_opt.step()

    assert ok
    assert abs(grad_norm - expected_norm.item()) < 1e-5 * expected_norm.item()
    assert expected_norm.item() > 0.05, "the test must exercise clipping"
    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
