"""The rotary node against megatron-core's own rotation, which it replaces (forward and backward, float64)."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer import TransformerConfig

from nemo_rl.models.megatron import rotary


def _freqs(seq: int, dim: int) -> torch.Tensor:
    """megatron's layout: ``[s, 1, 1, d]``, the half-dimension angles repeated for the second half."""
    half = torch.outer(torch.arange(seq, dtype=torch.float64), 0.9 ** torch.arange(dim // 2, dtype=torch.float64))
    return torch.cat([half, half], dim=-1)[:, None, None, :]


def _both(fn, t: torch.Tensor, upstream: torch.Tensor):
    leaf = t.detach().requires_grad_()
    out = fn(leaf)
    (grad,) = torch.autograd.grad(out, leaf, upstream)
    return out, grad


@pytest.mark.parametrize(
    ("head_dim", "rot_dim", "mscale"), [(8, 8, 1.0), (8, 8, 1.23), (12, 8, 1.1)], ids=["full", "yarn-mscale", "partial"]
)
def test_rotation_and_its_gradient_equal_megatrons(head_dim, rot_dim, mscale):
    torch.manual_seed(0)
    freqs = _freqs(6, rot_dim)
    # As megatron hands it over: a strided view of the fused QKV projection's output, [s, b, heads, d].
    qkv = torch.randn(6, 2, 3, 3 * head_dim, dtype=torch.float64)
    query = qkv[..., :head_dim]
    upstream = torch.randn(6, 2, 3, head_dim, dtype=torch.float64)

    got = _both(lambda t: rotary.apply_rotary_pos_emb_bshd(t, freqs, mscale=mscale), query, upstream)
    want = _both(lambda t: rotary._MEGATRONS(t, freqs, mscale=mscale), query, upstream)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-14)
    assert got[0].is_contiguous()


def test_rotation_gradient_is_the_derivative():
    t = torch.randn(4, 1, 2, 10, dtype=torch.float64, requires_grad=True)
    freqs = _freqs(4, 8)
    assert torch.autograd.gradcheck(lambda x: rotary._Rotation.apply(x, freqs, 1.1), (t,))


def test_interleaved_rotation_is_megatrons_own():
    t = torch.randn(4, 1, 2, 8, dtype=torch.float64)
    freqs = _freqs(4, 8)
    got = rotary.apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=True)
    assert got.grad_fn is None
    torch.testing.assert_close(got, rotary._MEGATRONS(t, freqs, True), rtol=0, atol=0)


def test_megatrons_dispatch_reaches_the_node_for_padded_and_packed_batches(megatron_single_process, monkeypatch):
    """``install`` (done by ``build_gpt_model``) makes megatron's ``apply_rotary_pos_emb`` use the node, on padded
    (``bshd``) and packed (``thd``) batches, with the results of megatron's own rotation."""
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True)
    freqs = _freqs(7, 8)
    padded = torch.randn(7, 2, 1, 8, dtype=torch.float64, requires_grad=True)
    packed = torch.randn(7, 1, 8, dtype=torch.float64, requires_grad=True)  # thd: two sequences of 3 and 4 tokens
    cu_seqlens = torch.tensor([0, 3, 7], dtype=torch.int32)

    def rotated():
        return (
            rope_utils.apply_rotary_pos_emb(padded, freqs, config, mscale=1.2),
            rope_utils.apply_rotary_pos_emb(packed, freqs, config, cu_seqlens=cu_seqlens, mscale=1.2),
        )

    monkeypatch.setattr(rope_utils, "_apply_rotary_pos_emb_bshd", rotary._MEGATRONS)
    want = rotated()
    rotary.install()
    got = rotated()
    assert all(_uses_node(out) for out in got)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-14)


def _uses_node(out: torch.Tensor) -> bool:
    """Whether the node is among the autograd graph's nodes behind ``out``."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "_RotationBackward":
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False
