"""Long-context evaluation: passkey prompts, scoring, perplexity against a direct computation."""

from __future__ import annotations

import json
import logging
import math
import random

import pytest
import torch
from transformers import AutoTokenizer

from nemo_rl.data.builtin_assets import resolve_dataset_paths, resolve_model_path
from nemo_rl.data.passkey import FILLER, NEEDLE, QUESTION, make_passkey_prompt, passkey_correct
from nemo_rl.evals.long_context import load_model, perplexity_by_length, read_documents, warn_if_uninformative
from tests.helpers import yarn_block


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("tiny-qwen2"))


@pytest.mark.parametrize("length", [300, 512, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_fits_its_budget_and_hides_the_key_at_depth(tokenizer, length, depth):
    prompt = make_passkey_prompt(tokenizer, length, depth, random.Random(0))
    n_tokens = len(tokenizer(prompt.text, add_special_tokens=False)["input_ids"])
    one_filler = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    assert length - one_filler < n_tokens <= length
    assert prompt.text.count(str(prompt.key)) == 2 and prompt.text.endswith("The pass key is")
    needle_at = prompt.text.index(f"The pass key is {prompt.key}")
    repeats = (len(prompt.text) - len(NEEDLE.format(key=prompt.key)) - len(QUESTION)) // len(FILLER)
    assert needle_at % len(FILLER) == 0, "the needle sits between filler sentences"
    # depth is met to the nearest whole filler block
    assert abs(needle_at // len(FILLER) - depth * repeats) <= 0.5


def test_passkey_scoring_uses_the_first_integer():
    assert passkey_correct(" 12345. Remember", 12345)
    assert not passkey_correct(" 1234 5", 12345)
    assert not passkey_correct(" no digits", 12345)


def test_perplexity_matches_a_direct_computation_and_skips_short_documents():
    model, tokenizer = load_model(resolve_model_path("tiny-qwen2"), {"rope_scaling": yarn_block()}, 1024)
    assert model.config.rope_parameters["rope_type"] == "yarn"
    docs = [list(range(3, 303)), list(range(10, 110))]
    points = perplexity_by_length(model, docs, [64, 300, 400])
    assert [(p.length, p.num_documents) for p in points] == [(64, 2), (300, 1), (400, 0)]
    assert math.isnan(points[2].perplexity)
    with torch.no_grad():
        ids = torch.tensor([docs[0]])
        nll = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:])
    assert points[1].perplexity == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_data_without_long_documents_is_flagged(tokenizer, caplog):
    _, validation = resolve_dataset_paths("tiny-chat", None, None)
    documents = read_documents(validation, tokenizer)
    with caplog.at_level(logging.WARNING):
        assert not warn_if_uninformative(documents, 256)
        assert warn_if_uninformative([d[:200] for d in documents], 256)
    assert "says nothing about the context extension" in caplog.text


def _hydra_dict(block: dict) -> str:
    return ",".join(f"{k}:{str(v).lower() if isinstance(v, bool) else v}" for k, v in block.items())


def test_the_command_runs_on_an_hf_directory(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "run_eval", Path(__file__).resolve().parents[2] / "examples" / "run_long_context_eval.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(
        [
            f"model_dir={resolve_model_path('tiny-qwen2')}",
            f"output_dir={tmp_path}",
            "long_context_eval.lengths=[128,512]",
            "long_context_eval.passkey_lengths=[300]",
            "long_context_eval.passkey_depths=[0.5]",
            "long_context_eval.passkey_trials=1",
            f"++hf_config_overrides={{rope_scaling:{{{_hydra_dict(yarn_block())}}}}}",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "long_context_eval.json").read_text())
    assert report["original_window"] == 256 and report["max_position_embeddings"] == 1024
    assert [p["length"] for p in report["perplexity"]] == [128, 512]
    assert all(p["perplexity"] > 1 for p in report["perplexity"])
    assert report["passkey"][0]["trials"] == 1 and 0.0 <= report["passkey"][0]["accuracy"] <= 1.0
    assert "perplexity" in capsys.readouterr().out
