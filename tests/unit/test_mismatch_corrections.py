"""The GRPO loss's generator/trainer mismatch corrections and GSPO against hand computations on small tensors.

Driver side (``importance_correction``): truncated importance sampling per token
and per sequence, the token (ICE-POP) and sequence (geometric-mean) masks, each
on a batch whose prompt tokens hold junk ratios that a sequence-level option
must not read. Loss side (``ClippedPGLoss``): the fields' metrics, GSPO's
sequence ratio (hand values, the sequence-form gradient, a packed row equal to
separate rows, and context parallelism over two gloo processes equal to one),
and the shipped config: defaults give today's loss, every option validates and
wires, and each bad combination is refused by name.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nemo_rl.algorithms.advantages import token_weights
from nemo_rl.algorithms.importance_correction import ImportanceCorrection, importance_correction, sequence_ids
from nemo_rl.algorithms.loss_functions import ClippedPGLoss, megatron_cp_group
from nemo_rl.config.loader import load_config, resolve_config
from nemo_rl.config.schema import GRPOMasterConfig, validate_grpo_config
from nemo_rl.data.packing import pack_batch
from nemo_rl.data.token_alignment import align_to_predictions
from nemo_rl.models.megatron.context_parallel import cp_token_indices, split_for_context_parallel
from nemo_rl.models.policy.loss_metrics import declared_parts, logged_metrics, micro_batch_totals
from nemo_rl.utils.errors import ConfigError
from tests.unit.test_grpo_config import GRPO_YAML

if TYPE_CHECKING:
    from nemo_rl.algorithms.grpo import GRPORun

# ----------------------------------------------------------------------------
# driver side: the weights, by token
# ----------------------------------------------------------------------------
# Three sequences; rho = exp(prev - gen) of each loss token. Prompt tokens carry prev = -9 (rho = e^-9):
# a sequence-level product or mean that read them would be far off.
LOSS_MASK = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 0]])
RHO = [[None, 3.0, 0.6, 1.5], [None, None, 4.0, 0.25], [None, 2.5, 2.5, None]]
# products 2.7, 1, 6.25; geometric means 2.7^(1/3) = 1.39, 1, 2.5


def _ratio_batch() -> dict[str, torch.Tensor]:
    prev = torch.tensor([[-9.0 if r is None else math.log(r) for r in row] for row in RHO])
    return {"loss_mask": LOSS_MASK, "prev_logprobs": prev, "generation_logprobs": torch.zeros(3, 4)}


def _fields(**options) -> dict[str, torch.Tensor]:
    return ImportanceCorrection(**options).fields(_ratio_batch())


def _bools(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_token_level_weight_is_the_ratio_and_nothing_else_by_default():
    fields = _fields(weighted=True)
    assert set(fields) == {"importance_weight"}
    torch.testing.assert_close(
        fields["importance_weight"], torch.tensor([[0, 3, 0.6, 1.5], [0, 0, 4, 0.25], [0, 2.5, 2.5, 0]])
    )


def test_token_level_tis_caps_each_token():
    fields = _fields(weighted=True, cap=2.0)
    torch.testing.assert_close(
        fields["importance_weight"], torch.tensor([[0, 2, 0.6, 1.5], [0, 0, 2, 0.25], [0, 2, 2, 0]])
    )
    assert torch.equal(fields["importance_truncated"], _bools([[0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 1, 0]]))


def test_sequence_level_tis_caps_the_product_of_the_sequence_loss_tokens():
    fields = _fields(weighted=True, level="sequence", cap=2.0)
    # 2.7 -> 2 (truncated), 1 -> 1, 6.25 -> 2 (truncated); with the prompt's e^-9 nothing would be capped
    torch.testing.assert_close(fields["importance_weight"], torch.tensor([[0, 2, 2, 2], [0, 0, 1, 1], [0, 2, 2, 0.0]]))
    assert torch.equal(fields["importance_truncated"], _bools([[0, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]]))


def test_token_mask_drops_tokens_outside_the_bounds_with_and_without_the_weight():
    weighted = _fields(weighted=True, mask="token", mask_min=0.5, mask_max=2.0)
    # kept: 0.6 and 1.5 in row 0; 3, 4, 0.25, 2.5, 2.5 dropped
    torch.testing.assert_close(
        weighted["importance_weight"], torch.tensor([[0, 0, 0.6, 1.5], [0, 0, 0, 0], [0, 0, 0, 0.0]])
    )
    assert torch.equal(weighted["importance_masked"], _bools([[0, 1, 0, 0], [0, 0, 1, 1], [0, 1, 1, 0]]))
    unweighted = _fields(mask="token", mask_min=0.5, mask_max=2.0)
    assert set(unweighted) == {"importance_weight", "importance_masked"}
    torch.testing.assert_close(
        unweighted["importance_weight"], torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0.0]])
    )


def test_sequence_mask_drops_sequences_by_the_geometric_mean_of_their_loss_tokens():
    fields = _fields(weighted=True, mask="sequence", mask_min=0.5, mask_max=2.0)
    # geometric means 1.39 and 1 are kept, 2.5 is dropped; kept sequences keep their token weights (seq-mask-tis)
    torch.testing.assert_close(
        fields["importance_weight"], torch.tensor([[0, 3, 0.6, 1.5], [0, 0, 4, 0.25], [0, 0, 0, 0.0]])
    )
    assert torch.equal(fields["importance_masked"], _bools([[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]]))
    # a bound of 1.3 separates 1.39 from 1: the mean is over the loss tokens only (with the prompt: 0.14)
    tighter = _fields(mask="sequence", mask_min=0.9, mask_max=1.3)
    assert torch.equal(tighter["importance_masked"], _bools([[0, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]]))


def test_a_masked_token_is_not_also_counted_as_truncated():
    fields = _fields(weighted=True, cap=2.0, mask="sequence", mask_min=0.5, mask_max=2.0)
    torch.testing.assert_close(
        fields["importance_weight"], torch.tensor([[0, 2, 0.6, 1.5], [0, 0, 2, 0.25], [0, 0, 0, 0.0]])
    )
    # row 2's 2.5s exceed the cap, but the mask dropped them
    assert torch.equal(fields["importance_truncated"], _bools([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]))
    both_sequence = _fields(weighted=True, level="sequence", cap=2.0, mask="sequence", mask_min=0.5, mask_max=2.0)
    torch.testing.assert_close(
        both_sequence["importance_weight"], torch.tensor([[0, 2, 2, 2], [0, 0, 1, 1], [0, 0, 0, 0.0]])
    )


def test_a_sequence_product_beyond_float32_is_capped_not_infinite():
    batch = {
        "loss_mask": torch.ones(1, 200, dtype=torch.long),
        "prev_logprobs": torch.zeros(1, 200),
        "generation_logprobs": torch.full((1, 200), -1.0),  # rho = e per token, product e^200 > float32's max
    }
    weight = ImportanceCorrection(weighted=True, level="sequence", cap=2.0).fields(batch)["importance_weight"]
    assert torch.equal(weight, torch.full((1, 200), 2.0))


# ----------------------------------------------------------------------------
# loss side: the corrections' metrics
# ----------------------------------------------------------------------------
def _loss_batch(fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A by-token batch with the driver's fields, aligned as the worker aligns it (logp = prev: every r = 1)."""
    by_token = _ratio_batch() | fields | {"input_ids": torch.zeros(3, 4, dtype=torch.long)}
    by_token["advantages"] = LOSS_MASK.float()  # A = 1 on every loss token
    by_token["reference_logprobs"] = by_token["prev_logprobs"]
    return align_to_predictions(by_token)


def test_loss_weights_tokens_by_the_field_and_logs_each_correction():
    correction = ImportanceCorrection(weighted=True, cap=2.0, mask="sequence", mask_min=0.5, mask_max=2.0)
    loss_fn = ClippedPGLoss(importance_correction=correction)
    aligned = _loss_batch(correction.fields(_ratio_batch()))
    numerator, count, reported = loss_fn(aligned["prev_logprobs"], aligned)
    # r = 1, A = 1: each loss token adds -weight; weights 2, 0.6, 1.5, 2, 0.25, 0, 0 (see the test above)
    assert float(numerator) == pytest.approx(-6.35)
    assert int(count) == 7
    assert set(reported) == declared_parts(loss_fn)
    logged = logged_metrics(micro_batch_totals([reported], loss_fn), loss_fn)
    assert list(logged) == [
        "loss",
        "kl",
        "clip_fraction",
        "is_weight_mean",
        "is_truncated_fraction",
        "is_masked_fraction",
    ]
    assert logged["is_weight_mean"] == pytest.approx(6.35 / 7)
    assert logged["is_truncated_fraction"] == pytest.approx(2 / 7)
    assert logged["is_masked_fraction"] == pytest.approx(2 / 7)


def test_each_metric_is_declared_only_with_its_option():
    names = lambda loss_fn: list(loss_fn.metrics)[3:]  # noqa: E731  (after loss, kl, clip_fraction)
    assert names(ClippedPGLoss()) == []
    assert names(ClippedPGLoss(importance_correction=ImportanceCorrection(weighted=True))) == ["is_weight_mean"]
    assert names(ClippedPGLoss(importance_correction=ImportanceCorrection(mask="token"))) == ["is_masked_fraction"]
    gspo = ClippedPGLoss(sequence_level_importance_ratios=True)
    assert names(gspo) == ["sequence_ratio_mean", "sequence_clip_fraction"]
    assert list(ClippedPGLoss.metrics) == ["loss", "kl", "clip_fraction"]  # the class's stay the defaults'


# ----------------------------------------------------------------------------
# GSPO
# ----------------------------------------------------------------------------
def _gspo_batch(log_ratios: list[list[float]], advantages: list[float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An aligned micro-batch of one sequence per row, its loss tokens first; prev = 0, so logp is the log-ratio.

    Every position after a row's loss tokens holds log-ratio log(100): junk a sequence ratio must not read.
    """
    width = 4
    logp = torch.full((len(log_ratios), width), math.log(100.0))
    mask = torch.zeros(len(log_ratios), width)
    for row, values in enumerate(log_ratios):
        logp[row, : len(values)] = torch.tensor(values)
        mask[row, : len(values)] = 1
    batch = {
        "token_mask": mask,
        "advantages": torch.tensor(advantages)[:, None] * mask,
        "prev_logprobs": torch.zeros_like(logp),
        "reference_logprobs": logp.clone(),  # KL 0
        "sequence_id": sequence_ids(mask),
    }
    return logp.requires_grad_(), batch


def test_gspo_ratio_is_the_geometric_mean_per_sequence_clipped_as_one():
    logp, batch = _gspo_batch([[math.log(1.1), math.log(0.9), math.log(1.2)], [math.log(1.5), math.log(1.5)]], [1, 1])
    numerator, _, reported = ClippedPGLoss(sequence_level_importance_ratios=True)(logp, batch)
    s0 = (1.1 * 0.9 * 1.2) ** (1 / 3)  # 1.0591: inside [0.8, 1.2]; row 1's 1.5 is clipped to 1.2 (A > 0)
    assert float(numerator.detach()) == pytest.approx(3 * -s0 + 2 * -1.2)
    numerator.backward()
    # d/d logp_t of -A sg[s] exp(logp_t - sg[logp_t]) = -A s; a clipped sequence gets none, junk positions none
    torch.testing.assert_close(logp.grad, torch.tensor([[-s0, -s0, -s0, 0], [0, 0, 0, 0.0]]))
    assert float(reported["sequence_ratio_sum"]) == pytest.approx(s0 + 1.5)
    assert float(reported["num_sequences"]) == pytest.approx(2)
    assert float(reported["clipped_sequences"]) == pytest.approx(1)
    assert float(reported["clipped_tokens"]) == 2


def test_gspo_gradient_is_the_sequence_form_gradient_with_sequence_averaging():
    log_ratios = [[0.05, -0.1, 0.02], [0.1, 0.04]]
    advantages = [0.7, -1.3]
    logp, batch = _gspo_batch(log_ratios, advantages)
    batch["token_weight"] = token_weights(batch["token_mask"], sequence_level=True)
    numerator, count, _ = ClippedPGLoss(ratio_clip_min=0.5, ratio_clip_max=0.5, sequence_level_importance_ratios=True)(
        logp, batch
    )
    (token_form,) = torch.autograd.grad(numerator / count, logp)
    # GSPO as written: the mean over sequences of -A_i s_i, s_i = exp(mean of the sequence's log-ratios)
    leaf = logp.detach().requires_grad_()
    mask = batch["token_mask"]
    s = torch.exp((leaf * mask).sum(1) / mask.sum(1))
    objective = (-torch.tensor(advantages) * s).mean()
    (sequence_form,) = torch.autograd.grad(objective, leaf)
    assert float(numerator.detach() / count) == pytest.approx(float(objective.detach()))
    torch.testing.assert_close(token_form, sequence_form)


# Two samples by token: prompt 3 + response 2 (5 tokens), prompt 1 + response 6 (7 tokens), width 8.
SAMPLE_LOSS_MASK = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 0]])


def _by_token_samples() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    mask = SAMPLE_LOSS_MASK
    batch = {
        "input_ids": torch.randint(1, 50, (2, 8), generator=gen),
        "loss_mask": mask,
        "input_lengths": torch.tensor([5, 7]),
        "advantages": torch.tensor([[0.8], [-0.6]]) * mask,
        "prev_logprobs": -torch.rand(2, 8, generator=gen),
        "reference_logprobs": -torch.rand(2, 8, generator=gen),
        "token_weight": token_weights(mask, sequence_level=True),
        "sequence_id": sequence_ids(mask),
    }
    return batch


def _trainer_logprobs(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The current policy's log-prob of each token, within 0.15 of prev (inside the clip range after averaging)."""
    return batch["prev_logprobs"] + 0.15 * torch.sin(torch.arange(16.0).view(2, 8))


def _predictions(by_token: torch.Tensor) -> torch.Tensor:
    """The model output of log-probs indexed by token: position t holds token t + 1's (differentiable)."""
    return torch.cat([by_token[:, 1:], torch.zeros(by_token.shape[0], 1)], 1)


GSPO = ClippedPGLoss(reference_policy_kl_penalty=0.05, sequence_level_importance_ratios=True)


def _packed_row() -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The two samples packed into one row (each padded to 8 = 2 x 2 CP chunks of 2): by-token logp leaf, the
    aligned row and its cu_seqlens, as the worker sees them."""
    batch = _by_token_samples()
    logp = _trainer_logprobs(batch).requires_grad_()
    index = {"token_index": torch.arange(16).view(2, 8)}  # where each by-token entry lands in the packed row
    (row,), _ = pack_batch(batch | index, capacity=16, multiple=4)
    packed_logp = logp.flatten()[row["token_index"]]
    return logp, align_to_predictions(row) | {"model_output": _predictions(packed_logp)}, row["cu_seqlens"]


def test_a_packed_row_of_two_samples_gives_the_loss_and_gradient_of_separate_rows():
    batch = _by_token_samples()
    logp = _trainer_logprobs(batch).requires_grad_()
    separate, separate_count, separate_parts = GSPO(_predictions(logp), align_to_predictions(batch))
    (separate_grad,) = torch.autograd.grad(separate, logp)

    packed_logp, row, _ = _packed_row()
    packed, packed_count, packed_parts = GSPO(row["model_output"], row)
    (packed_grad,) = torch.autograd.grad(packed, packed_logp)

    assert int(packed_count) == int(separate_count) == 8
    torch.testing.assert_close(packed, separate)
    torch.testing.assert_close(packed_grad, separate_grad)
    assert separate_grad[SAMPLE_LOSS_MASK.bool()].abs().min() > 0  # every response token has a gradient
    for part in ("sequence_ratio_sum", "num_sequences", "clipped_sequences"):
        torch.testing.assert_close(packed_parts[part], separate_parts[part])
    assert float(packed_parts["num_sequences"]) == pytest.approx(2)


@pytest.mark.parametrize(("initialized", "cp_size", "expected"), [(False, 2, None), (True, 1, None), (True, 2, "cp")])
def test_the_context_parallel_group_is_megatrons_when_it_splits_sequences(monkeypatch, initialized, cp_size, expected):
    parallel_state = SimpleNamespace(
        model_parallel_is_initialized=lambda: initialized,
        get_context_parallel_world_size=lambda: cp_size,
        get_context_parallel_group=lambda: "cp",
    )
    monkeypatch.setitem(sys.modules, "megatron.core.parallel_state", parallel_state)
    assert megatron_cp_group() == expected


CP = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cp_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=CP)
    try:
        _, row, cu_seqlens = _packed_row()
        full = row["model_output"].detach().requires_grad_()
        numerator, count, parts = GSPO(full, row)
        (full_grad,) = torch.autograd.grad(numerator, full)

        local = split_for_context_parallel(row, cu_seqlens, CP, rank)
        # Sample 0's two response tokens are predicted at positions 2 and 3: both on rank 1.
        assert local["token_mask"][0, :4].sum() == (0 if rank == 0 else 2)
        output = local["model_output"].detach().requires_grad_()
        local_numerator, local_count, local_parts = ClippedPGLoss(
            reference_policy_kl_penalty=0.05, sequence_level_importance_ratios=True, group=dist.group.WORLD
        )(output, local)
        (local_grad,) = torch.autograd.grad(local_numerator, output)

        torch.testing.assert_close(local_grad, full_grad[:, cp_token_indices(cu_seqlens, CP, rank)])
        totals = torch.stack([local_numerator.detach(), local_count.float(), *local_parts.values()])
        dist.all_reduce(totals)
        expected = torch.stack([numerator.detach(), count.float(), *(parts[k] for k in local_parts)])
        torch.testing.assert_close(totals, expected)
    finally:
        dist.destroy_process_group()


def test_context_parallel_ranks_together_give_the_unsplit_gspo_loss_and_gradient():
    # A failed assertion in either rank is re-raised here by spawn, with the child's traceback.
    mp.spawn(_cp_worker, args=(_free_port(),), nprocs=CP, join=True)


# ----------------------------------------------------------------------------
# the config: defaults, wiring, refusals
# ----------------------------------------------------------------------------
ALL_ON = (
    "loss_fn.use_importance_sampling_correction=true",
    "loss_fn.importance_sampling_level=sequence",
    "loss_fn.truncated_importance_sampling_ratio=2.0",
    "loss_fn.importance_sampling_mask=sequence",
    "loss_fn.sequence_level_importance_ratios=true",
    "loss_fn.token_level_loss=false",
)


def grpo(*overrides: str) -> GRPOMasterConfig:
    return validate_grpo_config(resolve_config(load_config(GRPO_YAML, list(overrides))))


def _run(cfg: GRPOMasterConfig) -> GRPORun:
    """The run's loss and field hooks, which read only the config (nothing started)."""
    # Imported here: the spawned CP ranks import this module, and the run's imports (Ray, vLLM) take seconds.
    from nemo_rl.algorithms.grpo import GRPORun

    run = GRPORun.__new__(GRPORun)
    run.cfg = cfg
    return run


def test_defaults_give_todays_loss_and_fields():
    run = _run(grpo())
    assert importance_correction(run.cfg.loss_fn) is None
    assert run.make_loss() == ClippedPGLoss(ratio_clip_min=0.2, ratio_clip_max=0.2, reference_policy_kl_penalty=0.01)
    assert list(run.make_loss().metrics) == ["loss", "kl", "clip_fraction"]
    batch = _by_token_samples()
    assert set(run.chunk_fields(batch)) == {"token_weight"}


def test_every_option_on_validates_and_wires_loss_and_fields():
    run = _run(grpo(*ALL_ON))
    loss_fn = run.make_loss()
    assert loss_fn.importance_correction == ImportanceCorrection(True, "sequence", 2.0, "sequence", 0.5, 2.0)
    assert loss_fn.sequence_level_importance_ratios
    batch = _by_token_samples()
    batch["generation_logprobs"] = batch["prev_logprobs"] - 0.01
    fields = run.chunk_fields(batch)
    assert set(fields) == {
        "token_weight",
        "importance_weight",
        "importance_truncated",
        "importance_masked",
        "sequence_id",
    }
    aligned = align_to_predictions(batch | fields)
    _, _, reported = loss_fn(_predictions(_trainer_logprobs(batch)), aligned)
    assert set(reported) == declared_parts(loss_fn)
    assert all(
        math.isfinite(value) for value in logged_metrics(micro_batch_totals([reported], loss_fn), loss_fn).values()
    )


def _errors(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        grpo(*overrides)
    return info.value.messages


@pytest.mark.parametrize(
    ("overrides", "prefix"),
    [
        (
            ["loss_fn.truncated_importance_sampling_ratio=2.0"],
            "loss_fn.truncated_importance_sampling_ratio: caps the importance weights, and "
            "loss_fn.use_importance_sampling_correction = false applies none; set it to true",
        ),
        (
            ["loss_fn.use_importance_sampling_correction=true", "loss_fn.truncated_importance_sampling_ratio=0.8"],
            "loss_fn.truncated_importance_sampling_ratio: 0.8 is below 1",
        ),
        (
            ["loss_fn.importance_sampling_level=sequence"],
            "loss_fn.importance_sampling_level: sequence with loss_fn.use_importance_sampling_correction = false",
        ),
        (
            ["loss_fn.use_importance_sampling_correction=true", "loss_fn.importance_sampling_level=sequence"],
            "loss_fn.importance_sampling_level: sequence weights a sequence by the product of its tokens' ratios",
        ),
        (
            ["loss_fn.importance_sampling_mask=token", "loss_fn.importance_sampling_mask_min=2.0"],
            "loss_fn.importance_sampling_mask_min, loss_fn.importance_sampling_mask_max: [2.0, 2.0] must contain 1",
        ),
        (
            ["loss_fn.importance_sampling_mask=sequence", "loss_fn.importance_sampling_mask_max=0.9"],
            "loss_fn.importance_sampling_mask_min, loss_fn.importance_sampling_mask_max: [0.5, 0.9] must contain 1",
        ),
        (
            [
                "loss_fn.use_importance_sampling_correction=true",
                "loss_fn.importance_sampling_level=sequence",
                "loss_fn.truncated_importance_sampling_ratio=2.0",
                "loss_fn.importance_sampling_mask=token",
            ],
            "loss_fn.importance_sampling_mask: token drops single tokens, and loss_fn.importance_sampling_level = "
            "sequence",
        ),
        (
            [
                "loss_fn.use_importance_sampling_correction=true",
                "loss_fn.truncated_importance_sampling_ratio=3.0",
                "loss_fn.importance_sampling_mask=token",
            ],
            "loss_fn.truncated_importance_sampling_ratio: 3.0 is not below loss_fn.importance_sampling_mask_max = 2.0",
        ),
        (
            ["loss_fn.sequence_level_importance_ratios=true"],
            "loss_fn.sequence_level_importance_ratios: GSPO clips and averages per sequence",
        ),
    ],
)
def test_bad_combinations_are_refused_naming_the_field_and_the_fix(overrides, prefix):
    (error,) = _errors(*overrides)
    assert error.startswith(prefix), error
