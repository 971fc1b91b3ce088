"""RMSNorm for megatron-core's local layer spec that also works with sequence parallelism.

megatron-core's ``WrappedTorchNorm`` (the local spec's norm when neither
Transformer Engine nor Apex is installed, as on CPU) refuses
``sequence_parallel``: under it each TP rank normalises only its slice of the
sequence, so the norm weight's gradient is partial and must be summed over the
TP ranks. megatron's ``finalize_model_grads`` does that sum for every parameter
marked ``sequence_parallel`` (what its fused norms do), so this norm is
torch's RMSNorm plus that mark.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object) -> None:
        if config.normalization != "RMSNorm":
            raise ValueError(f"SequenceParallelRMSNorm is an RMSNorm, config asks for {config.normalization}")
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def with_rms_norm(layer_spec: ModuleSpec) -> ModuleSpec:
    """The local layer spec with each of its torch norms (input, pre-MLP, Q/K) made ``SequenceParallelRMSNorm``."""
    layer = layer_spec.submodules
    attention = layer.self_attention
    qk = {name: SequenceParallelRMSNorm for name in ("q_layernorm", "k_layernorm") if _is_torch_norm(attention, name)}
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(attention.submodules, **qk))
    norms = {
        name: SequenceParallelRMSNorm
        for name in ("input_layernorm", "pre_mlp_layernorm")
        if getattr(layer, name) is WrappedTorchNorm
    }
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer, self_attention=attention, **norms))


def _is_torch_norm(spec: ModuleSpec, name: str) -> bool:
    return getattr(spec.submodules, name) is WrappedTorchNorm
