"""``SDPACoreAttention`` on packed rows equals per-sample causal attention, with and without context parallelism.

The reference is computed here, independently of the module: one causal SDPA
call per sample (GQA by repeating key/value heads). Context parallelism is
simulated in one process: every rank's share of the same full tensors goes
through the module with the CP group's all-gather replaced by the ranks'
shares, so the gradients summed over ranks are what the real all-gather's
backward (an all-reduce) gives each rank.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_rl.models.megatron import attention as attention_module
from nemo_rl.models.megatron.attention import SDPACoreAttention
from nemo_rl.models.megatron.context_parallel import cp_token_indices

HEADS, GROUPS, DIM = 4, 2, 16  # GQA: 2 query heads per key/value head
# uneven, several length-1 samples, lengths spread over four halvings of the longest
LENGTHS = [1, 7, 1, 30, 64, 2, 17, 1, 40, 5, 64, 33]


def _module(cp: int = 1, dropout: float = 0.0) -> SDPACoreAttention:
    config = TransformerConfig(
        num_layers=1,
        hidden_size=HEADS * DIM,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        kv_channels=DIM,
        context_parallel_size=cp,
        attention_dropout=dropout,
    )
    return SDPACoreAttention(config, layer_number=1, attn_mask_type=None, attention_type="self").eval()


def _packed(lengths: list[int]) -> PackedSeqParams:
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens)


def _inputs(lengths: list[int], dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    shapes = ((total, HEADS, DIM), (total, GROUPS, DIM), (total, GROUPS, DIM))
    return tuple(torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in shapes)


def _reference(q, k, v, lengths: list[int]) -> torch.Tensor:
    """[t, heads * d]: each sample's causal attention on its own, one SDPA call per sample."""
    outputs, start = [], 0
    for length in lengths:
        qs, ks, vs = (x[start : start + length].transpose(0, 1) for x in (q, k, v))  # [heads, s, d]
        ks, vs = (x.repeat_interleave(HEADS // GROUPS, 0) for x in (ks, vs))
        outputs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
        start += length
    return torch.cat(outputs).reshape(start, -1)


def _value_and_grads(fn, inputs, upstream):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, upstream)
    return out, grads


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, dict(rtol=1e-5, atol=1e-6)), (torch.bfloat16, dict(rtol=2e-2, atol=2e-2))]
)
def test_packed_rows_equal_per_sample_causal_attention_forward_and_backward(dtype, tol):
    inputs = _inputs(LENGTHS, dtype)
    upstream = torch.randn(sum(LENGTHS), HEADS * DIM, generator=torch.Generator().manual_seed(1)).to(dtype)
    module, packed = _module(), _packed(LENGTHS)
    got, got_grads = _value_and_grads(lambda q, k, v: module(q, k, v, None, packed_seq_params=packed), inputs, upstream)
    # the reference in float32 from the same (rounded) inputs: bf16 is then held to its own rounding
    reference_inputs = tuple(x.detach().float().requires_grad_() for x in inputs)
    want, want_grads = _value_and_grads(lambda *x: _reference(*x, LENGTHS), reference_inputs, upstream.float())
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, **tol)
    for name, g, w in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g.float(), w, **tol, msg=lambda m, n=name: f"d{n}: {m}")


def test_equal_lengths_are_one_attention_call_and_uneven_ones_one_per_length_band(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda q, *a, **kw: calls.append(q.shape) or sdpa(q, *a, **kw)
    )
    module = _module()
    module(*_inputs([16] * 64, torch.float32), None, packed_seq_params=_packed([16] * 64))
    assert calls == [torch.Size([64, HEADS, 16, DIM])]
    calls.clear()
    module(*_inputs(LENGTHS, torch.float32), None, packed_seq_params=_packed(LENGTHS))
    # longest 64, bands (32, 64], (16, 32], (4, 8], (1, 2], (0, 1] hold 4, 2, 2, 1 and 3 samples
    assert sorted(shape[0] for shape in calls) == [1, 2, 2, 3, 4]
    assert sum(shape[0] for shape in calls) == len(LENGTHS)


class _Group:
    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_ranks_together_equal_the_unsplit_packed_row(monkeypatch, cp):
    lengths = [2 * cp * n for n in (1, 3, 1, 8, 2, 5)]  # chunks of 1 token included
    cu_seqlens = torch.tensor([0, *lengths]).cumsum(0)
    inputs = _inputs(lengths, torch.float32, seed=2)
    upstream = torch.randn(sum(lengths), HEADS * DIM, generator=torch.Generator().manual_seed(3))
    want, want_grads = _value_and_grads(lambda *x: _reference(*x, lengths), inputs, upstream)

    def all_ranks(q, k, v):
        shares = [cp_token_indices(cu_seqlens, cp, r) for r in range(cp)]
        out = torch.zeros(sum(lengths), HEADS * DIM)
        for rank, index in enumerate(shares):
            local_keys, local_values = ([x[i] for i in shares] for x in (k, v))
            gathered = iter((tuple(local_keys), tuple(local_values)))
            monkeypatch.setattr(
                attention_module.parallel_state, "get_context_parallel_group", lambda r=rank: _Group(cp, r)
            )
            monkeypatch.setattr(attention_module, "all_gather_with_grad", lambda x, group, g=gathered: next(g))
            local = _module(cp)(
                q[index], local_keys[rank], local_values[rank], None, packed_seq_params=_packed(lengths)
            )
            out = out.index_copy(0, index, local)
        return out

    got, got_grads = _value_and_grads(all_ranks, inputs, upstream)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, g, w in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"d{n}: {m}")


def test_dropout_in_training_draws_from_the_model_parallel_rng_and_stays_within_each_sample(megatron_single_process):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    module, packed = _module(dropout=0.5).train(), _packed(LENGTHS)
    q, k, v = (x.detach() for x in _inputs(LENGTHS, torch.float32))

    def run(k):
        model_parallel_cuda_manual_seed(7)
        return module(q, k, v, None, packed_seq_params=packed)

    first, second = run(k), run(k)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # the tracker's seed decides the dropout masks
    assert not torch.allclose(first, module.eval()(q, k, v, None, packed_seq_params=packed))
    module.train()
    changed = k.clone()
    start = sum(LENGTHS[:4])
    changed[start : start + LENGTHS[4]] += 1.0  # another sample's keys: nothing else may move
    other = run(changed)
    outside = torch.ones(sum(LENGTHS), dtype=torch.bool)
    outside[start : start + LENGTHS[4]] = False
    torch.testing.assert_close(other[outside], first[outside], rtol=0, atol=0)
    assert not torch.allclose(other[~outside], first[~outside])


def test_benchmark_runs_and_the_old_loop_it_keeps_agrees_with_the_module(tmp_path):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "packed_attention.py"
    spec = importlib.util.spec_from_file_location("packed_attention_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    benchmark.main(
        ["--out", str(tmp_path), "--dtype", "float32", "--repeats", "1", "--cases", "64 x 64", "cp2, 64 x 64"]
    )
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["case"] for r in results] == ["64 x 64", "cp2, 64 x 64"]
    assert all(r["max_rel_diff"] < 1e-5 and r["after_wall_ms"] > 0 for r in results)
