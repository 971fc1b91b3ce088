"""Packed attention: one SDPA call per length group versus one call per sample.

    uv run benchmarks/packed_attention.py [--out DIR] [--repeats 5] [--device cpu|cuda]

Why: sequence packing puts many short samples in one row, and attention must
stay inside each sample. ``SDPACoreAttention`` used to call SDPA once per sample
from a Python loop, so a row of 64 short samples paid 64 kernel launches and
their Python overhead in both passes. It now gathers samples of similar length
(within 2x) into one right-padded batch and makes one causal call per group.
This times forward + backward of both on the same packed rows (the old loop is
re-stated here, as the "before", and checked to give the same output), for
many short samples, a few medium ones, one long one, and very uneven lengths.
Writes ``results.json`` and ``packed_attention.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HEADS, GROUPS, HEAD_DIM = 8, 2, 64  # a small model's attention: 8 query heads, GQA with 2 key/value heads
TOTAL = 4096


def shapes() -> dict[str, list[int]]:
    rng = random.Random(0)
    uneven = [1000]  # one long document among short ones: the case padding to the longest would make costly
    while sum(uneven) < TOTAL - 300:
        uneven.append(rng.choice((3, 8, 16, 40, 100, 300)))
    uneven.append(TOTAL - sum(uneven))
    return {
        "64 x 64": [64] * 64,
        "256 x 16": [16] * 256,
        "8 x 512": [512] * 8,
        "1 x 4096": [TOTAL],
        f"uneven ({len(uneven)} samples)": uneven,
    }


def per_sample_loop(q, k, v, lengths: list[int]) -> torch.Tensor:
    """The previous implementation: one causal SDPA call per sample (GQA by repeating key/value heads)."""
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (x[start : start + n].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        ks, vs = (x.repeat_interleave(HEADS // GROUPS, dim=1) for x in (ks, vs))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).squeeze(0).transpose(0, 1))
        start += n
    return torch.cat(out).reshape(start, -1)


def grouped(attention, lengths: list[int]):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    return lambda q, k, v, _: attention(q, k, v, None, packed_seq_params=params)


def seconds(fn, q, k, v, lengths, repeats: int, device: torch.device) -> float:
    """Median seconds of forward + backward."""
    times = []
    for i in range(repeats + 1):  # the first run warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(q, k, v, lengths)
        out.backward(torch.ones_like(out))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
        q.grad = k.grad = v.grad = None
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/packed_attention"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nemo_rl.models.megatron.attention import SDPACoreAttention, length_groups

    device = torch.device(args.device)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        attention_dropout=0.0,
    )
    attention = SDPACoreAttention(config, layer_number=1, attn_mask_type=None, attention_type="self")
    rows = []
    for name, lengths in shapes().items():
        torch.manual_seed(0)
        q = torch.randn(TOTAL, HEADS, HEAD_DIM, device=device, requires_grad=True)
        k, v = (torch.randn(TOTAL, GROUPS, HEAD_DIM, device=device, requires_grad=True) for _ in range(2))
        new = grouped(attention, lengths)
        with torch.no_grad():
            error = (new(q, k, v, lengths) - per_sample_loop(q, k, v, lengths)).abs().max().item()
        before = seconds(per_sample_loop, q, k, v, lengths, args.repeats, device)
        after = seconds(new, q, k, v, lengths, args.repeats, device)
        calls = len(length_groups(torch.tensor(lengths)))
        rows.append(
            {
                "shape": name,
                "samples": len(lengths),
                "sdpa_calls_after": calls,
                "before_s": before,
                "after_s": after,
                "speedup": before / after,
                "max_abs_difference": error,
            }
        )
    header = f"{'packed row (4096 tokens)':<24} {'samples':>7} {'calls':>5} {'before s':>9} {'after s':>9} {'speedup':>7} {'max |diff|':>10}"
    print(header)
    for r in rows:
        print(
            f"{r['shape']:<24} {r['samples']:>7} {r['sdpa_calls_after']:>5} {r['before_s']:>9.4f} {r['after_s']:>9.4f} "
            f"{r['speedup']:>6.2f}x {r['max_abs_difference']:>10.2e}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": str(device),
        "heads": HEADS,
        "kv_heads": GROUPS,
        "head_dim": HEAD_DIM,
        "threads": torch.get_num_threads(),
    }
    (args.out / "results.json").write_text(json.dumps({"config": meta, "rows": rows}, indent=2))
    _plot(rows, args.out / "packed_attention.png")
    print(f"wrote {args.out / 'results.json'}")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["before_s"] * 1e3 for r in rows], 0.4, label="one call per sample (before)")
    ax.bar([i + 0.2 for i in x], [r["after_s"] * 1e3 for r in rows], 0.4, label="one call per length group")
    ax.set_xticks(list(x), [r["shape"] for r in rows], rotation=15)
    ax.set_ylabel("forward + backward, ms")
    ax.set_title("Packed attention over one 4096-token row")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
