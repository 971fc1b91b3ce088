"""The README's first command: the base extended 4x with YaRN retrieves the passkey where it could not before."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest
import torch

from nemo_rl.utils.logger import read_metrics
from tests.helpers import entry_main, local_ray

pytestmark = [pytest.mark.functional, pytest.mark.slow]


def test_default_run_extends_the_base_and_shows_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default config writes under ./results, as a user's run does
    with local_ray(2, tmp_path / "mcore"):
        assert entry_main("run_sft")([]) == 0

    log_dir = Path("results/sft-long-context/logs")
    stages = json.loads((log_dir / "long_context_before_after.json").read_text())
    assert set(stages) == {"base", "base_extended", "fine_tuned"}
    base, fine_tuned = stages["base"], stages["fine_tuned"]
    # Inside its 128-token window the base retrieves; at 4x with plain RoPE it fails, as real bases do.
    assert base["passkey@128"] >= 0.9
    assert base["passkey@512"] <= 0.2
    # After the YaRN extension and fine-tuning: retrieval at 4x, by a clear margin over the base.
    assert fine_tuned["passkey@512"] >= 0.9
    assert fine_tuned["passkey@512"] - base["passkey@512"] >= 0.6
    # Long documents got cheaper to predict at 4x, and the short-context quality stayed.
    assert fine_tuned["perplexity@512"] < stages["base_extended"]["perplexity@512"]
    assert fine_tuned["perplexity@128"] <= 1.05 * base["perplexity@128"]

    printed = capsys.readouterr().out
    assert "Long context before and after" in printed and "fine-tuned" in printed
    receipt = json.loads((log_dir / "long_context_receipt.json").read_text())["long_context"]
    assert (receipt["method"], receipt["factor"], receipt["original_max_position_embeddings"]) == ("yarn", 4.0, 128)
    exported = json.loads(Path("results/sft-long-context/hf/config.json").read_text())
    assert exported["rope_parameters"]["rope_type"] == "yarn"
    # The export, scored by an implementation that shares nothing with nemo_rl's evaluation but the texts.
    assert independent_passkey_accuracy(Path("results/sft-long-context/hf"), 4 * 128, trials=30) >= 0.9
    train = read_metrics(log_dir, "train")
    assert len(train) == 90 and all(r["packing_efficiency"] > 0.5 for r in train)
    assert os.path.isdir("results/sft-long-context/checkpoints/step_90")


def independent_passkey_accuracy(model_dir: Path, length: int, trials: int) -> float:
    """The passkey test as the YaRN repository's script writes it: a task line, the filler cut by characters
    around the needle, lines joined by newlines, ``length`` tokens in all; plain transformers, greedy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    task = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there."
    )
    filler = " ".join(
        ["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."] * 200
    )
    rng, correct = random.Random(2309), 0
    for trial in range(trials):
        key, depth = rng.randint(10000, 99999), 0.02 + 0.96 * trial / (trials - 1)

        def prompt(chars: int, key: int = key, depth: float = depth) -> str:
            needle = f"The pass key is {key}. Remember it. {key} is the pass key."
            before = int(chars * depth)
            return "\n".join(
                [task, filler[:before], needle, filler[: chars - before], "What is the pass key? The pass key is"]
            )

        low, high = 0, 8 * length  # the most filler that fits, by bisection (token counts grow with it)
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if len(tokenizer(prompt(mid))["input_ids"]) <= length - 10 else (low, mid - 1)
        chars = low
        ids = tokenizer(prompt(chars), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        found = re.search(r"\d+", tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        correct += bool(found and int(found.group()) == key)
    return correct / trials
