"""Packed attention (one SDPA call per length group) equals each sample attended on its own.

The reference here is the obvious one, written independently of the module:
every sample of the packed row through causal ``scaled_dot_product_attention``
by itself, GQA by repeating key/value heads. Forward outputs and the gradients
of q, k and v must match.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_rl.models.megatron.attention import SDPACoreAttention, length_groups

HEADS, GROUPS, HEAD_DIM = 8, 2, 16
# Uneven lengths: singletons, a long one among short ones, and lengths in several power-of-two groups.
LENGTHS = [1, 7, 64, 3, 1, 200, 33, 32, 2, 90]


def _attention(dtype: torch.dtype) -> SDPACoreAttention:
    config = TransformerConfig(
        num_layers=1,
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        kv_channels=HEAD_DIM,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
    )
    return SDPACoreAttention(config, layer_number=1, attn_mask_type=None, attention_type="self", attention_dropout=0.0)


def _reference(q, k, v, lengths) -> torch.Tensor:
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (x[start : start + n].transpose(0, 1) for x in (q, k, v))  # [h, n, d]
        ks, vs = (x.repeat_interleave(HEADS // GROUPS, dim=0) for x in (ks, vs))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
        start += n
    return torch.cat(out).reshape(sum(lengths), -1)


def _inputs(dtype: torch.dtype, lengths: list[int]):
    torch.manual_seed(0)
    total = sum(lengths)
    q = torch.randn(total, HEADS, HEAD_DIM, dtype=dtype, requires_grad=True)
    k = torch.randn(total, GROUPS, HEAD_DIM, dtype=dtype, requires_grad=True)
    v = torch.randn(total, GROUPS, HEAD_DIM, dtype=dtype, requires_grad=True)
    return q, k, v


# bf16: a different summation order may round one entry of magnitude ~4 by one ulp (2**-5).
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 4e-2)])
# Uneven lengths (with an empty trailing padding entry), and equal back-to-back samples (a view, no copies).
@pytest.mark.parametrize("lengths", [LENGTHS + [0], [16] * 8], ids=["uneven", "equal"])
def test_packed_attention_matches_each_sample_alone(dtype, tol, lengths):
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=200, max_seqlen_kv=200)
    q, k, v = _inputs(dtype, lengths)
    grad = torch.randn(sum(lengths), HEADS * HEAD_DIM, dtype=dtype)

    got = _attention(dtype)(q, k, v, None, packed_seq_params=params)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want = _reference(q, k, v, lengths)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)

    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    for name, g, w in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=lambda m, name=name: f"d{name}: {m}")


def test_length_groups_cover_every_non_empty_sample_once_within_a_factor_of_two():
    lengths = torch.tensor(LENGTHS + [0, 4096, 4095])
    groups = length_groups(lengths)
    seen = torch.cat(groups).sort().values
    assert seen.tolist() == [i for i, n in enumerate(lengths.tolist()) if n > 0]
    for group in groups:
        longest, shortest = lengths[group].max(), lengths[group].min()
        assert longest <= max(2 * shortest, 1)
    assert len(groups) <= 13  # one call per power of two up to 4096
