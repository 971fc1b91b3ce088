"""megatron-core's ``linear_fc1`` and the SwiGLU after it, as one autograd node.

megatron-core's gated MLP multiplies by fc1's fused ``[gate; up]`` weight in
one GEMM, so gate and up come out as the two strided halves of one
``[s, b, 2 * ffn]`` tensor, and the activation then computes
``silu(gate) * up`` over those halves; torch's CPU elementwise kernels are
slower over strided halves than over dense tensors (``silu`` and the product:
1.9 against 1.5 ms at the tiny model's ``[4096, 384]``, two CPU cores).

Here fc1 writes gate and up as two dense blocks of one ``[2, tokens, ffn]``
buffer (one GEMM against each half of the same weight, which stays megatron's
``[gate; up]`` parameter, so checkpoints, tensor-parallel sharding and the HF
conversion are unchanged), and the backward writes the halves' gradients as
two dense blocks too. The node saves fc1's input and that buffer, what
megatron's linear and the separate activation saved, and recomputes
``silu(gate)`` in the backward rather than holding it. The maths is torch's
own ``mm``, ``silu`` and ``silu_backward`` kernels, equal to megatron's linear
followed by its unfused expression in float64 (``tests/unit/test_swiglu.py``).
A whole tiny-qwen2 training step at 4 x 1024 tokens, in-process, alternating
steps: 207.3 -> 203.4 ms (a plain transformers loop: 189.7 ms); at the 20M
shape the difference is within noise (4246 -> 4232 ms).

Tensor parallelism keeps megatron's scheme: each rank holds its rows of gate
and of up; under sequence parallelism the input is all-gathered along the
sequence for the forward and again for the weight gradient (megatron's own
linear does the same, so the node holds only the local input), and the input
gradient is reduce-scattered (megatron's own gather and reduce-scatter along
the first dimension); without it, the input gradient is all-reduced.

The node is ``linear_fc1``'s ``_forward_impl`` (megatron's hook for the GEMM
inside ``ColumnParallelLinear.forward``), so the module, its parameters and
hooks are megatron's; the spec's activation slot, which megatron's MLP calls on
fc1's output when ``use_te_activation_func`` is set, is then the identity.
"""

from __future__ import annotations

import dataclasses
from typing import cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import (
    _gather_along_first_dim,
    _reduce_scatter_along_first_dim,
    copy_to_tensor_model_parallel_region,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules


class _SwiGLULinearFunction(torch.autograd.Function):
    """``silu(x @ gate.T) * (x @ up.T)`` for ``weight = [gate; up]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, sequence_group: dist.ProcessGroup | None):
        total = _gather_along_first_dim(x, sequence_group) if sequence_group is not None else x
        ffn = weight.shape[0] // 2
        rows = total.reshape(-1, total.shape[-1])
        halves = rows.new_empty((2, rows.shape[0], ffn))
        torch.mm(rows, weight[:ffn].t(), out=halves[0])
        torch.mm(rows, weight[ffn:].t(), out=halves[1])
        ctx.save_for_backward(x, weight, halves)
        ctx.sequence_group = sequence_group
        return F.silu(halves[0]).mul_(halves[1]).view(*total.shape[:-1], ffn)

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):
        x, weight, halves = ctx.saved_tensors
        group = ctx.sequence_group
        gate, up = halves
        ffn = gate.shape[-1]
        grad = grad_outputs[0].reshape(-1, ffn)
        grad_halves = torch.empty_like(halves)
        torch.mul(grad, F.silu(gate), out=grad_halves[1])
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_halves[0])

        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_rows = torch.mm(grad_halves[0], weight[:ffn]).addmm_(grad_halves[1], weight[ffn:])
            grad_x = grad_rows.view(*grad_outputs[0].shape[:-1], weight.shape[1])
            if group is not None:
                grad_x = _reduce_scatter_along_first_dim(grad_x, group)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            total = _gather_along_first_dim(x, group) if group is not None else x
            rows = total.reshape(-1, total.shape[-1])
            grad_weight = torch.empty_like(weight)
            torch.mm(grad_halves[0].t(), rows, out=grad_weight[:ffn])
            torch.mm(grad_halves[1].t(), rows, out=grad_weight[ffn:])
        return grad_x, grad_weight, None


class SwiGLULinearFC1(ColumnParallelLinear):
    """megatron's ``linear_fc1`` whose output is already ``silu(gate) * up``: ``[..., ffn]``, not ``[..., 2 * ffn]``."""

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig, **kwargs) -> None:
        super().__init__(input_size, output_size, config=config, **kwargs)
        if config.glu_linear_offset != 0.0 or config.activation_func_clamp_value is not None:
            raise ValueError("SwiGLU computes silu(gate) * up: no glu_linear_offset, no activation clamp")
        if self.bias is not None or config.gradient_accumulation_fusion or self.gather_output:
            raise ValueError("the SwiGLU fc1 has no bias, no gradient-accumulation fusion and no gathered output")

    def _forward_impl(  # type: ignore[override]  # names what the base takes as *args, **kwargs
        self,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        gradient_accumulation_fusion: bool,
        allreduce_dgrad: bool,
        sequence_parallel: bool,
        *args,
        tp_group: dist.ProcessGroup | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if allreduce_dgrad:  # tensor-parallel without sequence parallelism: the input gradient is all-reduced
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        return _SwiGLULinearFunction.apply(input, weight, tp_group if sequence_parallel else None)


def with_swiglu(layer_spec: ModuleSpec) -> ModuleSpec:
    """The local layer spec with ``SwiGLULinearFC1`` as its MLP's fc1 and the identity as the activation (the
    config must set ``use_te_activation_func`` for megatron's MLP to call the activation slot)."""
    layer = cast(TransformerLayerSubmodules, layer_spec.submodules)
    mlp = cast(ModuleSpec, layer.mlp)
    submodules = dataclasses.replace(
        cast(MLPSubmodules, mlp.submodules), linear_fc1=SwiGLULinearFC1, activation_func=torch.nn.Identity
    )
    mlp = dataclasses.replace(mlp, submodules=submodules)
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer, mlp=mlp))
