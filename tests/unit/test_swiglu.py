"""The fused SwiGLU node against the unfused expression megatron-core's MLP computes without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from nemo_rl.models.megatron.swiglu import SwiGLU, _SwiGLUFunction


def _config(**kwargs) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True, **kwargs)


def test_swiglu_equals_megatrons_unfused_glu_forward_and_backward():
    torch.manual_seed(0)
    fc1 = torch.randn(16, 2, 24, dtype=torch.float64, requires_grad=True)  # [s, b, 2 * ffn]
    upstream = torch.randn(16, 2, 12, dtype=torch.float64)
    gate, up = torch.chunk(fc1, 2, dim=-1)
    expected = F.silu(gate) * (up + 0.0)  # megatron's glu with glu_linear_offset 0
    (expected_grad,) = torch.autograd.grad(expected, fc1, upstream)

    out = SwiGLU(_config())(fc1)
    (grad,) = torch.autograd.grad(out, fc1, upstream)

    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-15)


def test_swiglu_gradient_is_the_derivative():
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLUFunction.apply, (x,))


def test_swiglu_saves_only_the_fc1_output_for_backward():
    fc1 = torch.randn(4, 2, 6, requires_grad=True)
    out = _SwiGLUFunction.apply(fc1 * 1.0)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].shape == fc1.shape


def test_swiglu_refuses_what_it_does_not_compute():
    with pytest.raises(ValueError, match="glu_linear_offset"):
        SwiGLU(_config(glu_linear_offset=1.0))
