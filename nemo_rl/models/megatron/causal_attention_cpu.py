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
``MIN_LEAF`` tokens (one causal call with the windows as the batch), then at
each halving the second half of every window against its first half, which is
a full, unmasked block (one call per level). Flash attention's backward for a
block of keys needs only the final output and log-sum-exp of its queries, not
that block's own, so the blocks' gradients simply add up to the whole one's.

The forward split the same way, its blocks' outputs merged by their
log-sum-exps, was exact but no faster: one layer at 4 x 1024 took 10.4 to 11.7
ms unsplit against 11.3 to 12.3 ms split (tiny heads), 41.5 to 42.1 against
41.1 to 44.5 ms (20M heads). Below 768 queries the kernel walks 64-query
blocks at a lower rate (20M heads: a 512 x 512 block took 20.6 ms, where a
quarter of the full 1024-token pass is 14.2 ms), and a diagonal window of 512
tokens or fewer costs as much causal as full.

The blocks are views of the inputs' own memory (``_Fold``), and so are the
gradients: over megatron's ``[s, b, h, d]`` the windows become the batch with
rows and heads merged as the heads; over the packed path's ``[b, s, h, d]`` they
fold into the rows. Only the small log-sum-exp is copied. Folding the windows into
the rows everywhere, as this module first did, copied q, k, v, the output and
its gradient for every call in megatron's layout, and returned gradients that
megatron's next op copied again.

Measured on two CPU cores (``tests/unit/test_causal_attention_cpu.py`` checks the
gradients against SDPA's in float64). Each figure is one layer's backward,
including the copy megatron's next op makes of the gradients:

    shape      heads (query/kv)    SDPA      rows-folded   this
    4 x 1024   2/1 (tiny)          26.2 ms     25.8 ms    23.2 ms
    4 x 1024   8/2 (20M)          105.5 ms     99.1 ms    92.7 ms
    1 x 4096   2/1                135.9 ms    108.8 ms   105.4 ms
    1 x 4096   8/2                336.4 ms    336.9 ms   325.8 ms

On one core, at 4 x 1024: 51.5 against 43.1 ms (tiny heads) and 206.2 against
170.5 ms (20M heads).

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
        fold = _Fold(q)
        # the diagonal windows, causal within themselves
        windows = (fold(x.unflatten(2, (n, -1))) for x in (grad, q, k, v, out, logsumexp))
        dq, dk, dv = (fold.undo(x).flatten(2, 3) for x in _BACKWARD(*windows, 0.0, True, scale=scale))
        # each halving: the second half of every window of 2 * size tokens against its first half, unmasked
        halves = n // 2
        while halves >= 1:
            queries = (fold(_half(x, halves, 1)) for x in (grad, q))
            keys = (fold(_half(x, halves, 0)) for x in (k, v))
            rows = (fold(_half(x, halves, 1)) for x in (out, logsumexp))
            gq, gk, gv = _BACKWARD(*queries, *keys, *rows, 0.0, False, scale=scale)
            _half(dq, halves, 1).add_(fold.undo(gq))
            _half(dk, halves, 0).add_(fold.undo(gk))
            _half(dv, halves, 0).add_(fold.undo(gv))
            halves //= 2
        return dq, dk, dv, None


def _half(x: torch.Tensor, windows: int, which: int) -> torch.Tensor:
    """``[b, h, s, ...]`` -> ``[b, h, windows, s / (2 windows), ...]``: the first (0) or second (1) half of each window."""
    return x.unflatten(2, (windows, 2, -1)).select(3, which)


class _Fold:
    """``[b, h, n, w, ...]`` (``n`` blocks of ``w`` tokens) <-> the kernel's ``[batch, heads, w, ...]``, as a view.

    The blocks become the batch with rows and heads merged as the heads where the query's memory allows it
    (megatron's ``[s, b, h, d]``, whose layout the kernel's outputs follow), else they fold into the rows (the packed
    path's ``[b, s, h, d]``). Either way a query head still maps to its key/value head, and whichever the inputs'
    memory takes is a view rather than a copy.
    """

    def __init__(self, q: torch.Tensor) -> None:
        self.rows = q.shape[0]
        self.heads_merge = q.stride(0) == q.shape[1] * q.stride(1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.movedim(2, 0).flatten(1, 2) if self.heads_merge else x.movedim(2, 1).flatten(0, 1)

    def undo(self, x: torch.Tensor) -> torch.Tensor:
        if self.heads_merge:
            return x.unflatten(1, (self.rows, -1)).movedim(0, 2)
        return x.unflatten(0, (self.rows, -1)).movedim(1, 2)
