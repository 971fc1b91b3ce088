"""Core attention for megatron-core's local layer spec: SDPA kernels, packed sequences, context parallelism.

megatron-core's own local ``DotProductAttention`` materialises the L x L score
matrix and refuses both packed (``thd``) sequences and context parallelism;
those live in Transformer Engine, which CPU machines cannot install. This
module fills the same slot in the layer spec with torch's
``scaled_dot_product_attention``:

- one batch of right-padded rows (``sbhd``): causal SDPA, which dispatches to
  flash / memory-efficient kernels and never builds an L x L mask;
- packed rows (``thd`` with ``cu_seqlens``): each sample attends only within
  itself, one causal SDPA call per sample;
- context parallelism (packed rows only, as in megatron-core): each CP rank holds,
  per sample, chunks ``r`` and ``2 CP - 1 - r`` of ``2 CP`` equal chunks (the
  load-balanced split megatron's RoPE expects); keys and values are all-gathered
  over the CP group, and each local query chunk attends causally to the prefix
  of its sample that ends with it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.nn.attention.bias import causal_lower_right

from nemo_rl.models.megatron.context_parallel import all_gather_with_grad, cp_token_indices


class SDPACoreAttention(MegatronModule):
    """Drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward signature)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        **_: object,
    ) -> None:
        super().__init__(config=config)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or config.softmax_scale or head_dim**-0.5
        self.heads_per_group = config.num_attention_heads // config.num_query_groups

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """``sbhd``: [s, b, heads, d] in, [s, b, heads * d] out; ``thd``: [t, heads, d] in, [t, heads * d] out.

        ``attention_mask`` is not read: attention is causal (within each sample
        when packed), which is what every caller of this project passes.
        """
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not take an attention bias")
        if packed_seq_params is None:
            if self.config.context_parallel_size > 1:
                raise ValueError("context parallelism needs packed sequences (policy.sequence_packing.enabled=true)")
            # [s, b, h, d] -> [b, h, s, d]
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            out = self._sdpa(q, k, v, causal=True)
            return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)
        cu_seqlens = packed_seq_params.cu_seqlens_q
        if self.config.context_parallel_size > 1:
            out = self._context_parallel(query, key, value, cu_seqlens)
        else:
            out = torch.cat(
                [
                    self._segment(query[s:e], key[s:e], value[s:e], None)
                    for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())
                ]
            )
        return out.reshape(out.shape[0], -1)

    def _context_parallel(self, query, key, value, cu_seqlens) -> torch.Tensor:
        group = parallel_state.get_context_parallel_group()
        cp, rank = group.size(), group.rank()
        keys, values = (all_gather_with_grad(x, group) for x in (key, value))
        full_key = torch.empty((int(cu_seqlens[-1]), *key.shape[1:]), dtype=key.dtype, device=key.device)
        full_value = torch.empty_like(full_key)
        for r in range(cp):  # scatter each rank's chunks back to their places in the packed sequence
            index = cp_token_indices(cu_seqlens, cp, r).to(key.device)
            full_key = full_key.index_copy(0, index, keys[r])
            full_value = full_value.index_copy(0, index, values[r])
        outputs, offset = [], 0
        for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            chunk = (end - start) // (2 * cp)
            for j in (rank, 2 * cp - 1 - rank):  # this rank's early and late chunk of the sample
                q = query[offset : offset + chunk]
                offset += chunk
                visible = slice(start, start + (j + 1) * chunk)
                outputs.append(self._segment(q, full_key[visible], full_value[visible], (chunk, (j + 1) * chunk)))
        return torch.cat(outputs)

    def _segment(self, q, k, v, lower_right: tuple[int, int] | None) -> torch.Tensor:
        """One sample's ``[t, h, d]`` queries against its keys; causal, aligned at the last key when ``lower_right``."""
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, h, t, d]
        if lower_right is None:
            out = self._sdpa(q, k, v, causal=True)
        else:
            out = self._sdpa(q, k, v, causal=False, mask=causal_lower_right(*lower_right))
        return out.squeeze(0).transpose(0, 1)

    def _sdpa(self, q, k, v, causal: bool, mask=None) -> torch.Tensor:
        if self.heads_per_group > 1:  # GQA: each key/value head serves a group of query heads
            k = k.repeat_interleave(self.heads_per_group, dim=1)
            v = v.repeat_interleave(self.heads_per_group, dim=1)
        if not (self.training and self.dropout):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale)
        # TP ranks hold different heads, so they draw dropout from the model-parallel RNG stream.
        with get_cuda_rng_tracker().fork():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout, scale=self.softmax_scale
            )


def with_sdpa_attention(layer_spec: ModuleSpec) -> ModuleSpec:
    """The local layer spec with ``SDPACoreAttention`` in the core-attention slot."""
    layer = layer_spec.submodules
    attention = layer.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=SDPACoreAttention)
    )
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer, self_attention=attention))
