"""Core attention for megatron-core's local layer spec: SDPA kernels, packed sequences, context parallelism.

megatron-core's own local ``DotProductAttention`` materialises the L x L score
matrix and refuses both packed (``thd``) sequences and context parallelism;
those live in Transformer Engine, which CPU machines cannot install. This
module fills the same slot in the layer spec with torch's
``scaled_dot_product_attention``:

- one batch of right-padded rows (``sbhd``): causal SDPA, which dispatches to
  flash / memory-efficient kernels and never builds an L x L mask;
- packed rows (``thd`` with ``cu_seqlens``): each sample attends only within
  itself, without a Python loop over the samples. Index ops gather them into a
  right-padded batch ``[n, heads, width, d]``, one causal SDPA call attends it
  (causal attention never lets a valid query see its row's right padding, so no
  mask is built) and the valid queries' outputs are scattered back. Samples are
  batched with those of similar length (longer than half the batch's longest),
  so padding at most doubles a batch's tokens (and its causal work at most
  quadruples): a row of equal lengths is one call, a row of very uneven ones one
  call per halving of the length present (``benchmarks/packed_attention.py``
  times it against the loop). Tried on torch 2.13 and rejected: ``flex_attention``
  has no backward on CPU and no dropout, nested (jagged) tensors have no causal
  CPU kernel, a block-diagonal mask is L x L, and ``torch.nn.attention.varlen``
  (CUDA flash only) hard-codes dropout to 0;
- context parallelism (packed rows only, as in megatron-core): each CP rank holds,
  per sample, chunks ``r`` and ``2 CP - 1 - r`` of ``2 CP`` equal chunks (the
  load-balanced split megatron's RoPE expects); keys and values are all-gathered
  over the CP group, and each local query chunk attends causally to the prefix
  of its sample that ends with it. The chunks are batched the same way (one SDPA
  call per chunk slot, early or late, and length band): queries against their
  right-padded prefixes, with a ``[n, 1, chunk, prefix]`` mask putting each row's
  causal diagonal at its last key. That mask is as large as the scores it masks;
  SDPA on CPU built the same per chunk before (a lower-right causal mask of
  unequal lengths has no CPU kernel), while CUDA kernels aligned it themselves.

GQA: SDPA's ``enable_gqa`` on CPU, repeated key/value heads on CUDA; dropout
(training only) draws from megatron's model-parallel RNG stream. Unmasked causal
calls on CPU without dropout run torch's flash kernel with a backward that skips
the blocks it wastes above the diagonal (``causal_attention_cpu``).
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

from nemo_rl.models.megatron import causal_attention_cpu
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
            out = self._sdpa(q, k, v)
            return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)
        # sample bounds are bookkept on the host (one copy, as before); index tensors go to the device
        cu_seqlens = packed_seq_params.cu_seqlens_q.to("cpu", torch.long)
        if self.config.context_parallel_size > 1:
            out = self._context_parallel(query, key, value, cu_seqlens)
        else:
            out = self._packed(query, key, value, cu_seqlens)
        return out.reshape(out.shape[0], -1)

    def _packed(self, query, key, value, cu_seqlens) -> torch.Tensor:
        """Packed ``[t, h, d]`` samples, each attending causally within itself: one SDPA call per length group."""
        starts, lengths = cu_seqlens[:-1], cu_seqlens.diff()
        out = query.new_zeros(query.shape)
        for rows in _length_groups(lengths):
            batch = _PaddedRows(starts[rows], lengths[rows], query.device)
            q, k, v = (batch.gather(x) for x in (query, key, value))
            out = out.index_copy(0, batch.tokens, batch.scatter(self._sdpa(q, k, v)))
        return out

    def _context_parallel(self, query, key, value, cu_seqlens) -> torch.Tensor:
        """This rank's query chunks (per sample: chunk ``rank``, then ``2 CP - 1 - rank``) against their prefixes."""
        group = parallel_state.get_context_parallel_group()
        cp, rank = group.size(), group.rank()
        keys, values = (all_gather_with_grad(x, group) for x in (key, value))
        full_key = torch.empty((int(cu_seqlens[-1]), *key.shape[1:]), dtype=key.dtype, device=key.device)
        full_value = torch.empty_like(full_key)
        for r in range(cp):  # scatter each rank's chunks back to their places in the packed sequence
            index = cp_token_indices(cu_seqlens, cp, r).to(key.device)
            full_key = full_key.index_copy(0, index, keys[r])
            full_value = full_value.index_copy(0, index, values[r])
        chunks = cu_seqlens.diff() // (2 * cp)
        local_starts = 2 * (chunks.cumsum(0) - chunks)  # where each sample's two chunks begin on this rank
        out = query.new_zeros(query.shape)
        for rows in _length_groups(chunks):
            chunk = chunks[rows]
            for late, j in enumerate((rank, 2 * cp - 1 - rank)):  # the early, then the late chunk of each sample
                queries = _PaddedRows(local_starts[rows] + late * chunk, chunk, query.device)
                prefixes = _PaddedRows(cu_seqlens[rows], (j + 1) * chunk, query.device)
                q, k, v = queries.gather(query), prefixes.gather(full_key), prefixes.gather(full_value)
                # query a of a row sees key b <= a + j * chunk: causal, aligned at the row's last key
                seen = j * chunk[:, None, None] + torch.arange(queries.width)[:, None]
                mask = (torch.arange(prefixes.width) <= seen).unsqueeze(1).to(query.device)
                out = out.index_copy(0, queries.tokens, queries.scatter(self._sdpa(q, k, v, mask)))
        return out

    def _sdpa(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[n, h, s, d]`` attention: causal, or as ``mask`` allows."""
        # GQA: each key/value head serves a group of query heads. CPU's flash kernel reads the groups in place;
        # CUDA's memory-efficient kernel (fp32, masks) has no GQA, so there the heads are repeated.
        grouped = self.heads_per_group > 1 and q.device.type == "cpu"
        if self.heads_per_group > 1 and not grouped:
            k = k.repeat_interleave(self.heads_per_group, dim=1)
            v = v.repeat_interleave(self.heads_per_group, dim=1)
        kwargs = dict(attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale, enable_gqa=grouped)
        if not (self.training and self.dropout):
            if mask is None and causal_attention_cpu.applies(q):
                return causal_attention_cpu.causal_attention(q, k, v, self.softmax_scale)
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
        # TP ranks hold different heads, so they draw dropout from the model-parallel RNG stream.
        with get_cuda_rng_tracker().fork():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout, **kwargs)


def _length_groups(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Indices of the non-empty samples, grouped by how many halvings below the longest they are.

    Every sample of a group is longer than half the group's longest, so padding
    the group to its longest at most doubles its tokens; equal lengths are one group.
    """
    longest = int(lengths.max()) if lengths.numel() else 0
    if longest == 0:
        return []
    band = torch.floor(torch.log2(longest / lengths.clamp(min=1).double())).long()
    band = torch.where(lengths > 0, band, -1)
    return [torch.nonzero(band == b).flatten() for b in torch.unique(band).tolist() if b >= 0]


class _PaddedRows:
    """Rows ``x[start : start + length]`` of a packed ``[t, ...]`` tensor as a right-padded batch, and back.

    The padding repeats each row's last token rather than zeros: one gather, and
    harmless, since causal attention keeps it from the row's valid queries and
    the padded queries' outputs are dropped (so their gradients are zero).
    """

    def __init__(self, starts: torch.Tensor, lengths: torch.Tensor, device: torch.device) -> None:
        """``starts`` and ``lengths``: host tensors, one entry per row."""
        self.rows, self.width = lengths.numel(), int(lengths.max())
        within = torch.arange(self.width)
        padded = torch.nonzero((within < lengths[:, None]).flatten()).flatten()
        self.padded = padded.to(device)  # each valid entry's index in the flattened [rows * width] batch
        self.tokens = (starts[:, None] + within).flatten()[padded].to(device)  # and its packed index
        last = torch.minimum(within, lengths[:, None] - 1)
        self.source = (starts[:, None] + last).flatten().to(device)  # every entry's packed source

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[t, h, d]`` -> ``[rows, h, width, d]``."""
        return x.index_select(0, self.source).view(self.rows, self.width, *x.shape[1:]).transpose(1, 2)

    def scatter(self, batch: torch.Tensor) -> torch.Tensor:
        """``[rows, h, width, d]`` -> the valid entries as ``[len(tokens), h, d]``, in ``tokens`` order."""
        rows, heads, width, dim = batch.shape
        return batch.transpose(1, 2).reshape(rows * width, heads, dim).index_select(0, self.padded)


def with_sdpa_attention(layer_spec: ModuleSpec) -> ModuleSpec:
    """The local layer spec with ``SDPACoreAttention`` in the core-attention slot."""
    layer = layer_spec.submodules
    attention = layer.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=SDPACoreAttention)
    )
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer, self_attention=attention))
