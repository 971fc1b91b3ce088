"""The built-in tiny model, tokenizer and dataset, and their safe creation in the cache."""

from __future__ import annotations

import json
import statistics
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from nemo_rl.data.builtin_datasets import resolve_dataset_paths
from nemo_rl.data.tiny_chat import generate_split, tiny_chat_corpus, write_tiny_chat
from nemo_rl.models.builtin_models import resolve_model_path
from nemo_rl.models.tiny_model import IM_END, create_tiny_model
from nemo_rl.utils.atomic_dir import COMPLETE_MARKER, materialize


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen2")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("NEMO_RL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_model_reloads_with_qwen2_shape_and_original_window(model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = model.config
    assert cfg.model_type == "qwen2"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 2, 2, 1)
    attn = model.model.layers[0].self_attn
    assert attn.head_dim == 64
    assert attn.k_proj.out_features == 64  # one KV head of dim 64: GQA
    assert cfg.vocab_size % 64 == 0 and len(tokenizer) <= cfg.vocab_size < len(tokenizer) + 64
    assert cfg.max_position_embeddings == 256
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    saved = json.loads((model_dir / "config.json").read_text())
    assert "rope_scaling" not in saved and saved["rope_parameters"]["rope_type"] == "default"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32
    assert (model_dir / "model.safetensors").is_file()
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids(IM_END) in gen["eos_token_id"]


def test_weights_are_a_function_of_the_seed(tmp_path, model_dir):
    again = load_file(create_tiny_model(tmp_path / "same") / "model.safetensors")
    other = load_file(create_tiny_model(tmp_path / "other", seed=1) / "model.safetensors")
    reference = load_file(model_dir / "model.safetensors")
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    assert not torch.equal(reference["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_tokenizer_round_trips_and_every_loader_agrees(model_dir, tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    for text in ("What is 12 + 345?\nred blue  green\tx", "Ünïcode ✓ 字 and emoji 🙂", "alpha3: 17\nbravo9: 204"):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # AutoTokenizer rebuilds qwen2 tokenizers as Qwen2Tokenizer; it must match the saved tokenizer.json exactly.
    plain = PreTrainedTokenizerFast.from_pretrained(model_dir)
    for text in tiny_chat_corpus()[:200]:
        assert tokenizer(text)["input_ids"] == plain(text)["input_ids"]


def test_assistant_mask_covers_exactly_the_replies_and_their_end_token(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5"},
        {"role": "user", "content": "Repeat these words exactly:\nred cat"},
        {"role": "assistant", "content": "red cat"},
    ]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    spans, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    assert current == []  # the newline after the last <|im_end|> is template glue, not trained
    assert [tokenizer.decode(span) for span in spans] == ["2 + 3 = 5<|im_end|>", "red cat<|im_end|>"]
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")


def test_dataset_is_deterministic_for_a_seed(tmp_path):
    a, b, c = write_tiny_chat(tmp_path / "a"), write_tiny_chat(tmp_path / "b"), write_tiny_chat(tmp_path / "c", seed=1)
    for split in ("train", "validation"):
        assert a[split].read_bytes() == b[split].read_bytes()
        assert a[split].read_bytes() != c[split].read_bytes()
    rows = [json.loads(line) for line in a["train"].read_text().splitlines()]
    assert len(rows) == 400 and len(a["validation"].read_text().splitlines()) == 40
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][-2]["role"] == "user" for r in rows)


def test_dataset_has_samples_beyond_the_original_window_and_none_near_the_training_length(tokenizer):
    lengths = [
        len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        for split in ("train", "validation")
        for messages in generate_split(split)
    ]
    assert sum(n > 256 for n in lengths) / len(lengths) > 0.3
    assert max(lengths) <= 1000
    assert statistics.median(lengths) < 256  # short and long samples mix in batches


def test_builtin_model_is_created_once_in_the_cache(cache):
    path = resolve_model_path("tiny-qwen2")
    assert path == cache / "tiny_models" / "tiny-qwen2"
    assert (path / COMPLETE_MARKER).is_file() and (path / "model.safetensors").is_file()
    stamp = (path / COMPLETE_MARKER).stat().st_mtime_ns
    assert resolve_model_path("tiny-qwen2") == path
    assert (path / COMPLETE_MARKER).stat().st_mtime_ns == stamp


def test_local_dirs_resolve_to_themselves_and_unknown_names_fail_clearly(cache, model_dir):
    assert resolve_model_path(str(model_dir)) == model_dir
    for name in ("no-such-org/no-such-model", str(cache / "missing")):
        with pytest.raises(FileNotFoundError, match="neither a local HF model directory nor a built-in model") as err:
            resolve_model_path(name)
        assert "tiny-qwen2" in str(err.value) and "downloads nothing" in str(err.value)


def test_dataset_paths_builtin_and_explicit(cache, tmp_path):
    train, val = resolve_dataset_paths("tiny-chat", None, None)
    assert (train, val) == (
        cache / "datasets" / "tiny-chat" / "train.jsonl",
        cache / "datasets" / "tiny-chat" / "validation.jsonl",
    )
    mine = tmp_path / "mine.jsonl"
    mine.write_text("")
    assert resolve_dataset_paths("tiny-chat", str(mine), None) == (mine, val)
    assert resolve_dataset_paths("my-data", str(mine), None) == (mine, None)
    with pytest.raises(FileNotFoundError, match="validation data file"):
        resolve_dataset_paths("tiny-chat", None, str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="not built in"):
        resolve_dataset_paths("my-data", None, None)


def test_concurrent_creation_yields_one_complete_dir(cache):
    barrier = threading.Barrier(2)
    results: list[Path] = []

    def create() -> None:
        barrier.wait()
        results.append(resolve_model_path("tiny-qwen2"))

    threads = [threading.Thread(target=create) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert [p.name for p in results[0].parent.iterdir() if p.is_dir()] == ["tiny-qwen2"]  # no temporary dir left
    assert AutoModelForCausalLM.from_pretrained(results[0]).config.hidden_size == 128


def test_only_one_creator_builds_and_a_failed_build_leaves_nothing(tmp_path):
    calls = []

    def slow_build(out: Path) -> None:
        calls.append(out)
        threading.Event().wait(0.3)  # long enough for the second thread to queue on the lock
        (out / "data.txt").write_text("ok")

    target = tmp_path / "asset"
    threads = [threading.Thread(target=materialize, args=(target, slow_build)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and (target / "data.txt").read_text() == "ok"

    def broken_build(out: Path) -> None:
        (out / "half.txt").write_text("")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        materialize(tmp_path / "broken", broken_build)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["asset"]


def test_a_dir_without_the_completion_marker_is_rebuilt(cache):
    half = cache / "datasets" / "tiny-chat"
    half.mkdir(parents=True)
    (half / "train.jsonl").write_text("not json\n")
    train, _ = resolve_dataset_paths("tiny-chat", None, None)
    assert (half / COMPLETE_MARKER).is_file()
    assert len(train.read_text().splitlines()) == 400


def test_tiny_20m_model_is_the_tiny_family_at_about_20m_parameters(tmp_path, model_dir):
    from nemo_rl.models.tiny_model import create_tiny_20m_model

    wide = AutoModelForCausalLM.from_pretrained(create_tiny_20m_model(tmp_path / "tiny-qwen2-20m"))
    tiny = AutoModelForCausalLM.from_pretrained(model_dir)
    assert 15e6 < sum(p.numel() for p in wide.parameters()) < 25e6
    assert wide.config.hidden_size // wide.config.num_attention_heads == 64  # as the tiny model (vLLM CPU minimum)
    for key in ("model_type", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(wide.config, key) == getattr(tiny.config, key), key
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "tiny-qwen2-20m").get_vocab()
        == AutoTokenizer.from_pretrained(model_dir).get_vocab()
    )
