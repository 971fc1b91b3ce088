"""Causal self-attention on CPU whose backward skips the work torch's flash kernel wastes above the diagonal.

torch's CPU flash-attention kernel walks the queries in blocks of 256 and the
keys in blocks of 512 (at sequences of 768 and more; 64 and 512 below) and,
under ``is_causal``, stops at the block holding the diagonal but still computes
that whole block. At 1024 tokens its causal pass costs 0.82 of a full
(non-causal) one instead of about half, and a causal 256-token window costs as
much as a full one.

The forward here is that kernel, unchanged (the op ``F.scaled_dot_product_attention``
runs on CPU), and it keeps the output and the row log-sum-exp. The backward
splits the causal triangle by halving: the diagonal windows of at least
``MIN_LEAF`` tokens (one causal call with the windows folded into the batch),
then at each halving the second half of every window against its first half,
which is a full, unmasked block (one call per level). Flash attention's backward for a block of
keys needs only the final output and log-sum-exp of its queries, not that
block's own, so the blocks' gradients simply add up to the whole one's.
Measured on two CPU cores (``tests/unit/test_causal_attention_cpu.py`` checks the
gradients against SDPA's in float64): the backward of one layer at 4 x 1024
tokens took 25.6 against 30.3 ms for the tiny model's heads (2 query heads,
1 key/value head, d = 64) and 112 against 115 ms for the 20M one's (8 and 2);
at 1 x 4096 tokens 91 against 101 ms and 333 against 351 ms.

Only float32 and float64 take this path: in lower precision the blocks' key and
value gradients would be added in that precision, where the kernel adds in float32.
"""

from __future__ import annotations

import torch

_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

MIN_LEAF = 256  # the smallest diagonal window: smaller ones run the kernel at too low a rate to gain


def applies(q: torch.Tensor) -> bool:
    """Whether ``causal_attention(q, ...)`` has a blocked backward for this query (CPU, float32/64, splittable)."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and _windows(q.shape[2]) > 1


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``[b, h, s, d]`` causal attention (``k``, ``v`` may have fewer heads: grouped-query) with the blocked backward."""
    return _CausalAttention.apply(q, k, v, scale)


def _windows(seq_len: int) -> int:
    """How many diagonal windows: the most halvings of ``seq_len`` that stay whole and at least ``MIN_LEAF`` long."""
    windows = 1
    while seq_len % (2 * windows) == 0 and seq_len // (2 * windows) >= MIN_LEAF:
        windows *= 2
    return windows


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out, logsumexp = _FORWARD(q, k, v, is_causal=True, scale=scale)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):
        (grad,) = grad_outputs
        q, k, v, out, logsumexp = ctx.saved_tensors
        scale = ctx.scale
        n = _windows(q.shape[2])
        # the diagonal windows, causal within themselves
        grads = _BACKWARD(*(_split(x, n) for x in (grad, q, k, v, out, logsumexp)), 0.0, True, scale=scale)
        dq, dk, dv = (_merge(x, n) for x in grads)
        # each halving: the second half of every window of 2 * size tokens against its first half, unmasked
        halves = n // 2
        while halves >= 1:
            queries = (_half(x, halves, 1) for x in (grad, q))
            keys = (_half(x, halves, 0) for x in (k, v))
            rows = (_half(x, halves, 1) for x in (out, logsumexp))
            gq, gk, gv = _BACKWARD(*queries, *keys, *rows, 0.0, False, scale=scale)
            _add_half(dq, gq, halves, 1)
            _add_half(dk, gk, halves, 0)
            _add_half(dv, gv, halves, 0)
            halves //= 2
        return dq, dk, dv, None


def _split(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[b, h, s, ...]`` -> ``[b * n, h, s / n, ...]``: the ``n`` consecutive windows folded into the batch."""
    return x.unflatten(2, (n, x.shape[2] // n)).transpose(1, 2).flatten(0, 1)


def _merge(x: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of ``_split``, as a new contiguous ``[b, h, s, ...]`` tensor."""
    return x.unflatten(0, (-1, n)).transpose(1, 2).flatten(2, 3).contiguous()


def _half(x: torch.Tensor, windows: int, which: int) -> torch.Tensor:
    """``[b, h, s, ...]`` -> ``[b * windows, h, s / (2 windows), ...]``: the first (0) or second (1) half of each window."""
    return x.unflatten(2, (windows, 2, x.shape[2] // (2 * windows)))[:, :, :, which].transpose(1, 2).flatten(0, 1)


def _add_half(total: torch.Tensor, part: torch.Tensor, windows: int, which: int) -> None:
    """Add ``part`` (laid out as ``_half`` returns) into that half of each window of ``total``, in place."""
    target = total.unflatten(2, (windows, 2, total.shape[2] // (2 * windows)))[:, :, :, which]
    target.add_(part.unflatten(0, (-1, windows)).transpose(1, 2))
