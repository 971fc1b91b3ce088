"""The committed pre-trained base: its shape, its build report, its cache entry, and that it is a real base model."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, AutoTokenizer

from nemo_rl.evals.long_context import HFGenerator, load_model, passkey_grid
from nemo_rl.models import tiny_base_model
from nemo_rl.models.builtin_models import resolve_model_path
from nemo_rl.models.tiny_base_model import ASSET_DIR, BASE_NAME, BASE_ROPE_THETA, BASE_WINDOW, build_report


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("NEMO_RL_CACHE_DIR", str(tmp_path / "cache"))


def test_the_committed_base_has_the_documented_shape_and_report():
    config = AutoConfig.from_pretrained(ASSET_DIR)
    assert config.max_position_embeddings == BASE_WINDOW == 128
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": BASE_ROPE_THETA}
    assert config.hidden_size // config.num_attention_heads == 64  # vLLM's CPU attention needs head_dim >= 64
    report = build_report()
    assert report["recipe"].endswith("sft-tiny-qwen2-base-pretrain-1n1cpu-megatron-128.yaml")
    assert report["pretraining_tokens"] > 10_000_000 and report["checks_failed"] == []
    assert report["checks"]["passkey"][str(BASE_WINDOW)] >= 0.95
    assert report["checks"]["passkey"][str(4 * BASE_WINDOW)] <= 0.2
    assert report["size_bytes"] < 6_000_000
    tokenizer = AutoTokenizer.from_pretrained(ASSET_DIR)
    assert tokenizer.tokenize(" 12345") == ["Ġ", "1", "2", "3", "4", "5"]  # keys are copied digit by digit


def test_the_built_in_name_materialises_a_copy_named_by_the_weights(tmp_path):
    path = resolve_model_path(BASE_NAME)
    assert path.name == tiny_base_model.cache_name() and path.name.startswith(f"{BASE_NAME}-")
    assert (path / "model.safetensors").read_bytes() == (ASSET_DIR / "model.safetensors").read_bytes()
    assert resolve_model_path(BASE_NAME) == path


def test_a_missing_asset_names_the_build_command(monkeypatch, tmp_path):
    monkeypatch.setattr(tiny_base_model, "ASSET_DIR", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="uv run tools/build_base_model.py"):
        tiny_base_model.copy_base_model(tmp_path / "out")


def test_the_base_retrieves_inside_its_window_and_fails_far_beyond_it():
    """What makes it a base worth extending: plain RoPE works at 1x and breaks at 4x (as real models do)."""
    model, tokenizer = load_model(resolve_model_path(BASE_NAME), None, 4 * BASE_WINDOW)
    points = passkey_grid(HFGenerator(model, tokenizer), tokenizer, [BASE_WINDOW, 4 * BASE_WINDOW], [0.1, 0.5, 0.9], 4)
    inside = [p.accuracy for p in points if p.length == BASE_WINDOW]
    beyond = [p.accuracy for p in points if p.length == 4 * BASE_WINDOW]
    assert sum(inside) / len(inside) >= 0.9
    assert sum(beyond) / len(beyond) <= 0.25


def test_the_init_model_is_the_base_shape_with_random_weights(tmp_path):
    init = tiny_base_model.create_base_init(tmp_path / "init")
    config = json.loads((init / "config.json").read_text())
    base = json.loads((ASSET_DIR / "config.json").read_text())
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
    assert {k: config[k] for k in keys} == {k: base[k] for k in keys}
    assert config["rope_parameters"] == base["rope_parameters"]
