"""fc1 + SwiGLU as one node against megatron-core's own linear followed by the unfused expression its MLP computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer import TransformerConfig

from nemo_rl.models.megatron.swiglu import SwiGLULinearFC1, _SwiGLULinearFunction

HIDDEN, FFN = 8, 12


def _config(**kwargs) -> TransformerConfig:
    return TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=1, use_cpu_initialization=True, **kwargs
    )


def _fc1(cls, config: TransformerConfig) -> torch.nn.Module:
    return cls(
        HIDDEN,
        2 * FFN,
        config=config,
        init_method=torch.nn.init.normal_,
        bias=False,
        gather_output=False,
        skip_bias_add=True,
    ).double()


def test_fc1_swiglu_equals_megatrons_linear_then_unfused_glu(megatron_single_process):
    torch.manual_seed(0)
    reference = _fc1(ColumnParallelLinear, _config())
    fused = _fc1(SwiGLULinearFC1, _config())
    fused.weight.data.copy_(reference.weight.data)
    x = torch.randn(16, 2, HIDDEN, dtype=torch.float64, requires_grad=True)  # [s, b, h]
    upstream = torch.randn(16, 2, FFN, dtype=torch.float64)

    gate, up = torch.chunk(reference(x)[0], 2, dim=-1)
    expected = F.silu(gate) * (up + 0.0)  # megatron's glu with glu_linear_offset 0
    expected_grads = torch.autograd.grad(expected, (x, reference.weight), upstream)
    out, bias = fused(x)
    grads = torch.autograd.grad(out, (x, fused.weight), upstream)

    assert bias is None and out.shape == (16, 2, FFN)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_fc1_swiglu_gradient_is_the_derivative():
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: _SwiGLULinearFunction.apply(a, w, None), (x, weight))


def test_fc1_swiglu_saves_its_input_and_the_dense_gate_and_up_only():
    x = torch.randn(4, 2, 5, requires_grad=True)
    weight = torch.randn(6, 5, requires_grad=True)
    out = _SwiGLULinearFunction.apply(x * 1.0, weight, None)
    saved_input, saved_weight, halves = out.grad_fn.saved_tensors
    assert saved_input.shape == x.shape and saved_weight is not None
    assert halves.shape == (2, 8, 3) and halves.is_contiguous()


def test_frozen_fc1_weight_gets_no_gradient():
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 5, dtype=torch.float64)
    out = _SwiGLULinearFunction.apply(x, weight, None)
    (grad,) = torch.autograd.grad(out.sum(), (x,))
    assert grad.shape == x.shape and weight.grad is None


def test_fc1_swiglu_refuses_what_it_does_not_compute(megatron_single_process):
    with pytest.raises(ValueError, match="glu_linear_offset"):
        _fc1(SwiGLULinearFC1, _config(glu_linear_offset=1.0))
    with pytest.raises(ValueError, match="no bias"):
        SwiGLULinearFC1(HIDDEN, 2 * FFN, config=_config(), init_method=torch.nn.init.normal_, bias=True)
