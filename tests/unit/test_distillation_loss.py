"""Distillation loss and its vocab-parallel primitives against full-vocabulary torch references.

TP=1 checks run in-process; TP=2 checks split the same seeded logits over two
gloo processes and compare every rank's values and shard gradients with the
single-process reference.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nemo_rl.algorithms.distillation_loss import DistillationLoss
from nemo_rl.models.megatron.vocab_parallel import logprobs_at, topk_logprobs, vocab_parallel_log_normalizer

B, L, V, K = 2, 5, 16, 4
KL_TYPES = ["forward", "reverse", "mixed"]


def _logits(seed: int, vocab: int = V) -> torch.Tensor:
    return torch.randn(B, L, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _mask() -> torch.Tensor:
    mask = torch.ones(B, L)
    mask[0, -2:] = 0
    mask[1, 0] = 0
    return mask


def _teacher_batch(teacher_logits: torch.Tensor, k: int, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    values, indices = torch.log_softmax(teacher_logits, -1).topk(k, -1)
    return {"token_mask": mask, "teacher_topk_logprobs": values, "teacher_topk_indices": indices}


def _reference_kl(student_logits: torch.Tensor, batch: dict[str, torch.Tensor], kl_type: str, w: float = 0.5):
    """The loss's numerator written directly on full logits."""
    student = torch.log_softmax(student_logits.float(), -1).gather(-1, batch["teacher_topk_indices"])
    teacher = batch["teacher_topk_logprobs"]
    forward = (teacher.exp() * (teacher - student)).sum(-1)
    reverse = (student.exp() * (student - teacher)).sum(-1)
    per_position = {"forward": forward, "reverse": reverse, "mixed": w * forward + (1 - w) * reverse}[kl_type]
    return (per_position * batch["token_mask"]).sum()


def _grad(output: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(output, wrt)[0]


# ----------------------------------------------------------------------------- TP = 1


def test_log_normalizer_matches_logsumexp():
    logits = _logits(0).requires_grad_()
    weights = _logits(1)[..., 0]
    ours = vocab_parallel_log_normalizer(logits, None)
    ref = torch.logsumexp(logits, -1)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(_grad((ours * weights).sum(), logits), _grad((ref * weights).sum(), logits))


def test_topk_logprobs_matches_log_softmax_topk():
    logits = _logits(0)
    values, indices = topk_logprobs(logits, K, None)
    ref_values, ref_indices = torch.log_softmax(logits, -1).topk(K, -1)
    torch.testing.assert_close(values, ref_values)
    assert indices.dtype == torch.int64 and torch.equal(indices, ref_indices)


def test_logprobs_at_matches_log_softmax_gather():
    logits = _logits(0).requires_grad_()
    indices = torch.randint(0, V, (B, L, K), generator=torch.Generator().manual_seed(1))
    weights = _logits(2)[..., :K]
    ours = logprobs_at(logits, indices, None)
    ref = torch.log_softmax(logits, -1).gather(-1, indices)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(_grad((ours * weights).sum(), logits), _grad((ref * weights).sum(), logits))


@pytest.mark.parametrize("kl_type", KL_TYPES)
def test_loss_matches_reference_values_and_grads(kl_type):
    student = _logits(0).requires_grad_()
    batch = _teacher_batch(_logits(1), K, _mask())
    loss = DistillationLoss(kl_type=kl_type, mixed_kl_weight=0.3)
    numerator, count, metrics = loss(student, batch)
    ref = _reference_kl(student, batch, kl_type, w=0.3)
    torch.testing.assert_close(numerator, ref)
    torch.testing.assert_close(_grad(numerator, student), _grad(ref, student))
    assert count.dtype == torch.int32 and count.item() == int(_mask().sum())
    assert not metrics["kl_sum"].requires_grad and metrics["kl_sum"] == numerator.detach()
    assert metrics["num_tokens"] == count


def test_mixed_is_weighted_sum_of_forward_and_reverse():
    student, batch = _logits(0), _teacher_batch(_logits(1), K, _mask())
    forward = DistillationLoss("forward")(student, batch)[0]
    reverse = DistillationLoss("reverse")(student, batch)[0]
    torch.testing.assert_close(DistillationLoss("mixed", 0.3)(student, batch)[0], 0.3 * forward + 0.7 * reverse)


def test_full_vocab_topk_gives_exact_kl():
    student, teacher = _logits(0), _logits(1)
    batch = _teacher_batch(teacher, V, torch.ones(B, L))
    log_s, log_t = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    exact_forward = F.kl_div(log_s, log_t, reduction="sum", log_target=True)
    exact_reverse = F.kl_div(log_t, log_s, reduction="sum", log_target=True)
    torch.testing.assert_close(DistillationLoss("forward")(student, batch)[0], exact_forward)
    torch.testing.assert_close(DistillationLoss("reverse")(student, batch)[0], exact_reverse)


def test_forward_kl_zero_for_identical_and_positive_otherwise():
    logits = _logits(0)
    assert DistillationLoss()(logits, _teacher_batch(logits, K, torch.ones(B, L)))[0].abs() < 1e-5
    for position in itertools.product(range(B), range(L)):
        mask = torch.zeros(B, L)
        mask[position] = 1
        assert DistillationLoss()(logits, _teacher_batch(_logits(1), V, mask))[0] > 1e-3


@pytest.mark.parametrize("kl_type", KL_TYPES)
def test_masked_positions_contribute_nothing(kl_type):
    mask = _mask()
    student = _logits(0).requires_grad_()
    batch = _teacher_batch(_logits(1), K, mask)
    garbage = dict(batch, teacher_topk_logprobs=batch["teacher_topk_logprobs"].clone())
    garbage["teacher_topk_logprobs"][mask == 0] = torch.tensor([float("-inf"), float("nan"), 0.0, 5.0])
    loss = DistillationLoss(kl_type)
    numerator, grad = None, None
    for candidate in (batch, garbage):
        value = loss(student, candidate)[0]
        value_grad = _grad(value, student)
        assert torch.isfinite(value) and torch.isfinite(value_grad).all()
        assert (value_grad[mask == 0] == 0).all()
        if numerator is not None:
            torch.testing.assert_close(value, numerator)
            torch.testing.assert_close(value_grad, grad)
        numerator, grad = value, value_grad


_TP_GROUP, _OVERRIDE = object(), object()


@pytest.mark.parametrize(
    ("initialized", "tp_size", "override", "expected"),
    [(False, 2, None, None), (True, 1, None, None), (True, 2, None, _TP_GROUP), (True, 2, _OVERRIDE, _OVERRIDE)],
)
def test_group_comes_from_megatron_unless_overridden(monkeypatch, initialized, tp_size, override, expected):
    parallel_state = SimpleNamespace(
        model_parallel_is_initialized=lambda: initialized,
        get_tensor_model_parallel_world_size=lambda: tp_size,
        get_tensor_model_parallel_group=lambda: _TP_GROUP,
    )
    monkeypatch.setitem(sys.modules, "megatron.core.parallel_state", parallel_state)
    seen = []
    monkeypatch.setattr(
        "nemo_rl.algorithms.distillation_loss.logprobs_at",
        lambda logits, ids, group: seen.append(group) or logits[..., :K],
    )
    DistillationLoss(group=override)(_logits(0), _teacher_batch(_logits(1), K, _mask()))
    assert seen == [expected]


def test_loss_declares_logits_output_and_ignores_group_in_eq_repr():
    assert DistillationLoss.model_output == "logits"
    assert DistillationLoss(group=_OVERRIDE) == DistillationLoss() and "group" not in repr(DistillationLoss())


def test_unknown_kl_type_rejected():
    with pytest.raises(ValueError, match="kl_type"):
        DistillationLoss(kl_type="backward")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- TP = 2 over gloo

TP = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _shard(full: torch.Tensor, rank: int) -> torch.Tensor:
    width = full.shape[-1] // TP
    return full[..., rank * width : (rank + 1) * width].detach().clone()


def _check_primitives(rank: int, group) -> None:
    full = _logits(0).requires_grad_()
    local = _shard(full, rank).requires_grad_()
    weights = _logits(3)[..., :K]

    normalizer = vocab_parallel_log_normalizer(local, group)
    ref_normalizer = torch.logsumexp(full, -1)
    torch.testing.assert_close(normalizer, ref_normalizer, atol=1e-5, rtol=0)
    expected = _shard(_grad((ref_normalizer * weights[..., 0]).sum(), full), rank)
    torch.testing.assert_close(_grad((normalizer * weights[..., 0]).sum(), local), expected, atol=1e-5, rtol=0)

    for k in (K, V // TP + 2):  # k within, and beyond, one rank's share of the vocabulary
        values, indices = topk_logprobs(local, k, group)
        ref_values, ref_indices = torch.log_softmax(full, -1).detach().topk(k, -1)
        torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=0)
        assert torch.equal(indices, ref_indices)

    ids = torch.randint(0, V, (B, L, K), generator=torch.Generator().manual_seed(4))
    ours = logprobs_at(local, ids, group)
    ref = torch.log_softmax(full, -1).gather(-1, ids)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    expected = _shard(_grad((ref * weights).sum(), full), rank)
    torch.testing.assert_close(_grad((ours * weights).sum(), local), expected, atol=1e-5, rtol=0)


def _check_loss(rank: int, group) -> None:
    full = _logits(0).requires_grad_()
    local = _shard(full, rank).requires_grad_()
    teacher_values, teacher_indices = topk_logprobs(_shard(_logits(1), rank), K, group)
    batch = {"token_mask": _mask(), "teacher_topk_logprobs": teacher_values, "teacher_topk_indices": teacher_indices}
    for kl_type in KL_TYPES:
        numerator, count, _ = DistillationLoss(kl_type, 0.3, group=group)(local, batch)
        ref = _reference_kl(full, batch, kl_type, w=0.3)
        torch.testing.assert_close(numerator, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(_grad(numerator, local), _shard(_grad(ref, full), rank), atol=1e-5, rtol=0)
        assert count.item() == int(_mask().sum())


_CHECKS = {"primitives": _check_primitives, "loss": _check_loss}


def _tp_worker(rank: int, port: int, check: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=TP)
    try:
        _CHECKS[check](rank, dist.group.WORLD)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("check", sorted(_CHECKS))
def test_tensor_parallel_matches_full_vocab(check):
    # A failed assertion in either rank is re-raised here by spawn, with the child's traceback.
    mp.spawn(_tp_worker, args=(_free_port(), check), nprocs=TP, join=True)
