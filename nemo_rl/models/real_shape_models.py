"""Models of the real recipes' shapes, built here from published architecture numbers, with random weights.

The recipes train Qwen3-0.6B, Qwen2.5-1.5B and Llama-class models, and nothing
may be downloaded at run time; so every code path that depends on a real size
(vocabulary padding for TP, GQA splits, head_dim != hidden / heads, QK-norm,
tied embeddings, memory, conversion time) is exercised on models of exactly
those shapes, built locally. The numbers are the models' published
``config.json`` values. The tokenizer is a byte-level BPE with Qwen2's
pipeline (``tiny_model.train_tokenizer``) trained to the real tokenizer's
number of regular tokens on texts every install of this lock has (the
interpreter's standard library, then transformers' sources), so token ids
cover the same range the real model's embedding does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config, Qwen3Config

from nemo_rl.data.python_stdlib import stdlib_documents
from nemo_rl.models.tiny_model import SPECIAL_TOKENS, train_tokenizer

QWEN_VOCAB_SIZE = 151_936  # the embedding's rows (padded); the tokenizer has 151,643 regular tokens
QWEN_BPE_TOKENS = 151_643
LLAMA3_VOCAB_SIZE = 128_256  # 128,000 regular tokens and 256 reserved specials
LLAMA3_BPE_TOKENS = 128_000


def _qwen3(hidden_size: int, intermediate_size: int) -> Qwen3Config:
    """The Qwen3 dense family at one width: QK-norm, head_dim 128 (not hidden / heads), GQA 16:8, tied."""
    return Qwen3Config(
        vocab_size=QWEN_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40_960,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=False,
        use_sliding_window=False,
        max_window_layers=28,
    )


def qwen3_0_6b() -> Qwen3Config:
    """Qwen3-0.6B: head_dim 128 while hidden / heads = 64."""
    return _qwen3(1024, 3072)


def qwen3_1_7b() -> Qwen3Config:
    """Qwen3-1.7B (the distillation recipe's teacher)."""
    return _qwen3(2048, 6144)


def qwen2_5_1_5b() -> Qwen2Config:
    """Qwen2.5-1.5B: QKV bias, GQA 12:2, tied embeddings."""
    return Qwen2Config(
        vocab_size=QWEN_VOCAB_SIZE,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=131_072,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        max_window_layers=21,
    )


def llama_3_2_1b() -> LlamaConfig:
    """Llama-3.2-1B: GQA 32:8, tied embeddings, and its own ``llama3`` RoPE scaling (x32 over 8,192 tokens)."""
    return LlamaConfig(
        vocab_size=LLAMA3_VOCAB_SIZE,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131_072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500_000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
    )


def llama_2_7b() -> LlamaConfig:
    """Llama-2-7B: full multi-head attention (32 KV heads), untied output layer, a 4,096-token window."""
    return LlamaConfig(
        vocab_size=32_000,
        hidden_size=4096,
        intermediate_size=11_008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )


@dataclass(frozen=True)
class RealShape:
    hub_id: str  # the model the recipes name (never downloaded: the shape stands in for it where needed)
    config: Callable[[], PretrainedConfig]
    bpe_tokens: int  # the real tokenizer's regular tokens, before its special ones
    # The model card's (or the hub page's) figures in billions as printed (total, non-embedding): checks the shape.
    published_billions: tuple[str, str | None]


REAL_SHAPES: dict[str, RealShape] = {
    "qwen3-0.6b-shape": RealShape("Qwen/Qwen3-0.6B", qwen3_0_6b, QWEN_BPE_TOKENS, ("0.6", "0.44")),
    "qwen3-1.7b-shape": RealShape("Qwen/Qwen3-1.7B", qwen3_1_7b, QWEN_BPE_TOKENS, ("1.7", "1.4")),
    "qwen2.5-1.5b-shape": RealShape("Qwen/Qwen2.5-1.5B-Instruct", qwen2_5_1_5b, QWEN_BPE_TOKENS, ("1.54", "1.31")),
    "llama-3.2-1b-shape": RealShape("meta-llama/Llama-3.2-1B", llama_3_2_1b, LLAMA3_BPE_TOKENS, ("1.23", None)),
    "llama-2-7b-shape": RealShape("meta-llama/Llama-2-7b-hf", llama_2_7b, 32_000 - 3, ("6.74", None)),
}


def shape_for_hub_id(model_name: str) -> RealShape | None:
    """The locally built stand-in for a recipe's hub model, if there is one."""
    return next((shape for shape in REAL_SHAPES.values() if shape.hub_id == model_name), None)


def tokenizer_texts() -> Iterator[str]:
    """The interpreter's standard library, then the installed transformers' sources (its version is locked):
    the standard library alone runs out of merges at about 146,600 tokens."""
    yield from (document["text"] for document in stdlib_documents())
    import transformers

    for path in sorted(Path(transformers.__file__).parent.rglob("*.py")):
        yield path.read_text(encoding="utf-8", errors="replace")


def create_real_shape_model(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Write ``name``'s HF directory (config, float32 random weights, tokenizer) into ``out_dir``."""
    shape = REAL_SHAPES[name]
    config = shape.config()
    tokenizer = train_tokenizer(tokenizer_texts(), shape.bpe_tokens + len(SPECIAL_TOKENS))
    if len(tokenizer) > config.vocab_size:
        raise RuntimeError(f"{name}: the tokenizer has {len(tokenizer)} tokens, more than vocab_size")
    eos = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS[0])
    config.bos_token_id = config.eos_token_id = config.pad_token_id = eos
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{name}: {parameters:,} parameters, {len(tokenizer):,} tokens", file=sys.stderr)
    return out_dir
