"""Core attention for megatron-core's local layer spec: SDPA kernels, packed sequences, context parallelism.

megatron-core's own local ``DotProductAttention`` materialises the L x L score
matrix and refuses both packed (``thd``) sequences and context parallelism;
those live in Transformer Engine, which CPU machines cannot install. This
module fills the same slot in the layer spec with torch's
``scaled_dot_product_attention``:

- one batch of right-padded rows (``sbhd``): causal SDPA, which dispatches to
  flash / memory-efficient kernels and never builds an L x L mask;
- packed rows (``thd`` with ``cu_seqlens``): each sample attends only within
  itself. Samples of similar length (within a factor of two) are gathered into
  one right-padded batch and attended with one causal SDPA call per such group
  (a few calls per row, not one per sample; causal attention never lets a valid
  query see the right padding, so no mask is built). A Python loop per sample made
  many short samples cost more in call overhead than in arithmetic, while a
  block-diagonal mask over the whole row would be L x L (and ``flex_attention``
  has no backward on CPU);
- context parallelism (packed rows only, as in megatron-core): each CP rank holds,
  per sample, chunks ``r`` and ``2 CP - 1 - r`` of ``2 CP`` equal chunks (the
  load-balanced split megatron's RoPE expects); keys and values are all-gathered
  over the CP group, and each local query chunk attends causally to the prefix
  of its sample that ends with it (batched by length group like packed rows).
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
            out = self._packed(query, key, value, cu_seqlens)
        return out.reshape(out.shape[0], -1)

    def _packed(self, query, key, value, cu_seqlens) -> torch.Tensor:
        """``[t, h, d]`` packed samples, each attending causally within itself; one SDPA call per length group."""
        cu_seqlens = cu_seqlens.to(torch.long).cpu()
        lengths = cu_seqlens.diff()
        positions, outputs = [], []
        for group in length_groups(lengths):
            rows = _Rows(cu_seqlens[group], lengths[group], query.device)
            q, k, v = (rows.pad(x) for x in (query, key, value))
            outputs.append(rows.unpad(self._sdpa(q, k, v, causal=True)))
            positions.append(rows.tokens)
        return torch.cat(outputs)[torch.argsort(torch.cat(positions))]

    def _context_parallel(self, query, key, value, cu_seqlens) -> torch.Tensor:
        """This rank's query chunks (per sample: chunk ``rank``, then ``2 CP - 1 - rank``) against their prefixes.

        Each chunk sees its sample's keys up to its own end, causally aligned at that end. Chunks of samples of
        similar length are batched as in ``_packed``, with a ``[n, C, P]`` mask for the lower-right alignment.
        """
        group = parallel_state.get_context_parallel_group()
        cp, rank = group.size(), group.rank()
        keys, values = (all_gather_with_grad(x, group) for x in (key, value))
        full_key = torch.empty((int(cu_seqlens[-1]), *key.shape[1:]), dtype=key.dtype, device=key.device)
        full_value = torch.empty_like(full_key)
        for r in range(cp):  # scatter each rank's chunks back to their places in the packed sequence
            index = cp_token_indices(cu_seqlens, cp, r).to(key.device)
            full_key = full_key.index_copy(0, index, keys[r])
            full_value = full_value.index_copy(0, index, values[r])
        cu_seqlens = cu_seqlens.to(torch.long).cpu()
        chunks = cu_seqlens.diff() // (2 * cp)
        local_starts = 2 * (chunks.cumsum(0) - chunks)  # where each sample's two chunks begin on this rank
        positions, outputs = [], []
        for group in length_groups(chunks):
            for late, j in enumerate((rank, 2 * cp - 1 - rank)):
                chunk = chunks[group]
                queries = _Rows(local_starts[group] + late * chunk, chunk, query.device)
                prefixes = _Rows(cu_seqlens[group], (j + 1) * chunk, query.device)
                q, k, v = queries.pad(query), prefixes.pad(full_key), prefixes.pad(full_value)
                mask = _lower_right_causal(chunk, (j + 1) * chunk, queries.width, prefixes.width).to(q.device)
                outputs.append(queries.unpad(self._sdpa(q, k, v, causal=False, mask=mask)))
                positions.append(queries.tokens)
        return torch.cat(outputs)[torch.argsort(torch.cat(positions))]

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


def length_groups(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Indices of the non-empty samples grouped by ``ceil(log2(length))``: padding a group to its longest
    sample costs less than 4x the group's own attention."""
    keys = torch.ceil(torch.log2(lengths.clamp(min=1).double())).long()
    return [torch.nonzero((keys == key) & (lengths > 0)).flatten() for key in torch.unique(keys[lengths > 0])]


class _Rows:
    """Rows ``x[start : start + length]`` of a packed ``[t, h, d]`` tensor as a right-padded ``[n, h, width, d]``
    batch and back (differentiable; ``tokens`` is the packed index of every valid entry, in batch order).

    Equal-length samples that lie back to back (a single sample, or rows packed from equal chunks) are a view
    of the packed tensor; otherwise the batch is built by index copies.
    """

    def __init__(self, starts: torch.Tensor, lengths: torch.Tensor, device: torch.device) -> None:
        self.n, self.width = len(lengths), int(lengths.max())
        offsets = torch.arange(self.width)
        valid = offsets < lengths[:, None]
        self.first = int(starts[0])
        self.view = bool(
            (lengths == self.width).all() and (starts == self.first + self.width * torch.arange(self.n)).all()
        )
        self.tokens = (starts[:, None] + offsets)[valid].to(device)
        self.slots = (torch.arange(self.n)[:, None] * self.width + offsets)[valid].to(device)  # ... in the batch

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.view:
            rows = x[self.first : self.first + self.n * self.width]
        else:
            rows = x.new_zeros((self.n * self.width, *x.shape[1:])).index_copy(0, self.slots, x[self.tokens])
        return rows.view(self.n, self.width, *x.shape[1:]).transpose(1, 2)

    def unpad(self, rows: torch.Tensor) -> torch.Tensor:
        """``[n, h, width, d]`` back to the valid entries, ``[len(tokens), h, d]``."""
        flat = rows.transpose(1, 2).reshape(self.n * self.width, rows.shape[1], rows.shape[3])
        return flat if self.view else flat[self.slots]


def _lower_right_causal(queries: torch.Tensor, keys: torch.Tensor, width: int, key_width: int) -> torch.Tensor:
    """``[n, 1, width, key_width]``: query a of row i sees key b when ``b <= a + keys_i - queries_i`` and
    ``b < keys_i`` (causal, aligned at the row's last key). Padded queries see every valid key, so no row of
    the softmax is empty; their outputs are dropped."""
    a = torch.arange(width)[None, :, None]
    b = torch.arange(key_width)[None, None, :]
    visible = (b <= a + (keys - queries)[:, None, None]) & (b < keys[:, None, None])
    return visible.unsqueeze(1)


def with_sdpa_attention(layer_spec: ModuleSpec) -> ModuleSpec:
    """The local layer spec with ``SDPACoreAttention`` in the core-attention slot."""
    layer = layer_spec.submodules
    attention = layer.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=SDPACoreAttention)
    )
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer, self_attention=attention))
