"""Causal attention with the blocked CPU backward against torch's own SDPA, in float64.

The reference is ``F.scaled_dot_product_attention`` (``is_causal``, GQA through
``enable_gqa``) differentiated by autograd: the flash kernel's own backward over
the whole triangle.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.utils._python_dispatch import TorchDispatchMode

from nemo_rl.models.megatron import causal_attention_cpu
from nemo_rl.models.megatron.attention import SDPACoreAttention

DIM = 8


def _qkv(batch: int, heads: int, groups: int, seq: int, dtype=torch.float64, seed: int = 0):
    """Views ``[b, h, s, d]`` of ``[s, b, h, d]`` tensors: the strides megatron's layout gives the module."""
    generator = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(seq, batch, h, DIM, generator=generator, dtype=dtype).requires_grad_()  # noqa: E731
    leaves = make(heads), make(groups), make(groups)
    return leaves, tuple(x.permute(1, 2, 0, 3) for x in leaves)


@pytest.mark.parametrize(
    ("seq", "heads", "groups", "windows"),
    [(512, 2, 2, 2), (1024, 4, 2, 4), (768, 2, 1, 2), (2048, 2, 1, 8), (1040, 1, 1, 4), (1000, 1, 1, 2)],
)
def test_gradients_equal_sdpa(seq, heads, groups, windows):
    assert causal_attention_cpu._windows(seq) == windows
    upstream = torch.randn(2, heads, seq, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    scale = 0.3
    reference, (q, k, v) = _qkv(2, heads, groups, seq)
    F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True).backward(upstream)
    blocked, (q, k, v) = _qkv(2, heads, groups, seq)
    assert causal_attention_cpu.applies(q)
    out = causal_attention_cpu.causal_attention(q, k, v, scale)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    assert torch.equal(out, expected)  # the same forward kernel
    out.backward(upstream)
    for mine, theirs in zip(blocked, reference):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=1e-12)


def test_float32_gradients_within_rounding_of_sdpa():
    reference, (q, k, v) = _qkv(1, 2, 1, 1024, torch.float32)
    upstream = torch.randn(1, 2, 1024, DIM, generator=torch.Generator().manual_seed(1))
    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(upstream)
    blocked, (q, k, v) = _qkv(1, 2, 1, 1024, torch.float32)
    causal_attention_cpu.causal_attention(q, k, v, DIM**-0.5).backward(upstream)
    for mine, theirs in zip(blocked, reference):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-5)


def _layout(memory: str, batch: int, heads: int, groups: int, seq: int):
    """Leaves and their ``[b, h, s, d]`` views, and an upstream gradient, as each caller lays them out in memory.

    ``sbhd``: megatron's, q its own ``[s, b, h, d]`` tensor, k and v slices of one fused ``[s, b, groups, ...]``
    projection (as megatron splits its QKV output), the output gradient ``[s, b, h, d]``. ``bshd``: the packed
    path's padded rows, ``[b, s, h, d]`` throughout.
    """
    generator = torch.Generator().manual_seed(2)
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    if memory == "sbhd":
        q, kv = randn(seq, batch, heads, DIM), randn(seq, batch, groups, 2 * DIM)
        leaves = (q.requires_grad_(), kv.requires_grad_())
        views = (q.permute(1, 2, 0, 3), kv[..., :DIM].permute(1, 2, 0, 3), kv[..., DIM:].permute(1, 2, 0, 3))
        return leaves, views, randn(seq, batch, heads, DIM).permute(1, 2, 0, 3)
    leaves = tuple(randn(batch, seq, h, DIM).requires_grad_() for h in (heads, groups, groups))
    return leaves, tuple(x.transpose(1, 2) for x in leaves), randn(batch, seq, heads, DIM).transpose(1, 2)


class _CopiedElements(TorchDispatchMode):
    """How many elements the aten ops run under it copy (``clone``, ``copy_``: what a reshape that cannot be a view
    and ``contiguous`` come down to)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default):
            self.elements += out.numel()
        return out


@pytest.mark.parametrize("memory", ["sbhd", "bshd"])
def test_backward_folds_the_blocks_as_views_of_each_layout(memory):
    """The blocks are views of the inputs' own memory, so the backward copies only the small log-sum-exp; its
    gradients equal SDPA's whether the windows fold into megatron's heads or into the packed rows."""
    batch, heads, groups, seq = 2, 4, 2, 1024  # 4 windows: the diagonal call and two halvings
    reference, views, upstream = _layout(memory, batch, heads, groups, seq)
    F.scaled_dot_product_attention(*views, is_causal=True, scale=0.3, enable_gqa=True).backward(upstream)
    blocked, views, upstream = _layout(memory, batch, heads, groups, seq)
    out = causal_attention_cpu.causal_attention(*views, 0.3)
    copies = _CopiedElements()
    with copies:
        out.backward(upstream)
    assert copies.elements <= 3 * batch * heads * seq  # the log-sum-exp (b x h x s) at most once per call
    for mine, theirs in zip(blocked, reference):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("seq", "dtype", "expected"),
    [
        (1024, torch.float32, True),
        (511, torch.float32, False),  # too short to halve into windows of 256
        (1023, torch.float64, False),  # odd: no whole halves
        (1024, torch.bfloat16, False),  # the kernel adds key/value gradients in float32, the blocks would not
        (1024, torch.float16, False),
    ],
)
def test_applies_only_where_the_blocks_are_whole_and_exact(seq, dtype, expected):
    assert causal_attention_cpu.applies(torch.empty(1, 1, seq, DIM, dtype=dtype)) is expected


def test_core_attention_uses_it_for_padded_and_packed_rows(monkeypatch):
    """Through megatron's slot: ``sbhd`` batches and packed rows long enough to split take the blocked backward."""
    calls = []
    real = causal_attention_cpu.causal_attention
    monkeypatch.setattr(causal_attention_cpu, "causal_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    config = TransformerConfig(
        num_layers=1,
        hidden_size=4 * DIM,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=DIM,
        attention_dropout=0.0,
    )
    attention = SDPACoreAttention(config, layer_number=1, attn_mask_type=None, attention_type="self")
    lengths = [520, 300, 600]
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), h, DIM, generator=generator, dtype=torch.float64) for h in (4, 2, 2))
    for x in (q, k, v):
        x.requires_grad_()
    attention(q, k, v, None, packed_seq_params=packed).sum().backward()
    mine = [x.grad for x in (q, k, v)]
    reference = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    start = 0
    for length in lengths:  # each sample on its own, causal, heads repeated for GQA
        qs, ks, vs = (x[start : start + length].transpose(0, 1) for x in reference)
        ks, vs = (x.repeat_interleave(2, dim=0) for x in (ks, vs))
        F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).sum().backward()
        start += length
    assert calls == [torch.Size([2, 4, 600, DIM])]  # 520 and 600; 300 (a halving below 600) is too short to split
    for a, b in zip(mine, reference):
        torch.testing.assert_close(a, b.grad, rtol=0, atol=1e-12)
    attention(*(x.detach().unsqueeze(1) for x in (q, k, v)), None)  # sbhd [s, b, h, d], one row of 1420 tokens
    assert calls[-1] == torch.Size([1, 4, 1420, DIM])
