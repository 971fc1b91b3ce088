"""Every rule nemo_rl.rope applies to `policy.hf_config_overrides`."""

from __future__ import annotations

import pytest

from nemo_rl.rope.blocks import KNOWN_ROPE_TYPES, YarnScaling
from nemo_rl.rope.rules import effective_overrides, validate_long_context, yarn_scaling
from nemo_rl.utils.errors import ConfigError
from tests.helpers import yarn_block

PREFIX = "policy.hf_config_overrides.rope_scaling"
FIELDS = (
    "rope_theta",
    "factor",
    "original_max_position_embeddings",
    "truncate",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
)


yarn = yarn_block


def check(overrides, max_len=1024, megatron=True, dtensor=False):
    return validate_long_context(overrides, max_len, megatron, dtensor)


def only_error(overrides, **kwargs) -> str:
    scaling, errors, _ = check(overrides, **kwargs)
    assert scaling is None
    assert len(errors) == 1, errors
    return errors[0]


# ----------------------------------------------------------------------------
# valid blocks
# ----------------------------------------------------------------------------
def test_valid_block_gives_typed_scaling():
    scaling, errors, notes = check({"rope_scaling": yarn()})
    assert errors == [] and notes == []
    assert scaling == YarnScaling(10000.0, 4.0, 256, True, 32.0, 1.0, 1.0, 0.0)
    assert isinstance(scaling.rope_theta, float) and isinstance(scaling.original_max_position_embeddings, int)


def test_no_overrides_means_no_scaling():
    assert check(None) == (None, [], [])
    assert check({}) == (None, [], [])
    assert check({"sliding_window": 128}) == (None, [], [])
    assert yarn_scaling(None) is None


def test_scaling_is_frozen():
    scaling = YarnScaling.from_dict(yarn())
    with pytest.raises(AttributeError):
        scaling.factor = 2.0


# ----------------------------------------------------------------------------
# required fields
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("field", FIELDS)
def test_each_missing_field_is_named_with_an_example(field):
    block = yarn()
    del block[field]
    message = only_error({"rope_scaling": block})
    assert message.startswith(f"{PREFIX}.{field}: required for rope_type=yarn (e.g. {field}: ")


@pytest.mark.parametrize("field", FIELDS)
def test_null_counts_as_missing(field):
    assert "required" in only_error({"rope_scaling": yarn(**{field: None})})


def test_factor_example_is_the_div_interpolation():
    block = yarn()
    del block["factor"]
    message = only_error({"rope_scaling": block})
    assert (
        "${div:${policy.max_total_sequence_length},"
        "${policy.hf_config_overrides.rope_scaling.original_max_position_embeddings}}" in message
    )


def test_all_missing_fields_are_listed_at_once():
    _, errors, _ = check({"rope_scaling": {"rope_type": "yarn"}})
    assert [e.split(":")[0] for e in errors] == [f"{PREFIX}.{field}" for field in FIELDS]
    with pytest.raises(ConfigError) as info:
        YarnScaling.from_dict({"rope_type": "yarn"})
    assert len(info.value.messages) == len(FIELDS)
    assert str(info.value).count("\n") == len(FIELDS) - 1


# ----------------------------------------------------------------------------
# types
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("truncate", 1, "must be true or false"),
        ("truncate", "true", "must be true or false"),
        ("original_max_position_embeddings", 256.0, "must be an integer"),
        ("original_max_position_embeddings", True, "must be an integer"),
        ("factor", True, "must be a number"),
        ("factor", "4", "must be a finite number"),
        ("factor", float("inf"), "must be a finite number"),
        ("rope_theta", False, "must be a number"),
        ("beta_fast", "32", "must be a finite number"),
        ("beta_slow", [1], "must be a finite number"),
        ("mscale", True, "must be a number"),
        ("mscale_all_dim", "0", "must be a finite number"),
    ],
)
def test_type_checks(field, value, expected):
    assert only_error({"rope_scaling": yarn(**{field: value})}).startswith(f"{PREFIX}.{field}: {expected}")


# ----------------------------------------------------------------------------
# ranges
# ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "field", "expected"),
    [
        ({"factor": 1.0}, "factor", "must be > 1, got 1.0"),
        ({"factor": 0.5}, "factor", "must be > 1, got 0.5"),
        ({"rope_theta": 0}, "rope_theta", "must be > 0"),
        ({"rope_theta": -1.0}, "rope_theta", "must be > 0"),
        ({"original_max_position_embeddings": 0}, "original_max_position_embeddings", "must be > 0"),
        ({"beta_slow": 0}, "beta_slow", "must be > 0"),
        ({"beta_fast": 1}, "beta_fast", "must be > beta_slow (1.0), got 1.0"),
        ({"beta_fast": 0.5}, "beta_fast", "must be > beta_slow"),
        ({"mscale": -0.1}, "mscale", "must be >= 0"),
        ({"mscale_all_dim": -1}, "mscale_all_dim", "must be >= 0"),
    ],
)
def test_range_checks(changes, field, expected):
    # Just past the original window: YaRN must extend (so factor > 1 applies), and a field
    # error stops validation before the coverage rule.
    _, errors, _ = check({"rope_scaling": yarn(**changes)}, max_len=257)
    assert errors[0].startswith(f"{PREFIX}.{field}: {expected}")


def test_zero_mscales_are_allowed():
    scaling, errors, _ = check({"rope_scaling": yarn(mscale=0, mscale_all_dim=0)})
    assert errors == [] and scaling.mscale == 0.0


def test_type_range_and_unknown_problems_are_collected_together():
    block = yarn(truncate="yes", factor=0.5, beta_slow=-1, extra=1)
    del block["mscale"]
    _, errors, _ = check({"rope_scaling": block}, max_len=257)
    assert {e.split(":")[0] for e in errors} == {
        f"{PREFIX}.extra",
        f"{PREFIX}.mscale",
        f"{PREFIX}.truncate",
        f"{PREFIX}.factor",
        f"{PREFIX}.beta_slow",
    }


# ----------------------------------------------------------------------------
# run-level rules
# ----------------------------------------------------------------------------
def test_factor_must_cover_the_sequence_length():
    message = only_error({"rope_scaling": yarn(factor=2.0)}, max_len=1024)
    assert message.startswith(f"{PREFIX}.factor: factor * original_max_position_embeddings = 2.0 * 256 = 512")
    assert "policy.max_total_sequence_length = 1024" in message
    assert "use factor >= 4.0" in message
    assert "${div:${policy.max_total_sequence_length}," in message


def test_coverage_tolerates_float_rounding():
    # 65536 / 40960 = 1.6, and 1.6 * 40960 is not exactly 65536 in binary floating point.
    scaling, errors, _ = check(
        {"rope_scaling": yarn(factor=65536 / 40960, original_max_position_embeddings=40960, rope_theta=1e6)},
        max_len=65536,
    )
    assert errors == [] and scaling.factor == 1.6


def test_larger_factor_than_needed_is_fine():
    assert check({"rope_scaling": yarn(factor=8.0)})[1] == []


@pytest.mark.parametrize("max_len", [256, 128])
def test_no_extension_is_a_note_not_an_error(max_len):
    scaling, errors, notes = check({"rope_scaling": yarn()}, max_len=max_len)
    assert errors == [] and scaling is None  # not applied: nothing to extend
    assert len(notes) == 1
    assert notes[0].startswith(f"{PREFIX}: YaRN is a no-op here")
    assert f"policy.max_total_sequence_length = {max_len} <= original_max_position_embeddings = 256" in notes[0]


def test_no_extension_accepts_the_div_factor_of_one():
    """`${div:256,256}` gives factor 1.0: a no-op, not a `factor > 1` error."""
    scaling, errors, notes = check({"rope_scaling": yarn(factor=1.0)}, max_len=256)
    assert (scaling, errors, len(notes)) == (None, [], 1)
    # ...while other field checks still apply.
    assert "beta_fast" in only_error({"rope_scaling": yarn(factor=1.0, beta_fast=0.5)}, max_len=256)


def test_effective_overrides_drop_a_no_op_block_only():
    other = {"rope_scaling": yarn(), "sliding_window": 64}
    assert effective_overrides(other, 256) == {"sliding_window": 64}
    assert effective_overrides({"rope_scaling": yarn()}, 256) is None
    assert effective_overrides(other, 1024) == other
    assert effective_overrides(None, 1024) is None


@pytest.mark.parametrize(("megatron", "dtensor"), [(True, True), (False, True), (False, False)])
def test_yarn_needs_megatron_and_no_dtensor(megatron, dtensor):
    message = only_error({"rope_scaling": yarn()}, megatron=megatron, dtensor=dtensor)
    assert "only supported on the Megatron backend" in message
    assert "set policy.megatron_cfg.enabled=true and policy.dtensor_cfg.enabled=false" in message


def test_backend_refusal_is_reported_with_field_errors():
    block = yarn()
    del block["beta_fast"]
    _, errors, _ = check({"rope_scaling": block}, megatron=False, dtensor=True)
    assert len(errors) == 2
    assert "Megatron backend" in errors[0] and f"{PREFIX}.beta_fast" in errors[1]


# ----------------------------------------------------------------------------
# spellings
# ----------------------------------------------------------------------------
def test_rope_parameters_spelling_is_accepted():
    scaling, errors, _ = check({"rope_parameters": yarn()})
    assert errors == [] and scaling == YarnScaling.from_dict(yarn())


def test_errors_name_the_spelling_the_recipe_used():
    block = yarn()
    del block["factor"]
    message = only_error({"rope_parameters": block})
    assert message.startswith("policy.hf_config_overrides.rope_parameters.factor: required")
    assert "${policy.hf_config_overrides.rope_parameters.original_max_position_embeddings}" in message


def test_both_spellings_identical_is_fine():
    alias = {k: v for k, v in yarn(factor=4).items() if k != "rope_type"} | {"type": "yarn"}
    scaling, errors, _ = check({"rope_scaling": yarn(), "rope_parameters": alias})
    assert errors == [] and scaling is not None


def test_both_spellings_differing_is_an_error():
    message = only_error({"rope_scaling": yarn(), "rope_parameters": yarn(factor=8.0)})
    assert "both rope_scaling and rope_parameters are set and differ" in message
    with pytest.raises(ConfigError):
        yarn_scaling({"rope_scaling": yarn(), "rope_parameters": yarn(factor=8.0)})


def test_type_is_an_alias_for_rope_type():
    block = yarn()
    del block["rope_type"]
    block["type"] = "yarn"
    scaling, errors, _ = check({"rope_scaling": block})
    assert errors == [] and scaling is not None


def test_type_and_rope_type_disagreeing_is_an_error():
    message = only_error({"rope_scaling": yarn(type="linear")})
    assert "`type` ('linear') and `rope_type` ('yarn') disagree" in message


def test_block_must_be_a_mapping():
    assert only_error({"rope_scaling": "yarn"}).startswith(f"{PREFIX}: must be a mapping")


# ----------------------------------------------------------------------------
# unknown keys and rope types
# ----------------------------------------------------------------------------
def test_unknown_key_names_the_nearest_valid_one():
    message = only_error({"rope_scaling": yarn(beta_fats=32)})
    assert message == f"{PREFIX}.beta_fats: unknown YaRN field (did you mean beta_fast?)"


def test_unknown_key_without_a_close_match_lists_valid_keys():
    message = only_error({"rope_scaling": yarn(attention_factor=1.0)})
    assert message.startswith(f"{PREFIX}.attention_factor: unknown YaRN field (valid keys: rope_type, rope_theta")


def test_misspelt_rope_type_is_refused_with_suggestion():
    message = only_error({"rope_scaling": yarn(rope_type="yarnn")})
    assert message == f"{PREFIX}.rope_type: unknown RoPE type 'yarnn' (did you mean yarn?)"


def test_missing_rope_type_is_an_error():
    block = yarn()
    del block["rope_type"]
    assert only_error({"rope_scaling": block}) == f"{PREFIX}.rope_type: required (e.g. rope_type: yarn)"


@pytest.mark.parametrize(
    "block",
    [
        {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0},
        {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 0.5, "original_max_position_embeddings": 4096},
        {"rope_type": "default", "rope_theta": 1e6},
        {
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        {"type": "linear", "rope_theta": 10000, "factor": 2},
    ],
)
def test_other_rope_types_are_not_blocked(block):
    assert check({"rope_scaling": block}, megatron=False, dtensor=True) == (None, [], [])


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ({"rope_type": "linear", "rope_theta": 1e4, "factor": 0}, "factor: must be > 0"),
        (
            {"rope_type": "dynamic", "rope_theta": 1e4, "factor": -2.0, "original_max_position_embeddings": 64},
            "factor: must be > 0",
        ),
        ({"rope_type": "linear", "rope_theta": 1e4}, "factor: required for rope_type=linear (e.g. factor: 2.0)"),
        (
            {"rope_type": "dynamic", "rope_theta": 1e4, "factor": True, "original_max_position_embeddings": 64},
            "factor: must be a number",
        ),
        ({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, "original_max_position_embeddings: required"),
        ({"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "beta_fast": 32}, "beta_fast: unknown linear field"),
    ],
)
def test_linear_and_dynamic_fields_are_checked(block, expected):
    assert only_error({"rope_scaling": block}).startswith(f"{PREFIX}.{expected}")


@pytest.mark.parametrize("rope_type", ["linear", "default"])
def test_a_block_without_rope_theta_is_refused_because_engines_would_reset_it(rope_type):
    """transformers 5 and vLLM replace the whole block: a missing rope_theta silently becomes 10000."""
    block = {"rope_type": rope_type} | ({"factor": 2.0} if rope_type == "linear" else {})
    message = only_error({"rope_scaling": block})
    assert message.startswith(f"{PREFIX}.rope_theta: required for rope_type={rope_type} (e.g. rope_theta: 1000000")


@pytest.mark.parametrize(
    ("rope_type", "extra"),
    [
        ("dynamic", {"factor": 2.0, "original_max_position_embeddings": 256}),
        ("longrope", {"short_factor": [1.0], "long_factor": [1.0]}),
    ],
)
def test_a_run_refuses_rope_types_megatron_cannot_build_before_anything_starts(rope_type, extra):
    from nemo_rl.rope.megatron_config import megatron_rope_type_errors

    overrides = {"rope_scaling": {"rope_type": rope_type, "rope_theta": 1e4, **extra}}
    (message,) = megatron_rope_type_errors(overrides)
    assert message.startswith(f"{PREFIX}.rope_type: {rope_type!r} cannot be built by megatron-core 0.16")
    assert "Use rope_type: yarn" in message
    assert megatron_rope_type_errors({"rope_scaling": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2}}) == []
    assert megatron_rope_type_errors({"rope_scaling": yarn()}) == []


def test_yarn_scaling_reads_a_valid_block_and_raises_on_an_invalid_one():
    assert yarn_scaling({"rope_scaling": yarn()}).factor == 4.0
    assert yarn_scaling({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}) is None
    with pytest.raises(ConfigError, match="beta_fast"):
        yarn_scaling({"rope_scaling": yarn(beta_fast=None)})


def test_from_dict_refuses_another_rope_type():
    with pytest.raises(ConfigError, match="expected 'yarn', got 'linear'"):
        YarnScaling.from_dict(yarn(rope_type="linear"))


def test_known_rope_types_match_the_installed_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    assert set(KNOWN_ROPE_TYPES) == {"default", *ROPE_INIT_FUNCTIONS}


def test_every_method_has_a_typed_form_that_round_trips():
    from nemo_rl.rope.blocks import (
        DynamicNTKScaling,
        DynamicYarnScaling,
        LinearScaling,
        NTKAwareScaling,
        PlainRope,
        parse_rope_scaling,
    )
    from nemo_rl.rope.canonical import overrides_hash

    blocks = {
        PlainRope: {"rope_type": "default", "rope_theta": 1e6},
        LinearScaling: {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.5},
        DynamicNTKScaling: {
            "rope_type": "dynamic",
            "rope_theta": 1e6,
            "factor": 2.0,
            "original_max_position_embeddings": 4096,
        },
        YarnScaling: yarn(),
        DynamicYarnScaling: yarn(rope_type="dynamic_yarn"),
    }
    for cls, block in blocks.items():
        parsed = parse_rope_scaling(block)
        assert type(parsed) is cls
        assert parsed.to_block() == block
        assert overrides_hash({"rope_scaling": parsed.to_block()}) == overrides_hash({"rope_scaling": block})
    assert parse_rope_scaling({"type": "linear", "rope_theta": 1e6, "factor": 2}) == LinearScaling(1e6, 2.0)
    # static NTK is written as plain RoPE with the base already scaled, the one spelling every engine shares
    ntk = NTKAwareScaling(1e4, 4.0, 128)
    assert parse_rope_scaling(ntk.to_block()) == PlainRope(1e4 * 4.0 ** (128 / 126))
    with pytest.raises(ValueError, match="factor must be > 0"):
        NTKAwareScaling(1e4, 0.0, 128)


def test_parse_rope_scaling_lists_every_problem_and_names_types_without_a_typed_form():
    from nemo_rl.rope.blocks import parse_rope_scaling

    with pytest.raises(ConfigError) as raised:
        parse_rope_scaling({"rope_type": "linear", "factor": -1, "beta_fast": 32})
    assert [line.split(":")[0] for line in str(raised.value).splitlines() if line.startswith(PREFIX)] == [
        f"{PREFIX}.beta_fast",
        f"{PREFIX}.rope_theta",
        f"{PREFIX}.factor",
    ]
    with pytest.raises(ConfigError, match="no typed form for 'longrope'"):
        parse_rope_scaling({"rope_type": "longrope", "factor": 8.0})


def test_llama3_blocks_are_typed_and_megatron_takes_only_llama_3s_own_values():
    """megatron-core 0.16 builds Llama 3's RoPE from the factor alone (low 1, high 4, window 8192 fixed)."""
    from nemo_rl.rope.megatron_config import megatron_rope_type_errors

    llama32 = {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert megatron_rope_type_errors({"rope_scaling": llama32}) == []
    assert check({"rope_scaling": llama32}) == (None, [], [])
    (message,) = megatron_rope_type_errors({"rope_scaling": llama32 | {"high_freq_factor": 8.0}})
    assert message.startswith(f"{PREFIX}.high_freq_factor: 8.0, but megatron-core 0.16 builds")
    errors = check({"rope_scaling": {k: v for k, v in llama32.items() if k != "low_freq_factor"} | {"factor": 0}})[1]
    assert [e.split(":")[0] for e in errors] == [
        f"{PREFIX}.low_freq_factor",
        f"{PREFIX}.factor",
    ]


def test_dynamic_yarn_is_static_yarn_at_each_length():
    from nemo_rl.rope.blocks import DynamicYarnScaling, PlainRope, parse_rope_scaling

    dynamic = parse_rope_scaling(yarn(rope_type="dynamic_yarn", factor=4.0, original_max_position_embeddings=256))
    assert isinstance(dynamic, DynamicYarnScaling)
    assert dynamic.at_length(256) == PlainRope(dynamic.rope_theta)
    assert dynamic.at_length(512) == YarnScaling.from_dict(yarn(factor=2.0, original_max_position_embeddings=256))
    assert dynamic.at_length(10**6).factor == 4.0
    with pytest.raises(ValueError, match="at_length"):
        _ = dynamic.attention_factor
