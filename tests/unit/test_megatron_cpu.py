"""megatron-core's own training machinery on CPU through the compatibility layer.

References are plain PyTorch computations on the same model, so these tests
would catch the layer changing what megatron computes, not just crashes.
"""

from __future__ import annotations

import pytest
import torch

from nemo_rl.distributed.parallel_dims import ParallelDims
from nemo_rl.models.megatron.model_builder import build_gpt_model, transformer_config_from_hf
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
    plain = build_gpt_model(HF, transformer_config_from_hf(HF, "float32", ParallelDims()))
    recompute = build_gpt_model(
        HF, transformer_config_from_hf(HF, "float32", ParallelDims(), activation_checkpointing=True)
    )
    recompute.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(1))  # 3x the window
    _loss(plain, ids).backward()
    _loss(recompute, ids).backward()
    expected, got = _grads(plain), _grads(recompute)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_model_loss_is_megatrons_vocab_parallel_cross_entropy(megatron_single_process):
    """The whole-vocabulary loss (torch's cross-entropy) against megatron's own, forward and gradient."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    model = build_gpt_model(HF, transformer_config_from_hf(HF, "float32", ParallelDims()))
    generator = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(24, 3, HF.vocab_size, generator=generator)).requires_grad_()  # [s, b, V]
    labels = torch.randint(0, HF.vocab_size, (3, 24), generator=generator)  # [b, s]
    upstream = torch.randn(3, 24, generator=generator)

    loss = model.compute_language_model_loss(labels, logits)
    (grad,) = torch.autograd.grad(loss, logits, upstream)
    expected = vocab_parallel_cross_entropy(logits, labels.t().contiguous()).t()
    (expected_grad,) = torch.autograd.grad(expected, logits, upstream)

    assert loss.shape == (3, 24)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-7)


def _trained_with_megatron_optimizer(model, distributed: bool, clip_grad: float = 0.05):
    """``model`` in megatron DDP with its optimizer (Adam, lr 1e-2, clipping at ``clip_grad``) on torch's fused
    AdamW kernel, as the worker builds it."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from nemo_rl.models.megatron.fused_adam import use_fused_adam

    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed),
        model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-2,
            weight_decay=0.0,
            clip_grad=clip_grad,
            params_dtype=torch.float32,
            use_distributed_optimizer=distributed,
        ),
        [ddp],
    )
    use_fused_adam(optimizer)
    return ddp, optimizer


def _fused(optimizer) -> list[bool]:
    return [group["fused"] for inner in optimizer.chained_optimizers for group in inner.optimizer.param_groups]


def _megatron_step(ddp, optimizer, ids):
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    _loss(ddp, ids).backward()
    ddp.finish_grad_sync()
    return optimizer.step()


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("distributed", [False, True], ids=["plain", "distributed"])
def test_megatron_optimizer_step_matches_torch_adamw_with_clipping(megatron_single_process, distributed):
    torch.manual_seed(0)
    model = build_gpt_model(HF, transformer_config_from_hf(HF, "float32", ParallelDims()))
    reference = build_gpt_model(HF, transformer_config_from_hf(HF, "float32", ParallelDims()))
    reference.load_state_dict(model.state_dict())
    ddp, optimizer = _trained_with_megatron_optimizer(model, distributed)
    ids = _ids(2)
    ok, grad_norm, _ = _megatron_step(ddp, optimizer, ids)
    assert _fused(optimizer) and all(_fused(optimizer))

    # torch's default implementation: one tensor, one op at a time
    torch_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    _loss(reference, ids).backward()
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    torch_opt.step()

    assert ok
    assert abs(grad_norm - expected_norm.item()) < 1e-5 * expected_norm.item()
    assert expected_norm.item() > 0.05, "the test must exercise clipping"
    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_distributed_optimizer_resumed_from_its_saved_state_steps_like_the_uninterrupted_one(
    megatron_single_process, tmp_path
):
    """Model, optimizer state dict and shard through files, then one more step: bit for bit the same weights.

    Adam's moments and per-parameter step count (its bias correction) must all come back;
    the resumed step is taken on a model built from a different initialisation.
    """
    from nemo_rl.models.megatron.optimizer_state import load_optimizer_state, optimizer_shard

    torch.manual_seed(0)
    ddp, optimizer = _trained_with_megatron_optimizer(
        build_gpt_model(HF, transformer_config_from_hf(HF, "float32", ParallelDims())), distributed=True
    )
    for seed in (3, 4):
        _megatron_step(ddp, optimizer, _ids(seed))
    saved = {"model": ddp.module.state_dict(), "optimizer": optimizer.state_dict(), "shard": optimizer_shard(optimizer)}
    torch.save(saved, tmp_path / "state.pt")
    _megatron_step(ddp, optimizer, _ids(5))

    torch.manual_seed(1)
    resumed, resumed_optimizer = _trained_with_megatron_optimizer(
        build_gpt_model(HF, transformer_config_from_hf(HF, "float32", ParallelDims())), distributed=True
    )
    loaded = torch.load(tmp_path / "state.pt", weights_only=False)
    resumed.module.load_state_dict(loaded["model"])
    for group in loaded["optimizer"]["optimizer"]["param_groups"]:  # as saved from torch's default kernel
        group["fused"], group["foreach"] = None, None
    load_optimizer_state(resumed_optimizer, loaded["optimizer"], loaded["shard"])
    assert all(_fused(resumed_optimizer)), "the load put back the saved groups; the fused kernel is chosen again"
    _megatron_step(resumed, resumed_optimizer, _ids(5))
    for (name, want), (_, got) in zip(ddp.module.named_parameters(), resumed.module.named_parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_resuming_with_another_optimizer_layout_names_the_setting_to_use():
    from nemo_rl.models.megatron.optimizer_state import check_optimizer_layout, optimizer_layout

    path = "step_2/policy_tp00_pp00.pt"
    check_optimizer_layout(path, optimizer_layout(True, 2), distributed=True, data_parallel_size=2)
    check_optimizer_layout(path, None, distributed=False, data_parallel_size=4)  # saved before the option: plain
    with pytest.raises(ValueError, match=r"resume with policy.megatron_cfg.optimizer.use_distributed_optimizer=false"):
        check_optimizer_layout(path, None, distributed=True, data_parallel_size=2)
    with pytest.raises(ValueError, match=r"use_distributed_optimizer=true state is sharded over 2 .* this run has 4"):
        check_optimizer_layout(path, optimizer_layout(True, 2), distributed=True, data_parallel_size=4)


def test_buffer_collectives_over_one_rank_are_skipped_only_in_place(megatron_single_process):
    from megatron.core.distributed import param_and_grad_buffer as buffers

    from nemo_rl.models.megatron.cpu_compat import _identity_on_one_rank

    # enable_cpu_compat (the fixture) put the skip in front of both of megatron's buffer collectives
    assert hasattr(buffers.dist_reduce_scatter_func, "__wrapped__")
    assert hasattr(buffers.dist_all_gather_func, "__wrapped__")
    calls = []
    skip = _identity_on_one_rank(lambda output, input, **kwargs: calls.append(kwargs))
    group = torch.distributed.group.WORLD
    buffer = torch.arange(6.0)
    assert skip(buffer, buffer, group=group, async_op=False) is None  # one rank, in place: the buffer is the result
    assert calls == [] and torch.equal(buffer, torch.arange(6.0))
    skip(torch.empty(6), buffer, group=group, async_op=False)  # another output: the collective runs
    skip(buffer[:3], buffer, group=group, async_op=False)  # same start, not the whole buffer: it runs
    assert len(calls) == 2


def test_device_redirect_is_paused_only_inside_the_wrapped_call(megatron_single_process):
    """``without_device_redirect`` takes the layer's own mode off for the call and puts it back, also after an
    error; under any other mode on top it pauses nothing."""
    from nemo_rl.models.megatron.cpu_compat import _CudaToCpuMode, without_device_redirect

    current = torch.overrides._get_current_function_mode
    redirect = current()
    assert isinstance(redirect, _CudaToCpuMode)
    seen = []

    def step(x):
        seen.append(current())
        return x + 1

    assert without_device_redirect(step)(torch.ones(1)).item() == 2
    assert seen[-1] is not redirect and current() is redirect

    def fails():
        torch.zeros(1, device="cuda")  # a literal "cuda" is not redirected in here

    with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
        without_device_redirect(fails)()
    assert current() is redirect and torch.zeros(1, device="cuda").device.type == "cpu"

    class Passthrough(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough() as other:
        without_device_redirect(step)(torch.ones(1))
    assert seen[-1] is other


def test_backward_step_and_torchs_optimizer_update_run_outside_the_device_redirect(megatron_single_process):
    """Their torch calls skip the redirect's Python hook; megatron's optimizer wrapper around the update keeps it."""
    from megatron.core.pipeline_parallel import schedules

    from nemo_rl.models.megatron.cpu_compat import _CudaToCpuMode, pause_redirect_in_optimizer_update

    current = torch.overrides._get_current_function_mode
    assert hasattr(schedules.backward_step, "__wrapped__")  # enable_cpu_compat (the fixture) wrapped it
    torch.manual_seed(0)
    ddp, optimizer = _trained_with_megatron_optimizer(
        build_gpt_model(HF, transformer_config_from_hf(HF, "float32", ParallelDims())), distributed=True
    )
    modes, paused = [], []
    for inner in optimizer.chained_optimizers:
        inner.optimizer.register_step_pre_hook(lambda *args: modes.append(current()))
        copy = inner._copy_model_grads_to_main_grads  # one of megatron's per-parameter loops, paused too

        def copy_noting_the_mode(copy=copy):
            paused.append(current())
            copy()

        inner._copy_model_grads_to_main_grads = copy_noting_the_mode
    pause_redirect_in_optimizer_update(optimizer)
    ok, _, _ = _megatron_step(ddp, optimizer, _ids(2))
    assert ok and modes and not any(isinstance(mode, _CudaToCpuMode) for mode in modes)
    assert paused and not any(isinstance(mode, _CudaToCpuMode) for mode in paused)
    assert isinstance(current(), _CudaToCpuMode)
