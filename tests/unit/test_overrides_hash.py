"""The converted-checkpoint cache key: same meaning -> same hash, different meaning -> different hash."""

from __future__ import annotations

import re

import pytest

from nemo_rl.rope.canonical import canonical_overrides_json, overrides_hash
from nemo_rl.utils.errors import ConfigError
from tests.helpers import yarn_block

BASE_YARN = yarn_block()

# Checked by hand: hashlib.sha256(CANONICAL_BASE.encode()).hexdigest()
CANONICAL_BASE = (
    '{"rope_scaling":{"beta_fast":32,"beta_slow":1,"factor":4,"mscale":1,"mscale_all_dim":0,'
    '"original_max_position_embeddings":256,"rope_theta":10000,"rope_type":"yarn","truncate":true}}'
)
HASH_BASE = "2696d28a18f8"  # 2696d28a18f8765ba9fdd7269445cd5165de0d178345621cfdf622d2f83734b3

GUIDE_64K = {
    "max_position_embeddings": 65536,
    "rope_scaling": {
        "rope_type": "yarn",
        "rope_theta": 1000000,
        "factor": 1.6,
        "original_max_position_embeddings": 40960,
        "truncate": True,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1,
        "mscale_all_dim": 0,
    },
}
HASH_GUIDE_64K = "3cfdb4094dbd"  # 3cfdb4094dbda878445045f6b9d7591d0416d85e82e57e30da714217deca75b5


def test_known_canonical_json_and_hash():
    assert canonical_overrides_json({"rope_scaling": BASE_YARN}) == CANONICAL_BASE
    assert overrides_hash({"rope_scaling": BASE_YARN}) == HASH_BASE


def test_known_hash_with_a_non_integral_factor_and_a_top_level_key():
    assert overrides_hash(GUIDE_64K) == HASH_GUIDE_64K


def test_empty_and_none_share_the_documented_hash():
    assert canonical_overrides_json(None) == canonical_overrides_json({}) == "{}"
    assert overrides_hash(None) == overrides_hash({}) == "44136fa355b3"


def test_hash_is_12_lowercase_hex_digits():
    for overrides in (None, {"rope_scaling": BASE_YARN}, GUIDE_64K):
        assert re.fullmatch(r"[0-9a-f]{12}", overrides_hash(overrides))


def test_int_and_integral_float_hash_the_same():
    as_floats = {k: float(v) if type(v) is int else v for k, v in BASE_YARN.items()}
    as_ints = {**BASE_YARN, "factor": 4}
    assert overrides_hash({"rope_scaling": as_floats}) == overrides_hash({"rope_scaling": as_ints}) == HASH_BASE


def test_bools_are_not_normalised_to_numbers():
    assert overrides_hash({"x": True}) != overrides_hash({"x": 1})
    assert canonical_overrides_json({"x": True}) == '{"x":true}'


def test_key_order_is_irrelevant():
    reversed_block = dict(reversed(list(BASE_YARN.items())))
    reordered = {"rope_scaling": reversed_block, "a": {"z": 1, "b": [2.0, {"y": 1, "x": 2}]}}
    ordered = {"a": {"b": [2, {"x": 2, "y": 1}], "z": 1}, "rope_scaling": BASE_YARN}
    assert overrides_hash(reordered) == overrides_hash(ordered)


def test_rope_parameters_and_type_alias_hash_like_rope_scaling():
    legacy = {k: v for k, v in BASE_YARN.items() if k != "rope_type"} | {"type": "yarn"}
    assert overrides_hash({"rope_parameters": BASE_YARN}) == HASH_BASE
    assert overrides_hash({"rope_scaling": legacy}) == HASH_BASE
    assert overrides_hash({"rope_parameters": legacy}) == HASH_BASE
    assert overrides_hash({"rope_scaling": BASE_YARN, "rope_parameters": BASE_YARN}) == HASH_BASE


def test_conflicting_spellings_cannot_be_hashed():
    with pytest.raises(ConfigError, match="rope_scaling and rope_parameters"):
        overrides_hash({"rope_scaling": BASE_YARN, "rope_parameters": {**BASE_YARN, "factor": 8.0}})


@pytest.mark.parametrize(
    "change",
    [{"factor": 4.5}, {"factor": 8}, {"truncate": False}, {"beta_fast": 16}, {"rope_theta": 500000}],
)
def test_any_changed_value_changes_the_hash(change):
    assert overrides_hash({"rope_scaling": {**BASE_YARN, **change}}) != HASH_BASE


def test_an_added_top_level_key_changes_the_hash():
    assert overrides_hash({"rope_scaling": BASE_YARN, "sliding_window": None}) != HASH_BASE


def test_non_finite_numbers_are_refused():
    with pytest.raises(ValueError):
        canonical_overrides_json({"rope_scaling": {**BASE_YARN, "factor": float("nan")}})
