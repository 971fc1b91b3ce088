"""Packed attention, before / after: one SDPA call per sample vs one per length band.

    uv run benchmarks/packed_attention.py [--out results/packed_attention] [--dtype float32 bfloat16] [--repeats 5]
        [--threads N] [--cases NAME ...]

``SDPACoreAttention`` (``nemo_rl/models/megatron/attention.py``) attends the
samples of a packed row (``thd`` with ``cu_seqlens``) each causally within
itself. It used to run one ``scaled_dot_product_attention`` per sample in a
Python loop (and per sample and chunk under context parallelism); it now
gathers samples of similar length into a right-padded batch and makes one
causal SDPA call per such group. The old loops are kept here, and only here,
as the "before" reference (``before_packed``, ``before_context_parallel``).

Each case is one packed row of 4096 tokens with 8 query heads, 4 key/value
heads (GQA 2) and head dim 64, like a small model; timed is forward plus
backward (training runs both) of the module's core attention alone. The
context-parallel cases time one rank's attention (rank 0 of CP = 2: its two
chunks of every sample against the gathered prefixes), the group's all-gather
replaced by the ranks' shares in this process; "after" includes putting the
gathered keys and values back in place, "before" starts from them in place.
Before and after alternate; reported is the fastest of ``--repeats`` runs, in
wall time and in this process's CPU time (the steadier figure on a machine
shared with other work), and the largest difference between the two outputs
and gradients, relative to the tensor's largest entry. Prints a table and
writes ``results.json`` (every run's times too) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.nn.attention.bias import causal_lower_right

from nemo_rl.models.megatron import attention as attention_module
from nemo_rl.models.megatron.attention import SDPACoreAttention
from nemo_rl.models.megatron.context_parallel import cp_token_indices

HEADS, GROUPS, DIM, ROW = 8, 4, 64, 4096


def uneven_lengths(multiple: int = 1) -> list[int]:
    """Very uneven: one long sample, a few medium, many short ones, 4096 tokens in all; lengths a ``multiple``.

    With ``multiple`` 1, several samples of 1 token; CP = 2 needs multiples of 4, as packing pads them.
    """
    lengths = [1536, 768, 384, 192, 96, 1, 1, 1, 1]
    lengths += torch.randint(2, 48, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    lengths = [multiple * max(1, round(n / multiple)) for n in lengths]
    lengths.append(ROW - sum(lengths))
    assert lengths[-1] > 0 and lengths[-1] % multiple == 0
    return lengths


CASES = {  # name: (sample lengths, context parallel size)
    "64 x 64": ([64] * 64, 1),
    "8 x 512": ([512] * 8, 1),
    "1 x 4096": ([4096], 1),
    "uneven (50 samples)": (uneven_lengths(), 1),
    "cp2, 64 x 64": ([64] * 64, 2),
    "cp2, 8 x 512": ([512] * 8, 2),
    "cp2, uneven (50 samples)": (uneven_lengths(4), 2),
}


# ----- before: the per-sample loops this module ran until it batched samples (reference only) -----


def _before_segment(module, q, k, v, lower_right):
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, h, t, d]
    if module.heads_per_group > 1:
        k, v = (x.repeat_interleave(module.heads_per_group, dim=1) for x in (k, v))
    if lower_right is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=module.softmax_scale)
    else:
        mask = causal_lower_right(*lower_right)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=module.softmax_scale)
    return out.squeeze(0).transpose(0, 1)


def before_packed(module, query, key, value, cu_seqlens):
    bounds = zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())
    out = torch.cat([_before_segment(module, query[s:e], key[s:e], value[s:e], None) for s, e in bounds])
    return out.reshape(out.shape[0], -1)


def before_context_parallel(module, query, full_key, full_value, cu_seqlens, cp, rank):
    outputs, offset = [], 0
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        chunk = (end - start) // (2 * cp)
        for j in (rank, 2 * cp - 1 - rank):
            q = query[offset : offset + chunk]
            offset += chunk
            visible = slice(start, start + (j + 1) * chunk)
            outputs.append(_before_segment(module, q, full_key[visible], full_value[visible], (chunk, (j + 1) * chunk)))
    out = torch.cat(outputs)
    return out.reshape(out.shape[0], -1)


# ----- after: the module itself -----


class _Group:  # what the context-parallel path asks of its process group
    def __init__(self, size: int, rank: int) -> None:
        self.size, self.rank = (lambda: size), (lambda: rank)


def _module(cp: int) -> SDPACoreAttention:
    config = TransformerConfig(
        num_layers=1,
        hidden_size=HEADS * DIM,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        kv_channels=DIM,
        context_parallel_size=cp,
        attention_dropout=0.0,  # as the project's models (megatron's default is 0.1)
    )
    return SDPACoreAttention(config, layer_number=1, attn_mask_type=None, attention_type="self").train()


def case_functions(lengths: list[int], cp: int, dtype: torch.dtype):
    """(before, after, inputs): functions of (q, k, v) for this rank, and its inputs."""
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens.int(), cu_seqlens_kv=cu_seqlens.int())
    module = _module(cp)
    generator = torch.Generator().manual_seed(0)
    full = [torch.randn(ROW, h, DIM, generator=generator).to(dtype) for h in (HEADS, GROUPS, GROUPS)]
    if cp == 1:
        inputs = [x.requires_grad_() for x in full]
        return (
            lambda q, k, v: before_packed(module, q, k, v, cu_seqlens),
            lambda q, k, v: module(q, k, v, None, packed_seq_params=packed),
            inputs,
        )
    rank = 0
    shares = [cp_token_indices(cu_seqlens, cp, r) for r in range(cp)]
    q, k, v = (x.requires_grad_() for x in full)

    def after(q, k, v):
        local = (k[shares[rank]], v[shares[rank]])
        gathered = iter([tuple(k[i] for i in shares), tuple(v[i] for i in shares)])
        with (
            mock.patch.object(attention_module.parallel_state, "get_context_parallel_group", lambda: _Group(cp, rank)),
            mock.patch.object(attention_module, "all_gather_with_grad", lambda x, group: next(gathered)),
        ):
            return module(q[shares[rank]], *local, None, packed_seq_params=packed)

    def before(q, k, v):
        return before_context_parallel(module, q[shares[rank]], k, v, cu_seqlens, cp, rank)

    return before, after, [q, k, v]


def _time(fn, inputs, upstream) -> tuple[float, float, torch.Tensor]:
    """Wall and CPU seconds (this process, all its threads) of one forward + backward, and its output."""
    for x in inputs:
        x.grad = None
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*inputs)
    out.backward(upstream)
    return time.perf_counter() - wall, time.process_time() - cpu, out.detach()


def run_case(name: str, lengths: list[int], cp: int, dtype: torch.dtype, repeats: int) -> dict:
    before, after, inputs = case_functions(lengths, cp, dtype)
    upstream = torch.randn(ROW // cp, HEADS * DIM, generator=torch.Generator().manual_seed(1)).to(dtype)
    _time(before, inputs, upstream), _time(after, inputs, upstream)  # warm-up
    runs = {"before": [], "after": []}
    for _ in range(repeats):
        *times, out_before = _time(before, inputs, upstream)
        runs["before"].append(times)
        grads_before = [x.grad.clone() for x in inputs]
        *times, out_after = _time(after, inputs, upstream)
        runs["after"].append(times)
    result = {"case": name, "dtype": str(dtype).removeprefix("torch."), "samples": len(lengths)}
    result["context_parallel"] = cp
    for which in ("before", "after"):  # the fastest run: the least disturbed by other work on the machine
        result[f"{which}_wall_ms"] = 1e3 * min(wall for wall, _ in runs[which])
        result[f"{which}_cpu_ms"] = 1e3 * min(cpu for _, cpu in runs[which])
        result[f"{which}_runs_wall_cpu_ms"] = [[1e3 * wall, 1e3 * cpu] for wall, cpu in runs[which]]
    result["speedup_wall"] = result["before_wall_ms"] / result["after_wall_ms"]
    result["speedup_cpu"] = result["before_cpu_ms"] / result["after_cpu_ms"]
    pairs = [(out_after, out_before)] + [(x.grad, g) for x, g in zip(inputs, grads_before)]
    result["max_abs_diff_output"] = float((out_after.float() - out_before.float()).abs().max())
    result["max_abs_diff_grads"] = max(float((x.grad - g).abs().max()) for x, g in zip(inputs, grads_before))
    # relative to the tensor's largest entry: bf16's rounding is 2 ** -8 of it
    result["max_rel_diff"] = max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in pairs)
    return result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/packed_attention"))
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward + backward of one {ROW}-token row")
    header = f"{'case':26} {'dtype':9} {'before ms':>10} {'after ms':>9} {'speedup':>8} {'cpu before':>11} {'cpu after':>10} {'speedup':>8} {'max rel diff':>12}"
    print(header)
    print("-" * len(header))
    results = []
    for dtype in args.dtype:
        for name in args.cases:
            lengths, cp = CASES[name]
            r = run_case(name, lengths, cp, getattr(torch, dtype), args.repeats)
            results.append(r)
            print(
                f"{name:26} {dtype:9} {r['before_wall_ms']:10.1f} {r['after_wall_ms']:9.1f} {r['speedup_wall']:7.2f}x"
                f" {r['before_cpu_ms']:11.1f} {r['after_cpu_ms']:10.1f} {r['speedup_cpu']:7.2f}x {r['max_rel_diff']:12.1e}",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "row": ROW}
    meta |= {"heads": HEADS, "kv_heads": GROUPS, "head_dim": DIM, "repeats": args.repeats}
    (args.out / "results.json").write_text(json.dumps({"setup": meta, "results": results}, indent=2))
    print(f"results: {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
