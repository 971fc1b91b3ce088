"""The built-in GRPO dataset: verifiable answers, and prompts that reach past the original window."""

from __future__ import annotations

import json

from nemo_rl.data.builtin_datasets import resolve_dataset_paths
from nemo_rl.data.tiny_math import generate_split
from nemo_rl.environments.math_environment import math_reward
from nemo_rl.models.builtin_models import resolve_model_path


def test_rows_are_verifiable_and_splits_differ():
    train, validation = generate_split("train"), generate_split("validation")
    assert generate_split("train") == train  # seeded
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in validation}
    for row in train:
        assert [m["role"] for m in row["messages"]] == ["system", "user"]
        assert math_reward(f"The answer is {row['answer']}", row["answer"]) == 1.0


def test_built_in_files_and_long_prompts_for_the_tiny_tokenizer():
    from transformers import AutoTokenizer

    train_path, validation_path = resolve_dataset_paths("tiny-math", None, None)
    rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    assert len(rows) == 256 and validation_path.is_file()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("tiny-qwen2"))
    lengths = [
        len(tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True)["input_ids"])
        for row in rows
    ]
    assert sum(n > 256 for n in lengths) >= len(rows) // 5  # beyond the original window
    assert max(lengths) < 1024
