"""The built-in ``tiny-qwen2`` model: a Qwen2 causal LM and tokenizer made from scratch.

The project must run end to end (SFT, YaRN context extension, vLLM generation)
on a CPU-only machine without downloading anything, so it builds its own model
in the real Qwen2 format: every code path (HF loading, HF->Megatron
conversion, vLLM) sees the same kind of checkpoint a real Qwen2 would give it.

The config keeps the *original* RoPE window (``max_position_embeddings: 256``)
and no ``rope_scaling``: YaRN is applied later through ``hf_config_overrides``,
exactly as it would be for a pretrained model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from nemo_rl.data.tiny_chat import tiny_chat_corpus

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]  # ids 0, 1, 2
# An upper bound: the closed tiny-chat corpus runs out of merges first (~560 tokens).
TOKENIZER_VOCAB_SIZE = 1024
ORIGINAL_WINDOW = 256

# ChatML. The assistant reply *and its <|im_end|>* are inside {% generation %}, so the
# assistant mask trains the model to stop; the newline after it is template glue.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen2's exact pipeline, trained on ``corpus``, with the ChatML specials and template.

    ``AutoTokenizer`` (and so vLLM) loads any ``model_type: qwen2`` tokenizer as
    ``Qwen2Tokenizer``, which rebuilds the NFC normalizer and the Qwen2 split
    regex around the saved vocabulary and merges; training with that same
    pipeline is what makes every loader tokenize identically. Byte level means
    any text round-trips, and Qwen2's split keeps every digit its own token
    (numbers are copied digit by digit). ``vocab_size`` is an upper bound: a
    small closed corpus runs out of merges first.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny model's tokenizer, trained on the tiny-chat corpus.

    Training on the project's own corpus makes its words single tokens, so
    samples stay well inside 4x the original window. The corpus seed is fixed
    so that every model seed shares one vocabulary with the built-in dataset.
    """
    return train_tokenizer(tiny_chat_corpus(seed=0), TOKENIZER_VOCAB_SIZE)


@dataclass(frozen=True)
class QwenWidth:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int


TINY_WIDTH = QwenWidth(hidden_size=128, intermediate_size=384, num_attention_heads=2, num_key_value_heads=1)
# ~20M parameters (18.4M, tied embeddings): the same family and tokenizer at a width where the matrix products,
# not per-op overheads, dominate a step; speed comparisons (benchmarks/peer_trl.py) run on both.
WIDTH_20M = QwenWidth(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=2)
LAYERS_20M = 6


def tiny_qwen2_config(
    tokenizer: PreTrainedTokenizerFast,
    num_hidden_layers: int = 2,
    window: int = ORIGINAL_WINDOW,
    rope_theta: float = 10000.0,
    width: QwenWidth | None = None,
) -> Qwen2Config:
    """Qwen2 shape kept as small as the runtimes allow (the pre-trained base only adds layers and its RoPE).

    head_dim = 128 / 2 = 64 because vLLM's CPU attention supports no smaller head;
    one KV head exercises the GQA paths; the vocabulary is padded to a multiple
    of 64 as Megatron and vLLM expect. ``width`` widens it (``tiny-qwen2-20m``).
    """
    width = width or TINY_WIDTH
    vocab_size = -(-len(tokenizer) // 64) * 64
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=width.hidden_size,
        intermediate_size=width.intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=width.num_attention_heads,
        num_key_value_heads=width.num_key_value_heads,
        max_position_embeddings=window,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        dtype="float32",
    )


def create_tiny_model(out_dir: Path, seed: int = 0, initializer_range: float | None = None) -> Path:
    """Write the tiny model (safetensors), its generation config and tokenizer into ``out_dir``.

    ``initializer_range`` overrides the init scale (larger: more peaked next-token distributions).
    """
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = tiny_qwen2_config(tokenizer)
    if initializer_range is not None:
        config.initializer_range = initializer_range
    return save_initialized(config, tokenizer, out_dir, seed)


def create_tiny_20m_model(out_dir: Path) -> Path:
    """The built-in ``tiny-qwen2-20m``: the tiny model's tokenizer and window, 6 layers at width 512 (random)."""
    tokenizer = build_tokenizer()
    return save_initialized(tiny_qwen2_config(tokenizer, LAYERS_20M, width=WIDTH_20M), tokenizer, Path(out_dir), 0)


def save_initialized(config: Qwen2Config, tokenizer: PreTrainedTokenizerFast, out_dir: Path, seed: int) -> Path:
    """A freshly initialised model of ``config`` with its tokenizer and stop tokens, written to ``out_dir``.

    Weights come from ``seed`` in a forked RNG, so creation is reproducible and
    leaves the caller's torch random state untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    # Generation ends at the end of the assistant turn (<|im_end|>) or of the text.
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), config.eos_token_id],
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


TEACHER_SEED = 1
TEACHER_INITIALIZER_RANGE = 0.1


def create_tiny_teacher(out_dir: Path) -> Path:
    """The built-in ``tiny-qwen2-teacher``: the tiny model's shape and tokenizer, other and sharper weights.

    Distillation needs a teacher whose next-token distributions clearly differ
    from the student's (a freshly initialised tiny model's are close to
    uniform), and the same vocabulary. A different seed at five times the init
    scale gives both without training anything.
    """
    return create_tiny_model(out_dir, seed=TEACHER_SEED, initializer_range=TEACHER_INITIALIZER_RANGE)
