"""The Megatron layers' RMSNorm against torch's ``nn.RMSNorm`` (differentiated by autograd) and transformers' Qwen2 one."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer import TransformerConfig
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from nemo_rl.models.megatron.norms import SequenceParallelRMSNorm, _RMSNormCPU

WIDTH, EPS = 16, 1e-6


def _norm(sequence_parallel: bool = False) -> SequenceParallelRMSNorm:
    config = TransformerConfig(
        num_layers=1,
        hidden_size=WIDTH,
        num_attention_heads=2,
        normalization="RMSNorm",
        sequence_parallel=sequence_parallel,
        tensor_model_parallel_size=2 if sequence_parallel else 1,
    )
    norm = SequenceParallelRMSNorm(config, WIDTH, eps=EPS).double()
    torch.nn.init.normal_(norm.weight, generator=torch.Generator().manual_seed(0))
    return norm


@pytest.mark.parametrize("shape", [(32, 3, WIDTH), (32, 3, 4, WIDTH)])  # [s, b, h] and Q/K norms' [s, b, heads, d]
@pytest.mark.parametrize(
    ("reference_cls", "dtype", "tolerance"),
    [(torch.nn.RMSNorm, torch.float64, 1e-12), (Qwen2RMSNorm, torch.float32, 1e-5)],  # Qwen2's computes in float32
)
def test_output_and_gradients_equal_the_references(shape, reference_cls, dtype, tolerance):
    norm = _norm().to(dtype)
    reference = reference_cls(WIDTH, eps=EPS).to(dtype)
    reference.weight.data.copy_(norm.weight.data)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator, dtype=dtype) * 3
    upstream = torch.randn(shape, generator=generator, dtype=dtype)
    mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = norm(mine), reference(theirs)
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    out.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(norm.weight.grad, reference.weight.grad, rtol=tolerance, atol=tolerance)


def test_gradcheck():
    x = torch.randn(5, 2, WIDTH, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(WIDTH, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: _RMSNormCPU.apply(a, w, EPS), (x, weight))


def test_bfloat16_input_within_rounding_of_float32():
    norm = _norm().float()
    x = torch.randn(64, 2, WIDTH, generator=torch.Generator().manual_seed(2))
    upstream = torch.randn(64, 2, WIDTH, generator=torch.Generator().manual_seed(3))
    full = x.clone().requires_grad_()
    norm(full).backward(upstream)
    full_weight_grad = norm.weight.grad.clone()
    norm.weight.grad = None
    norm = norm.bfloat16()
    low = x.bfloat16().requires_grad_()
    out = norm(low)
    out.backward(upstream.bfloat16())
    assert out.dtype == low.grad.dtype == norm.weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(low.grad.float(), full.grad, rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(norm.weight.grad.float(), full_weight_grad, rtol=2e-2, atol=1e-1)


def test_frozen_weight_gets_no_gradient_and_the_sequence_parallel_mark_stays():
    norm = _norm(sequence_parallel=True)
    assert norm.weight.sequence_parallel is True
    norm.weight.requires_grad_(False)
    x = torch.randn(4, 1, WIDTH, dtype=torch.float64, requires_grad=True)
    norm(x).sum().backward()
    assert norm.weight.grad is None and x.grad is not None
