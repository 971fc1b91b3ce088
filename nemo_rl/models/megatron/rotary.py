"""megatron-core's rotary embedding of queries and keys, applied as one autograd node.

megatron-core (without Transformer Engine's fused RoPE, which this project
turns off: see ``model_builder``) rotates every layer's query and key as an
expression: ``t * cos + rotate_half(t) * sin``, ``rotate_half`` a
concatenation of the negated second half with the first, then one more
concatenation with the dimensions past the rotary ones (none unless the
rotation is partial). That is six elementwise passes over the tensor forward
(two products, a negation, a sum, two concatenations), and autograd's as
many backward.

Here the rotation is written half by half into one output, ``mul`` then
``addcmul_`` for each half, and the backward applies the inverse rotation
the same way; the node saves only ``cos`` and ``sin`` (``[s, 1, 1, d]``).
What rotates by how much is megatron's: the frequencies it passes (from the
config's RoPE fields, YaRN's among them: ``nemo_rl.rope``), its ``mscale``
(YaRN's attention factor) on ``cos`` and ``sin``, and the same first
``freqs.shape[-1]`` dimensions. Interleaved and multi-latent layouts go to
megatron's own function. Equal to it in float64, forward and backward
(``tests/unit/test_megatron_rotary.py``). The query and key of one layer,
forward and backward, at 4 x 1024 tokens on two CPU cores: 2.41 -> 1.83 ms
with the tiny model's heads (2 query, 1 key-value, 64 dimensions), 11.07 ->
7.09 ms with the 20M one's (8 and 2).

megatron applies the bshd function per sequence on packed (``thd``) batches
too, so replacing it serves both; ``install`` does that once per process.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils

_MEGATRONS = rope_utils._apply_rotary_pos_emb_bshd


class _Rotation(torch.autograd.Function):
    """The first ``d = 2h`` dimensions of ``t`` rotated: ``[t1 c1 - t2 s1, t2 c2 + t1 s2]``; the rest copied."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, freqs: torch.Tensor, mscale: float) -> torch.Tensor:
        cos = (torch.cos(freqs) * mscale).to(t.dtype)
        sin = (torch.sin(freqs) * mscale).to(t.dtype)
        ctx.save_for_backward(cos, sin)
        return _rotate(t, cos, sin, sign=1)

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_outputs[0], cos, sin, sign=-1), None, None


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int) -> torch.Tensor:
    """``sign=1``: the forward rotation; ``-1``: its transpose, by which the gradient goes back."""
    d = cos.shape[-1]
    h = d // 2
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    t1, t2 = t[..., :h], t[..., h:d]
    # The transpose pairs each half's cosine with the other half's sine.
    sin1, sin2 = (sin[..., :h], sin[..., h:]) if sign == 1 else (sin[..., h:], sin[..., :h])
    torch.mul(t1, cos[..., :h], out=out[..., :h]).addcmul_(t2, sin1, value=-sign)
    torch.mul(t2, cos[..., h:], out=out[..., h:d]).addcmul_(t1, sin2, value=sign)
    if d < t.shape[-1]:
        out[..., d:] = t[..., d:]
    return out


def apply_rotary_pos_emb_bshd(
    t: torch.Tensor,
    freqs: torch.Tensor,
    rotary_interleaved: bool = False,
    multi_latent_attention: bool = False,
    mscale: float = 1.0,
) -> torch.Tensor:
    """megatron-core's ``_apply_rotary_pos_emb_bshd``, its signature and result."""
    if rotary_interleaved or multi_latent_attention or freqs.shape[-1] % 2:
        return _MEGATRONS(t, freqs, rotary_interleaved, multi_latent_attention, mscale)
    return _Rotation.apply(t, freqs, mscale)


def install() -> None:
    """Make megatron-core's rotary embedding this node, for every model in the process."""
    rope_utils._apply_rotary_pos_emb_bshd = apply_rotary_pos_emb_bshd
