"""Config checks of document data (``data.format: document``, ``data.blend``): every problem named before a run."""

from __future__ import annotations

import pytest

from nemo_rl.config.loader import load_config, resolve_config
from nemo_rl.config.schema import validate_dpo_config, validate_sft_config
from nemo_rl.utils.errors import ConfigError
from tests.helpers import SFT_YAML


def _errors(overrides: list[str], validate=validate_sft_config, path=SFT_YAML) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(resolve_config(load_config(path, overrides)))
    return info.value.messages


def _document(*more: str) -> list[str]:
    return ["data.format=document", "data.dataset_name=python-stdlib", *more]


def test_document_config_validates_with_defaults_and_a_blend():
    cfg = validate_sft_config(
        resolve_config(
            load_config(
                SFT_YAML,
                _document(
                    "data.blend=[{dataset_name: synthetic-retrieval, share: 0.2, max_document_tokens: 256},"
                    "{dataset_name: python-stdlib, share: 0.1, max_document_tokens: 256}]"
                ),
            )
        )
    )
    assert (cfg.data.format, cfg.data.input_key, cfg.data.add_eos) == ("document", "text", True)
    assert [(s.dataset_name, s.share, s.max_document_tokens) for s in cfg.data.blend] == [
        ("synthetic-retrieval", 0.2, 256),
        ("python-stdlib", 0.1, 256),
    ]


def test_chat_is_the_default_format():
    cfg = validate_sft_config(resolve_config(load_config(SFT_YAML)))
    assert cfg.data.format == "chat" and cfg.data.blend == []


def test_blend_rules_are_all_reported_at_once():
    errors = _errors(
        _document(
            "data.dataset_name=synthetic-retrieval",
            "data.blend=[{dataset_name: synthetic-retrieval, share: 0.7, data_path: x.jsonl},"
            "{dataset_name: python-stdlib, share: 0.4, max_document_tokens: 4096}]",
        )
    )
    text = "\n".join(errors)
    assert "data.dataset_name: synthetic-retrieval is generated for a blend" in text
    assert "data.blend: the shares sum to 1.1" in text
    assert "data.blend.1.max_document_tokens: 4096 is above policy.max_total_sequence_length = 1024" in text
    assert "data.blend.0.data_path: synthetic-retrieval is generated, not read" in text


def test_blend_needs_the_document_format_and_valid_fields():
    assert any(
        e.startswith("data.blend: blends are of documents")
        for e in _errors(["data.blend=[{dataset_name: python-stdlib, share: 0.2}]"])
    )
    errors = _errors(_document("data.format=text", "data.blend=[{dataset_name: python-stdlib, share: 1.5}]"))
    assert any(e.startswith("data.format:") for e in errors)
    assert any(e.startswith("data.blend.0.share:") for e in errors)
    errors = _errors(_document("data.blend=[{dataset_name: a, share: 0.1, shares: 2}]"))
    assert any(e.startswith("data.blend.0.shares: unknown key (did you mean data.blend.0.share?)") for e in errors)


def test_preference_data_has_no_document_format():
    from pathlib import Path

    dpo = Path(SFT_YAML).with_name("dpo.yaml")
    errors = _errors(["++data.format=document"], validate=validate_dpo_config, path=dpo)
    assert any(e.startswith("data.format: unknown key") for e in errors)
