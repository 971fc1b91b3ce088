"""The KL reference swapped in without copies, and both log-prob passes from one call, bit for bit.

A parameter whose reference lies on its own device (every one on CPU) gets
the reference as its storage for the block and its own storage back after it:
the very same tensor, pointing at the very same memory (megatron-core's DDP
parameters are views into the buffer its distributed optimizer reads). On the
Megatron worker, in process: the reference pass scores the starting weights and
leaves every parameter and the buffer as they were, training after it takes
bitwise the steps it takes without it, and ``get_logprobs_with_reference`` (the
worker's, and ``Policy``'s with fixed and with token-budget micro-batches)
returns what the two separate passes return, to the bit.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nemo_rl.algorithms.loss_functions import NLLLoss
from nemo_rl.models.policy import reference_weights
from nemo_rl.models.policy.reference_weights import ReferenceWeights
from tests.helpers import sft_config

LENGTHS = (64, 20, 48, 33)
# Token budgets of 1024 (the least a 1024-token window allows) put these in three micro-batches: 600, 2 x 512, 128.
BUDGET_LENGTHS = (600, 100, 450, 230)


def _as_buffer_views(module: torch.nn.Module) -> torch.Tensor:
    """Every parameter made a view into one flat buffer, the way megatron-core's DDP lays them out."""
    params = list(module.parameters())
    buffer = torch.cat([p.detach().flatten() for p in params])
    start = 0
    for p in params:
        p.data = buffer[start : start + p.numel()].view(p.shape)
        start += p.numel()
    return buffer


@pytest.mark.parametrize("swapped", [True, False], ids=["swapped", "copied"])
def test_the_reference_is_active_in_the_block_and_the_live_views_come_back(swapped, monkeypatch):
    if not swapped:  # the path of parameters on an accelerator with the reference on the host
        monkeypatch.setattr(reference_weights, "_swappable", lambda param, saved: False)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    buffer = _as_buffer_views(module)
    params = list(module.parameters())
    x = torch.randn(5, 4)
    starting_output = module(x).detach()
    reference = ReferenceWeights(module)
    assert len(reference._swapped if swapped else reference._copied) == len(params)
    with torch.no_grad():
        buffer.add_(1.0)  # a training step, written into the buffer as the distributed optimizer does
    live = buffer.clone()
    pointers = [p.data_ptr() for p in params]

    with reference.active():
        torch.testing.assert_close(module(x), starting_output, rtol=0, atol=0)
        assert ([p.data_ptr() for p in params] != pointers) is swapped  # copied: new values in the same memory
    assert [p.data_ptr() for p in params] == pointers
    assert list(module.parameters()) == params
    if swapped:
        assert torch.equal(buffer, live)  # the swap never writes the buffer
    with torch.no_grad():
        buffer.add_(1.0)  # still views: the buffer's next update reaches the module
    assert torch.equal(torch.cat([p.detach().flatten() for p in params]), live + 1.0)


# --------------------------------------------------------------- the Megatron worker, in process


def _rows(lengths: tuple[int, ...] = LENGTHS) -> dict[str, torch.Tensor]:
    width = max(lengths)
    real = torch.arange(width) < torch.tensor(lengths)[:, None]
    ids = torch.where(real, torch.randint(3, 500, real.shape, generator=torch.Generator().manual_seed(0)), 0)
    return {"input_ids": ids, "loss_mask": real.long(), "input_lengths": torch.tensor(lengths)}


def _micro_batches(rows: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{k: v[i : i + 2] for k, v in rows.items()} for i in range(0, len(LENGTHS), 2)]


def _scoring(rows: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return _micro_batches({"input_ids": rows["input_ids"]})


def _new_worker():
    from nemo_rl.models.builtin_models import resolve_model_path
    from nemo_rl.models.policy.megatron_policy_worker import MegatronPolicyWorker, end_distributed_world

    end_distributed_world()  # a world another test left
    cfg = sft_config().policy
    return MegatronPolicyWorker.in_process(cfg, resolve_model_path(cfg.model_name), seed=0, init_reference_model=True)


def _two_steps(reference_pass: bool) -> dict[str, torch.Tensor]:
    """A new worker's parameters after two training steps, with or without a reference pass between them."""
    rows = _rows()
    worker = _new_worker()
    try:
        worker.train_step(_micro_batches(rows), NLLLoss())
        if reference_pass:
            worker.get_logprobs(_scoring(rows), reference=True)
        worker.train_step(_micro_batches(rows), NLLLoss())
        return {name: p.detach().clone() for name, p in worker.model.module.named_parameters()}
    finally:
        worker.shutdown()


def test_training_after_a_reference_pass_is_bitwise_training_without_it():
    """Two workers of their own (one lives at a time: this test runs before the module's worker starts)."""
    without, with_reference = _two_steps(False), _two_steps(True)
    assert without.keys() == with_reference.keys()
    for name, value in without.items():
        assert torch.equal(with_reference[name], value), name


@pytest.fixture(scope="module")
def worker():
    """One step from its reference, the starting weights' log-probs kept."""
    worker = _new_worker()
    worker.starting_logprobs = worker.get_logprobs(_scoring(_rows()))
    worker.train_step(_micro_batches(_rows()), NLLLoss())
    yield worker
    worker.shutdown()


def _buffer_storage(worker) -> int:
    """The storage of megatron-core's DDP parameter buffer (every parameter a view into it)."""
    (storage,) = {bucket.param_data.untyped_storage().data_ptr() for bucket in worker.model.buffers[0].buckets}
    return storage


def test_the_reference_pass_scores_the_start_and_moves_no_parameter(worker):
    rows = _rows()
    assert not worker.reference._copied  # on CPU every parameter is swapped
    params = dict(worker.model.module.named_parameters())
    pointers = {name: p.data_ptr() for name, p in params.items()}
    assert {p.untyped_storage().data_ptr() for p in params.values()} == {_buffer_storage(worker)}
    buffers = [bucket.param_data.clone() for bucket in worker.model.buffers[0].buckets]
    live = worker.get_logprobs(_scoring(rows))
    assert not torch.equal(live, worker.starting_logprobs)

    assert torch.equal(worker.get_logprobs(_scoring(rows), reference=True), worker.starting_logprobs)
    assert dict(worker.model.module.named_parameters()) == params  # the same Parameter objects
    assert {name: p.data_ptr() for name, p in params.items()} == pointers  # the same views of the buffer
    for bucket, before in zip(worker.model.buffers[0].buckets, buffers, strict=True):
        assert torch.equal(bucket.param_data, before)
    assert torch.equal(worker.get_logprobs(_scoring(rows)), live)


def test_the_combined_call_is_the_two_calls_bit_for_bit(worker):
    microbatches = _scoring(_rows())
    (policy, reference), seconds = worker.get_logprobs_with_reference(microbatches)
    assert torch.equal(policy, worker.get_logprobs(microbatches))
    assert torch.equal(reference, worker.get_logprobs(microbatches, reference=True))
    assert not torch.equal(policy, reference)
    assert seconds.keys() == {"policy", "reference"} and min(seconds.values()) > 0


def _policy_over(worker, *overrides: str):
    """``Policy``'s batch splitting and result ordering over the in-process worker (one DP rank, no Ray)."""
    from nemo_rl.distributed.parallel_dims import ParallelDims
    from nemo_rl.models.policy.lm_policy import Policy

    policy = Policy.__new__(Policy)
    policy.cfg = sft_config(*overrides).policy
    policy.rows_per_sample = 1
    policy.dims = ParallelDims.for_world(policy.cfg, 1)
    policy.worker_info = [worker.info()]
    policy._dp_reporters = {0: 0}
    policy.worker_group = SimpleNamespace(run_each=lambda method, args: [getattr(worker, method)(*a) for a in args])
    return policy


@pytest.mark.parametrize(
    "layout",
    [
        ("policy.dynamic_batching.enabled=false",),
        ("policy.dynamic_batching.enabled=true", "policy.dynamic_batching.logprob_mb_tokens=1024"),
    ],
    ids=["fixed", "token_budget"],
)
def test_the_policy_combined_call_is_its_two_calls_bit_for_bit(worker, layout):
    policy = _policy_over(worker, *layout)
    rows = _rows(BUDGET_LENGTHS)
    scored = policy.get_logprobs_with_reference(rows, micro_batch_size=2)
    assert torch.equal(scored.policy, policy.get_logprobs(rows, micro_batch_size=2))
    assert torch.equal(scored.reference, policy.get_logprobs(rows, micro_batch_size=2, reference=True))
    assert scored.policy.shape == rows["input_ids"].shape
    assert scored.seconds.keys() == {"policy", "reference"}
