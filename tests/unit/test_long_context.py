"""nemo_rl.models.long_context: context extension of a live HF model, its refusals and its receipt.

Models are tiny, built from configs with random weights (nothing is downloaded).
``initializer_range`` is raised so that attention logits are far from zero and a
RoPE change shows up in the output logits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from nemo_rl.models.long_context import (
    QUADRATIC_ATTENTION_MAX_TOKENS,
    RECEIPT_NAME,
    REFERENCES,
    YARN_STABLE_BAND,
    LongContextConfig,
    apply_rope_scaling,
    check_attention_for_context,
    select_attention_implementation,
    verify_receipt,
    write_receipt,
)
from nemo_rl.rope.blocks import YarnScaling
from nemo_rl.rope.reference import rope_frequencies
from nemo_rl.utils.errors import ConfigError

WINDOW = 64
THETA = 10000.0
HEAD_DIM = 8  # hidden 32 / 4 heads


def qwen2_config(max_pos: int = WINDOW, **kwargs) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
        initializer_range=0.5,
        **kwargs,
    )


def tiny_qwen2(max_pos: int = WINDOW, **kwargs) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(qwen2_config(max_pos, **kwargs)).eval()


def tiny_llama31() -> LlamaForCausalLM:
    """Llama 3.1 shape in miniature: ships llama3 RoPE scaling with factor 8."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=128,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    return LlamaForCausalLM(config).eval()


def tiny_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=WINDOW,
            rope_parameters={"rope_type": "default", "rope_theta": THETA, "mrope_section": [1, 1, 2]},
            bos_token_id=0,
            eos_token_id=1,
        ),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2),
    )
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 96, (1, 3 * WINDOW), generator=torch.Generator().manual_seed(1))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def fresh_reference(model):
    """An independent model: constructed directly from the patched config, same weights."""
    reference = type(model)(type(model.config).from_dict(model.config.to_dict())).eval()
    reference.load_state_dict(model.state_dict())
    return reference


# ----------------------------------------------------------------------------
# The forward pass really changes
# ----------------------------------------------------------------------------
def test_yarn_changes_forward_and_matches_a_model_built_from_the_patched_config(tokens):
    model = tiny_qwen2()
    before = logits(model, tokens)

    receipt = apply_rope_scaling(model, LongContextConfig("yarn", 4.0))

    after = logits(model, tokens)
    beyond = slice(WINDOW, None)
    assert (after[:, beyond] - before[:, beyond]).abs().max() > 1e-2
    torch.testing.assert_close(after, logits(fresh_reference(model), tokens), rtol=0, atol=0)
    # ... and the rotary module computes exactly what rope_scaling's reference math says.
    rotary = model.model.rotary_emb
    expected_inv_freq, expected_factor = rope_frequencies(model.config.rope_parameters, HEAD_DIM)
    torch.testing.assert_close(rotary.inv_freq.double(), expected_inv_freq, rtol=1e-6, atol=0)
    yarn = YarnScaling.from_dict(receipt["long_context"]["rope_block"])
    assert rotary.attention_scaling == pytest.approx(expected_factor) == pytest.approx(yarn.attention_factor)
    assert rotary.rope_type == "yarn"
    assert rotary.max_seq_len_cached == 4 * WINDOW
    assert receipt["long_context"]["rotary_modules"] == ["model.rotary_emb"]


def test_patching_the_config_alone_would_not_change_the_forward_pass(tokens):
    """Why apply_rope_scaling rebuilds the rotary modules: they cache inv_freq at construction."""
    model = tiny_qwen2()
    before = logits(model, tokens)
    model.config.rope_parameters = LongContextConfig("yarn", 4.0).rope_block(model.config)
    torch.testing.assert_close(logits(model, tokens), before, rtol=0, atol=0)


def test_llava_text_config_and_its_rotary_module_are_patched(tokens):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=WINDOW,
            rope_parameters={"rope_type": "default", "rope_theta": THETA},
            initializer_range=0.5,
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        image_token_index=95,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    before = logits(model, tokens)

    receipt = apply_rope_scaling(model, LongContextConfig("yarn", 4.0))

    assert receipt["long_context"]["patched_configs"] == ["config.text_config"]
    assert model.config.text_config.rope_parameters["rope_type"] == "yarn"
    assert model.config.text_config.rope_parameters["rope_theta"] == THETA
    assert model.config.text_config.max_position_embeddings == 4 * WINDOW
    after = logits(model, tokens)
    assert (after[:, WINDOW:] - before[:, WINDOW:]).abs().max() > 1e-2
    torch.testing.assert_close(after, logits(fresh_reference(model), tokens), rtol=0, atol=0)


def test_yarn_block_is_complete_and_keeps_rope_theta():
    model = tiny_qwen2()
    apply_rope_scaling(model, LongContextConfig("yarn", 4.0))
    assert model.config.rope_parameters == {
        "rope_type": "yarn",
        "rope_theta": THETA,
        "factor": 4.0,
        "original_max_position_embeddings": WINDOW,
        "truncate": True,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.0,
    }
    assert model.config.max_position_embeddings == 4 * WINDOW
    # Survives the save/load round trip that drops rope_theta on a partial assignment.
    assert type(model.config).from_dict(model.config.to_dict()).rope_parameters["rope_theta"] == THETA


@pytest.mark.parametrize("method", ["linear", "ntk"])
def test_linear_and_ntk_change_forward_and_keep_rope_theta_semantics(method, tokens):
    model = tiny_qwen2()
    inv_freq_before = model.model.rotary_emb.inv_freq.clone()
    before = logits(model, tokens)

    apply_rope_scaling(model, LongContextConfig(method, 2.0))

    assert (logits(model, tokens)[:, WINDOW:] - before[:, WINDOW:]).abs().max() > 1e-2
    torch.testing.assert_close(logits(model, tokens), logits(fresh_reference(model), tokens), rtol=0, atol=0)
    inv_freq = model.model.rotary_emb.inv_freq
    if method == "linear":
        assert model.config.rope_parameters == {"rope_type": "linear", "rope_theta": THETA, "factor": 2.0}
        torch.testing.assert_close(inv_freq, inv_freq_before / 2.0)
    else:
        torch.testing.assert_close(inv_freq[0], inv_freq_before[0])  # highest frequency untouched
        assert (inv_freq[1:] < inv_freq_before[1:]).all()
    assert model.config.max_position_embeddings == 2 * WINDOW
    assert model.model.rotary_emb.attention_scaling == 1.0


def test_ntk_base_formula():
    model = tiny_qwen2()
    receipt = apply_rope_scaling(model, LongContextConfig("ntk", 3.0))
    d = HEAD_DIM
    expected_theta = THETA * 3.0 ** (d / (d - 2))
    assert model.config.rope_parameters["rope_type"] == "default"
    assert model.config.rope_parameters["rope_theta"] == pytest.approx(expected_theta, rel=1e-12)
    expected = 1.0 / expected_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(), expected, rtol=1e-6, atol=0)
    assert receipt["long_context"]["new_max_position_embeddings"] == 3 * WINDOW
    assert receipt["long_context"]["attn_factor"] == 1.0
    assert LongContextConfig("ntk", 3.0).rope_block(qwen2_config()) == model.config.rope_parameters


def test_explicit_original_window_sets_the_new_window():
    model = tiny_qwen2(max_pos=128)
    receipt = apply_rope_scaling(model, LongContextConfig("yarn", 4.0, original_max_position_embeddings=100))
    assert model.config.max_position_embeddings == 400
    assert model.config.rope_parameters["original_max_position_embeddings"] == 100
    assert receipt["long_context"]["original_max_position_embeddings"] == 100


# ----------------------------------------------------------------------------
# Nested text_config (VLMs)
# ----------------------------------------------------------------------------
def test_vlm_text_config_and_its_rotary_module_are_patched():
    model = tiny_qwen2_vl()
    text_config = model.config.text_config
    rotary = model.model.language_model.rotary_emb
    vision_inv_freq = model.model.visual.rotary_pos_emb.inv_freq.clone()
    old_inv_freq = rotary.inv_freq.clone()

    receipt = apply_rope_scaling(model, LongContextConfig("yarn", 4.0))

    assert text_config is model.config.text_config and rotary.config is text_config
    assert text_config.rope_parameters["rope_type"] == "yarn"
    assert text_config.rope_parameters["rope_theta"] == THETA
    assert text_config.rope_parameters["mrope_section"] == [1, 1, 2]  # architecture key kept
    assert text_config.max_position_embeddings == 4 * WINDOW
    assert not torch.equal(rotary.inv_freq, old_inv_freq)
    reference = type(rotary)(type(text_config).from_dict(text_config.to_dict()))
    torch.testing.assert_close(rotary.inv_freq, reference.inv_freq, rtol=0, atol=0)
    assert rotary.attention_scaling == reference.attention_scaling > 1
    assert rotary.mrope_section == [1, 1, 2]
    torch.testing.assert_close(model.model.visual.rotary_pos_emb.inv_freq, vision_inv_freq, rtol=0, atol=0)
    # transformers 5 keeps no RoPE on the Qwen2-VL top-level config: only the language config carries it.
    assert receipt["long_context"]["patched_configs"] == ["config.text_config"]
    assert receipt["long_context"]["rotary_modules"] == ["model.language_model.rotary_emb"]


def test_top_level_and_nested_text_config_are_both_patched():
    model = tiny_qwen2()
    model.config.text_config = qwen2_config()  # e.g. a MoE/VLM config that carries RoPE at both levels
    receipt = apply_rope_scaling(model, LongContextConfig("linear", 2.0))
    for config in (model.config, model.config.text_config):
        assert config.rope_parameters == {"rope_type": "linear", "rope_theta": THETA, "factor": 2.0}
        assert config.max_position_embeddings == 2 * WINDOW
    assert receipt["long_context"]["patched_configs"] == ["config", "config.text_config"]


def test_rotary_module_reading_an_unpatched_copy_is_refused():
    model = tiny_qwen2()
    model.model.rotary_emb.config = qwen2_config()  # a copy, not model.config
    with pytest.raises(RuntimeError, match="model.rotary_emb"):
        apply_rope_scaling(model, LongContextConfig("yarn", 4.0))
    assert model.config.rope_parameters["rope_type"] == "default"


# ----------------------------------------------------------------------------
# Compounding and the stable band
# ----------------------------------------------------------------------------
def test_compounding_is_refused_naming_both_factors_and_leaves_the_model_untouched():
    model = tiny_llama31()
    before = dict(model.config.rope_parameters)
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    with pytest.raises(ConfigError) as err:
        apply_rope_scaling(model, LongContextConfig("yarn", 4.0))
    message = str(err.value)
    assert "llama3" in message and "factor 8" in message and "32x" in message and "allow_compounding" in message
    assert model.config.rope_parameters == before
    assert model.config.max_position_embeddings == 128
    assert torch.equal(model.model.rotary_emb.inv_freq, inv_freq)


def test_compounding_with_the_flag_applies_the_compounded_factor():
    model = tiny_llama31()
    receipt = apply_rope_scaling(model, LongContextConfig("yarn", 4.0, allow_compounding=True))
    block = receipt["long_context"]
    assert block["factor"] == 32.0 and block["compounded_from_factor"] == 8.0
    assert block["original_max_position_embeddings"] == 16  # the pre-extension window of the llama3 block
    assert block["new_max_position_embeddings"] == 512
    assert model.config.rope_parameters["rope_type"] == "yarn"
    assert model.config.rope_parameters["rope_theta"] == 500000.0
    assert model.model.rotary_emb.rope_type == "yarn"
    assert model.model.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(32) + 1)


def test_applying_twice_counts_as_compounding():
    model = tiny_qwen2()
    apply_rope_scaling(model, LongContextConfig("yarn", 4.0))
    with pytest.raises(ConfigError, match="factor 4; extending it by 2 compounds to 8x"):
        apply_rope_scaling(model, LongContextConfig("yarn", 2.0))


def test_yarn_above_the_stable_band_needs_force():
    assert YARN_STABLE_BAND == (4.0, 32.0)
    LongContextConfig("yarn", 32.0)  # the edge is inside
    with pytest.raises(ConfigError, match="stable band.*force=True"):
        LongContextConfig("yarn", 64.0)
    model = tiny_qwen2()
    receipt = apply_rope_scaling(model, LongContextConfig("yarn", 64.0, force=True))
    assert receipt["long_context"]["factor"] == 64.0
    LongContextConfig("linear", 64.0)  # the band is YaRN's


def test_compounded_factor_is_checked_against_the_band():
    with pytest.raises(ConfigError, match=r"compounded factor \(8 x 8\) = 64"):
        apply_rope_scaling(tiny_llama31(), LongContextConfig("yarn", 8.0, allow_compounding=True))
    receipt = apply_rope_scaling(tiny_llama31(), LongContextConfig("yarn", 8.0, allow_compounding=True, force=True))
    assert receipt["long_context"]["factor"] == 64.0


# ----------------------------------------------------------------------------
# Invalid requests
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [1.0, 1, 0.5, 0, -2.0])
def test_factor_must_extend(factor):
    with pytest.raises(ConfigError, match="factor: must be > 1"):
        LongContextConfig("yarn", factor)


@pytest.mark.parametrize("factor", [float("nan"), float("inf"), True, "4"])
def test_factor_must_be_a_finite_number(factor):
    with pytest.raises(ConfigError, match="factor: must be a finite number"):
        LongContextConfig("linear", factor)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "dynamic", "factor": 2.0}, "method: expected one of yarn, ntk, linear"),
        ({"method": "yarn", "factor": 2.0, "original_max_position_embeddings": 0}, "original_max_position_embeddings"),
        ({"method": "linear", "factor": 2.0, "beta_fast": 16}, "beta_fast: a YaRN knob"),
        ({"method": "ntk", "factor": 2.0, "truncate": False}, "truncate: a YaRN knob"),
    ],
)
def test_invalid_requests(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LongContextConfig(**kwargs)


def test_invalid_yarn_knobs_are_reported_by_rope_scaling():
    with pytest.raises(ConfigError, match="beta_fast: must be > beta_slow"):
        LongContextConfig("yarn", 4.0, beta_fast=1.0, beta_slow=2.0).rope_block(qwen2_config())


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LongContextConfig("yarn", 4.0).factor = 8.0


# ----------------------------------------------------------------------------
# Attention implementation
# ----------------------------------------------------------------------------
FA2, FA3 = "flash_attention_2", "flash_attention_3"


@pytest.mark.parametrize(
    "capability, available, expected",
    [
        ((9, 0), {FA2, FA3, "sdpa"}, FA3),
        ((9, 0), {FA2, "sdpa"}, FA2),
        ((9, 0), {"sdpa"}, "sdpa"),
        ((8, 0), {FA2, FA3, "sdpa"}, FA2),
        ((8, 6), {FA2}, FA2),
        ((8, 0), {FA3}, "sdpa"),
        ((10, 0), {FA2, FA3}, FA2),
        ((7, 5), {FA2, FA3}, "sdpa"),
        (None, {FA2, FA3}, "sdpa"),
    ],
)
def test_attention_selection_matrix(capability, available, expected):
    assert select_attention_implementation(capability, available) == expected


def test_attention_selection_detects_installed_implementations_on_cpu():
    assert select_attention_implementation(None) == "sdpa"
    assert select_attention_implementation((7, 0)) == "sdpa"
    with pytest.raises(ValueError, match="major, minor"):
        select_attention_implementation((9,), set())


def test_quadratic_attention_refused_beyond_16k():
    check_attention_for_context("eager", QUADRATIC_ATTENTION_MAX_TOKENS)
    check_attention_for_context("sdpa", 1 << 20)
    with pytest.raises(ConfigError, match="sdpa.*flash_attention_2"):
        check_attention_for_context("eager", QUADRATIC_ATTENTION_MAX_TOKENS + 1)


def test_apply_refuses_eager_beyond_16k_and_leaves_the_model_untouched():
    model = tiny_qwen2(max_pos=8192, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="'eager' is memory-quadratic.*32768.*'sdpa'"):
        apply_rope_scaling(model, LongContextConfig("yarn", 4.0))
    assert model.config.rope_parameters["rope_type"] == "default"
    assert model.config.max_position_embeddings == 8192

    model.config._attn_implementation = "sdpa"
    receipt = apply_rope_scaling(model, LongContextConfig("yarn", 4.0))
    assert receipt["long_context"]["attn_implementation"] == "sdpa"
    # eager within 16k is fine
    apply_rope_scaling(tiny_qwen2(attn_implementation="eager"), LongContextConfig("yarn", 4.0))


# ----------------------------------------------------------------------------
# Receipt
# ----------------------------------------------------------------------------
def _independent_sha256(block) -> str:
    """The documented recipe: integral floats as ints, sorted keys, compact separators."""

    def canonical(value):
        if isinstance(value, dict):
            return {k: canonical(v) for k, v in value.items()}
        if isinstance(value, list):
            return [canonical(v) for v in value]
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    text = json.dumps(canonical(block), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def test_receipt_fields_and_hash():
    receipt = apply_rope_scaling(tiny_qwen2(), LongContextConfig("yarn", 4.0))
    assert set(receipt) == {"long_context", "sha256"}
    block = receipt["long_context"]
    assert block["method"] == "yarn"
    assert block["factor"] == 4.0
    assert block["original_max_position_embeddings"] == WINDOW
    assert block["new_max_position_embeddings"] == 4 * WINDOW
    assert block["attn_factor"] == pytest.approx(0.1 * math.log(4) + 1)
    assert (block["beta_fast"], block["beta_slow"]) == (32, 1)
    assert block["papers"] == list(REFERENCES) == ["arXiv:2309.00071", "arXiv:2306.15595"]
    assert block["compounded_from_factor"] is None
    assert receipt["sha256"] == _independent_sha256(block)


def test_receipt_of_linear_has_no_yarn_knobs():
    block = apply_rope_scaling(tiny_qwen2(), LongContextConfig("linear", 2.0))["long_context"]
    assert block["beta_fast"] is None and block["beta_slow"] is None and block["attn_factor"] == 1.0


def test_write_and_verify_receipt(tmp_path):
    receipt = apply_rope_scaling(tiny_qwen2(), LongContextConfig("yarn", 4.0))
    path = write_receipt(receipt, tmp_path / "run")
    assert path == tmp_path / "run" / RECEIPT_NAME
    assert verify_receipt(path)
    assert json.loads(path.read_text()) == receipt
    # Seed 002's key names, in its order, as written on disk; the extras follow them.
    written = list(json.loads(path.read_text())["long_context"])
    assert written[:8] == [
        "method",
        "factor",
        "original_max_position_embeddings",
        "new_max_position_embeddings",
        "attn_factor",
        "beta_fast",
        "beta_slow",
        "papers",
    ]
    assert [p.name for p in path.parent.iterdir()] == [RECEIPT_NAME]  # no temp file left behind


@pytest.mark.parametrize(
    "tamper",
    [
        lambda r: r["long_context"].update(factor=8.0),
        lambda r: r["long_context"].update(original_max_position_embeddings=128),
        lambda r: r["long_context"]["papers"].pop(),
        lambda r: r.update(sha256="0" * 64),
        lambda r: r.pop("sha256"),
        lambda r: r.update(extra=1),
    ],
)
def test_tampered_receipt_fails_verification(tmp_path, tamper):
    receipt = apply_rope_scaling(tiny_qwen2(), LongContextConfig("yarn", 4.0))
    path = write_receipt(receipt, tmp_path)
    data = json.loads(path.read_text())
    tamper(data)
    path.write_text(json.dumps(data))
    assert not verify_receipt(path)


def test_verify_receipt_rejects_garbage_and_write_refuses_a_bad_hash(tmp_path):
    bad = tmp_path / RECEIPT_NAME
    bad.write_text("{not json")
    assert not verify_receipt(bad)
    bad.write_text("[]")
    assert not verify_receipt(bad)
    with pytest.raises(FileNotFoundError):
        verify_receipt(tmp_path / "missing.json")
    receipt = apply_rope_scaling(tiny_qwen2(), LongContextConfig("yarn", 4.0))
    receipt["long_context"]["factor"] = 2.0
    with pytest.raises(ValueError, match="sha256 does not match"):
        write_receipt(receipt, tmp_path / "other")
