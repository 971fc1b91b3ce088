"""ParallelDims: the derived sizes of a layout, its checks' messages, and the config rules that read it.

Also the lenient build those rules run over: they keep reporting when an
unrelated field is invalid, stay silent when their own input is, and a rule
that reads a name which is no field (a renamed key) fails loudly.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from nemo_rl.config.loader import load_config, resolve_config
from nemo_rl.config.schema import SFTMasterConfig, UnsetField, validate_master, validate_sft_config
from nemo_rl.distributed.parallel_dims import ParallelDims, pipeline_stage_layers
from nemo_rl.models.megatron.parallel_weights import ShardLayout
from nemo_rl.utils.errors import ConfigError

SFT_YAML = Path(__file__).resolve().parents[2] / "examples" / "configs" / "sft.yaml"
_BASE = resolve_config(load_config(SFT_YAML))


@pytest.fixture
def raw() -> dict:
    return copy.deepcopy(_BASE)


def errors_of(resolved: dict, rules=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_master(SFTMasterConfig, resolved, rules) if rules else validate_sft_config(resolved)
    return info.value.messages


def _layout(raw: dict, dims: ParallelDims, packing: bool = False) -> dict:
    raw["cluster"].update(gpus_per_node=dims.world_size, num_nodes=1)
    raw["policy"]["megatron_cfg"].update(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        context_parallel_size=dims.cp,
        sequence_parallel=dims.sequence_parallel,
    )
    raw["policy"]["sequence_packing"]["enabled"] = packing
    return raw


# ----------------------------------------------------------------------------
# derived sizes
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dims", "model_parallel", "dp", "dp_cp", "multiple"),
    [
        (ParallelDims(), 1, 1, 1, 1),
        (ParallelDims(8), 1, 8, 8, 1),
        (ParallelDims(8, tp=2), 2, 4, 4, 1),
        (ParallelDims(8, tp=2, sequence_parallel=True), 2, 4, 4, 2),
        (ParallelDims(8, pp=4), 4, 2, 2, 1),
        (ParallelDims(8, cp=2), 2, 4, 8, 4),
        (ParallelDims(16, tp=2, pp=2, cp=2, sequence_parallel=True), 8, 2, 4, 8),
        (ParallelDims(4, tp=4, sequence_parallel=True), 4, 1, 1, 4),
    ],
)
def test_derived_sizes(dims, model_parallel, dp, dp_cp, multiple):
    assert (dims.model_parallel_size, dims.dp, dims.dp_cp, dims.sequence_multiple) == (
        model_parallel,
        dp,
        dp_cp,
        multiple,
    )


def test_data_parallel_size_of_a_world_that_does_not_divide_is_an_error():
    with pytest.raises(ValueError, match=r"gpus_per_node \* num_nodes = 3 is not divisible"):
        _ = ParallelDims(3, tp=2).dp


def test_pipeline_stages_split_the_layers_evenly():
    assert [pipeline_stage_layers(8, 4, rank) for rank in range(4)] == [
        range(0, 2),
        range(2, 4),
        range(4, 6),
        range(6, 8),
    ]
    assert ShardLayout.of(ParallelDims(8, tp=2, pp=2), tp_rank=1, pp_rank=1) == ShardLayout(2, 2, 1, 1)
    assert ShardLayout.of(ParallelDims(8, tp=2, pp=2), 0, 1).stage_layers(8) == range(4, 8)
    with pytest.raises(ValueError) as info:
        pipeline_stage_layers(6, 4, 0)
    assert str(info.value) == (
        "policy.megatron_cfg.pipeline_model_parallel_size=4 does not divide the model's 6 layers; use a divisor of 6"
    )


# ----------------------------------------------------------------------------
# checks and their messages
# ----------------------------------------------------------------------------
def test_world_size_check():
    assert ParallelDims(8, tp=2, pp=2, cp=2).world_size_errors() == []
    assert ParallelDims(6, tp=4).world_size_errors() == [
        "cluster: gpus_per_node * num_nodes = 6 is not divisible by tensor * pipeline * context parallel size = 4 "
        "(policy.megatron_cfg.tensor_model_parallel_size, policy.megatron_cfg.pipeline_model_parallel_size, "
        "policy.megatron_cfg.context_parallel_size)"
    ]


def test_sequence_parallel_check():
    assert ParallelDims(2, tp=2, sequence_parallel=True).sequence_parallel_errors() == []
    assert ParallelDims(2, sequence_parallel=True).sequence_parallel_errors() == [
        "policy.megatron_cfg.sequence_parallel: true needs policy.megatron_cfg.tensor_model_parallel_size > 1 "
        "(it splits activations over the TP ranks); set it to false or raise tensor_model_parallel_size"
    ]


def test_context_parallel_packing_check():
    assert ParallelDims(2, cp=2).packing_errors(packing=True) == []
    assert ParallelDims(2).packing_errors(packing=False) == []
    assert ParallelDims(4, cp=4).packing_errors(packing=False) == [
        "policy.megatron_cfg.context_parallel_size: 4 needs sequence packing (each rank holds chunks of every "
        "packed sample, as in megatron-core); set policy.sequence_packing.enabled=true"
    ]


@pytest.mark.parametrize(
    ("dims", "divisible_by", "expected"),
    [
        (ParallelDims(4, tp=4, sequence_parallel=True), 8, None),
        (
            ParallelDims(4, tp=4, sequence_parallel=True),
            6,
            "policy.make_sequence_length_divisible_by: 6 must be a multiple of 4 (tensor_model_parallel_size (4) "
            "with sequence_parallel); the smallest valid value is 4, the nearest above yours 8",
        ),
        (
            ParallelDims(4, cp=4),
            12,
            "policy.make_sequence_length_divisible_by: 12 must be a multiple of 8 (2 x context_parallel_size (4)); "
            "the smallest valid value is 8, the nearest above yours 16",
        ),
        (ParallelDims(8, tp=2, cp=2), 4, None),  # without SP only CP splits the sequence
    ],
)
def test_sequence_length_check_names_the_valid_values(dims, divisible_by, expected):
    assert dims.sequence_length_errors(divisible_by) == ([expected] if expected else [])


# ----------------------------------------------------------------------------
# from the typed config, and agreement with its validation
# ----------------------------------------------------------------------------
def test_from_config_reads_the_megatron_layout(raw):
    cfg = validate_sft_config(_layout(raw, ParallelDims(4, tp=2, sequence_parallel=True)))
    assert ParallelDims.from_config(cfg.policy, cfg.cluster) == ParallelDims(4, tp=2, sequence_parallel=True)


def test_the_dtensor_backend_is_data_parallel_whatever_megatron_cfg_says(raw):
    raw["policy"]["hf_config_overrides"] = None
    raw["policy"]["dtensor_cfg"]["enabled"] = True
    raw["policy"]["megatron_cfg"]["enabled"] = False
    cfg = validate_sft_config(raw)
    megatron_cfg = cfg.policy.megatron_cfg.model_copy(update={"tensor_model_parallel_size": 2})
    policy = cfg.policy.model_copy(update={"megatron_cfg": megatron_cfg})
    assert ParallelDims.for_world(policy, 4) == ParallelDims(4)


@pytest.mark.parametrize(
    ("dims", "packing", "divisible_by"),
    [
        (ParallelDims(3, tp=2), False, 8),
        (ParallelDims(2, sequence_parallel=True), False, 8),
        (ParallelDims(4, cp=2), False, 8),
        (ParallelDims(4, tp=4, sequence_parallel=True), False, 2),
        (ParallelDims(8, tp=2, cp=2, sequence_parallel=True), False, 4),
    ],
)
def test_config_validation_reports_exactly_the_layout_checks(raw, dims, packing, divisible_by):
    raw = _layout(raw, dims, packing)
    raw["policy"]["make_sequence_length_divisible_by"] = divisible_by
    raw["policy"]["train_micro_batch_size"] = raw["sft"]["val_micro_batch_size"] = 1
    expected = (
        dims.world_size_errors()
        + dims.sequence_parallel_errors()
        + dims.packing_errors(packing)
        + dims.sequence_length_errors(divisible_by)
    )
    assert expected and errors_of(raw) == expected


def test_batch_rules_use_the_layouts_data_parallel_size(raw):
    dims = ParallelDims(8, tp=2)  # dp 4: a global batch of 8 in micro-batches of 4 needs 16 rows
    errors = errors_of(_layout(raw, dims))
    assert errors[0] == (
        "policy.train_global_batch_size: 8 is not divisible by policy.train_micro_batch_size * data-parallel size = "
        f"4 * {dims.dp}"
    )


# ----------------------------------------------------------------------------
# the lenient build under the rules
# ----------------------------------------------------------------------------
def test_rules_see_every_valid_field_while_another_is_invalid(raw):
    raw["policy"]["precision"] = "fp8"
    raw["sft"]["max_num_stepz"] = raw["sft"].pop("max_num_steps")
    seen = []

    def rule(cfg: SFTMasterConfig) -> list[str]:
        seen.append((ParallelDims.from_config(cfg.policy, cfg.cluster), cfg.sft.val_global_batch_size))
        return ["the rule ran"]

    assert errors_of(raw, (rule,))[-1] == "the rule ran"
    assert seen == [(ParallelDims(), 8)]


def test_a_rule_whose_own_input_is_invalid_stays_silent(raw):
    raw["cluster"]["gpus_per_node"] = "4"  # the layout's input
    raw["policy"]["train_micro_batch_size"] = 3  # a batch rule that needs no layout still reports
    assert errors_of(raw) == [
        "cluster.gpus_per_node: Input should be a valid integer (got '4')",
        "policy.train_global_batch_size: 8 is not divisible by policy.train_micro_batch_size = 3",
    ]


def test_an_invalid_field_is_unset_not_its_default(raw):
    raw["policy"]["logprob_batch_size"] = "big"  # the field defaults to None

    def rule(cfg: SFTMasterConfig) -> list[str]:
        return [f"read {cfg.policy.logprob_batch_size}"]

    assert errors_of(raw, (rule,)) == ["policy.logprob_batch_size: Input should be a valid integer (got 'big')"]


def test_reading_an_unset_field_raises_unset_field(raw):
    raw["policy"]["precision"] = "fp8"
    caught = []

    def rule(cfg: SFTMasterConfig) -> list[str]:
        try:
            _ = cfg.policy.precision
        except UnsetField as err:
            caught.append(err)
        return []

    errors_of(raw, (rule,))
    assert len(caught) == 1 and isinstance(caught[0], AttributeError)


@pytest.mark.parametrize("invalid_elsewhere", [False, True])
def test_a_rule_reading_a_name_that_is_no_field_fails_loudly(raw, invalid_elsewhere):
    """What a renamed field leaves behind in a rule is an error, not a rule that silently never fires."""
    if invalid_elsewhere:
        raw["policy"]["precision"] = "fp8"

    def stale_rule(cfg: SFTMasterConfig) -> list[str]:
        return [] if cfg.policy.megatron_cfg.tensor_parallel_size == 1 else ["never"]

    with pytest.raises(AttributeError) as info:
        validate_master(SFTMasterConfig, raw, (stale_rule,))
    assert not isinstance(info.value, UnsetField)
    assert "tensor_parallel_size" in str(info.value)


def test_process_groups_are_checked_against_the_layout(megatron_single_process):
    from nemo_rl.models.policy.megatron_policy_worker import check_dims_match_process_groups

    check_dims_match_process_groups(ParallelDims())
    with pytest.raises(RuntimeError, match="megatron-core built process groups of sizes"):
        check_dims_match_process_groups(ParallelDims(2))
