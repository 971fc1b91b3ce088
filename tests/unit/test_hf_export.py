"""nemo_rl/models/megatron/hf_export.py: an export streamed into size-capped safetensors files loads in
transformers exactly as the model it came from, split over several files (with an index) or in one."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from nemo_rl.models.megatron.hf_export import INDEX_FILE, SINGLE_FILE, finish_hf_directory, write_weight_files


@pytest.fixture(scope="module")
def model():
    config = Qwen3Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config).eval()


def export(model, out, max_bytes, stages=1):
    """The model's tensors split over ``stages`` writers (as pipeline stages write them), then joined."""
    items = list(model.state_dict().items())
    per_stage = -(-len(items) // stages)
    written = []
    for stage in range(stages):
        chunk = items[stage * per_stage : (stage + 1) * per_stage]
        written.append(write_weight_files(chunk, model.config, out, f"model-pp{stage:02d}", max_bytes))
    return finish_hf_directory(out, written, model.config)


def assert_same_model(model, out):
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.arange(32).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_large_export_is_split_into_capped_files_with_an_index(model, tmp_path):
    export(model, tmp_path, max_bytes=40_000, stages=2)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and any("pp01" in f for f in files) and not (tmp_path / SINGLE_FILE).exists()
    assert "lm_head.weight" not in index["weight_map"]  # tied: the embedding, written once
    tensors = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # Every file but the one holding a single oversized tensor stays under the cap.
    assert all((tmp_path / f).stat().st_size < 40_000 + 4096 or _one_tensor(index, f) for f in files)
    assert_same_model(model, tmp_path)


def _one_tensor(index, file) -> bool:
    return list(index["weight_map"].values()).count(file) == 1


def test_an_export_that_fits_one_file_is_model_safetensors_and_replaces_an_older_index(model, tmp_path):
    export(model, tmp_path, max_bytes=40_000, stages=2)
    export(model, tmp_path, max_bytes=2**30)
    assert (tmp_path / SINGLE_FILE).is_file() and not (tmp_path / INDEX_FILE).exists()
    assert_same_model(model, tmp_path)
