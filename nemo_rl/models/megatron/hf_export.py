"""Writing Megatron weights as an HF directory, from a live model or a training checkpoint (any TP x PP layout).

Both paths go through one function so an exported model is the same whether it
came from the end of a run or from a ``step_N`` checkpoint evaluated later. The
config written is the one the run trained with (the converted checkpoint's,
carrying ``hf_config_overrides``), so transformers and vLLM load the RoPE the
trainer used.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from nemo_rl.models.megatron.hf_weights import megatron_to_hf
from nemo_rl.models.megatron.parallel_weights import merge_shards, read_checkpoint_model_shards, shard_file_name

FIRST_SHARD = shard_file_name(0, 0)  # present in every training checkpoint, whatever its layout


def write_hf_directory(
    mcore_state: Mapping[str, torch.Tensor],
    hf_config,
    out: Path,
    model_dir: Path | None = None,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Safetensors + config.json (+ tokenizer and generation config when their sources are given)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu() for k, v in mcore_state.items() if not k.endswith("_extra_state")}
    hf_state = megatron_to_hf(weights, hf_config)
    save_file(
        {k: v.contiguous() for k, v in hf_state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"}
    )
    hf_config.save_pretrained(out)
    if tokenizer_dir:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    if model_dir and (Path(model_dir) / "generation_config.json").exists():
        GenerationConfig.from_pretrained(model_dir).save_pretrained(out)
    return out


def is_training_checkpoint(path: Path) -> bool:
    return (Path(path) / FIRST_SHARD).is_file() and (Path(path) / "config.json").is_file()


def export_training_checkpoint(step_dir: Path, out: Path) -> Path:
    """HF directory from a ``step_N`` training checkpoint (which carries its config and tokenizer)."""
    step_dir = Path(step_dir)
    if not is_training_checkpoint(step_dir):
        raise FileNotFoundError(f"{step_dir} is not a training checkpoint ({FIRST_SHARD} and config.json expected)")
    hf_config = AutoConfig.from_pretrained(step_dir)
    state = merge_shards(
        read_checkpoint_model_shards(step_dir), hf_config.num_hidden_layers, hf_config.tie_word_embeddings
    )
    has_tokenizer = (step_dir / "tokenizer_config.json").is_file()
    return write_hf_directory(
        state,
        hf_config,
        out,
        model_dir=step_dir,
        tokenizer_dir=step_dir if has_tokenizer else None,
    )
