"""Writing an HF directory from a live model or a training checkpoint (Megatron of any TP x PP layout, or DTensor).

Both paths go through one function so an exported model is the same whether it
came from the end of a run or from a ``step_N`` checkpoint evaluated later. The
config written is the one the run trained with (the converted checkpoint's,
carrying ``hf_config_overrides``), so transformers and vLLM load the RoPE the
trainer used.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from nemo_rl.models.megatron.hf_weights import megatron_to_hf
from nemo_rl.models.megatron.parallel_weights import merge_shards, read_checkpoint_model_shards, shard_file_name

FIRST_SHARD = shard_file_name(0, 0)  # present in every Megatron training checkpoint, whatever its layout
DTENSOR_CHECKPOINT = "dtensor"  # the DTensor worker's torch.distributed.checkpoint directory


def write_hf_directory(
    mcore_state: Mapping[str, torch.Tensor],
    hf_config,
    out: Path,
    model_dir: Path | None = None,
    tokenizer_dir: Path | None = None,
) -> Path:
    """An HF directory from full Megatron-named tensors (see ``write_hf_files``)."""
    weights = {k: v.detach().cpu() for k, v in mcore_state.items() if not k.endswith("_extra_state")}
    return write_hf_files(megatron_to_hf(weights, hf_config), hf_config, out, model_dir, tokenizer_dir)


def write_hf_files(
    hf_state: Mapping[str, torch.Tensor],
    hf_config,
    out: Path,
    model_dir: Path | None = None,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Safetensors + config.json (+ tokenizer and generation config when their sources are given).

    A tied output layer is the embedding; it is written once, as transformers does.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tied = getattr(hf_config, "tie_word_embeddings", False)
    weights = {k: v.detach().cpu().contiguous() for k, v in hf_state.items() if not (tied and k == "lm_head.weight")}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_config.save_pretrained(out)
    if tokenizer_dir:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    if model_dir and (Path(model_dir) / "generation_config.json").exists():
        GenerationConfig.from_pretrained(model_dir).save_pretrained(out)
    return out


def is_training_checkpoint(path: Path) -> bool:
    path = Path(path)
    weights = (path / FIRST_SHARD).is_file() or (path / DTENSOR_CHECKPOINT).is_dir()
    return weights and (path / "config.json").is_file()


def _dtensor_checkpoint_state(step_dir: Path) -> dict[str, torch.Tensor]:
    """Full HF-named model tensors of a DTensor worker's sharded checkpoint, whatever world size wrote it."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(step_dir / DTENSOR_CHECKPOINT, Path(tmp) / "full.pt")
        return torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=False)["model"]


def export_training_checkpoint(step_dir: Path, out: Path) -> Path:
    """HF directory from a ``step_N`` training checkpoint (which carries its config and tokenizer)."""
    step_dir = Path(step_dir)
    if not is_training_checkpoint(step_dir):
        raise FileNotFoundError(
            f"{step_dir} is not a training checkpoint (config.json and {FIRST_SHARD} or {DTENSOR_CHECKPOINT}/ expected)"
        )
    hf_config = AutoConfig.from_pretrained(step_dir)
    has_tokenizer = (step_dir / "tokenizer_config.json").is_file()
    tokenizer_dir = step_dir if has_tokenizer else None
    if (step_dir / DTENSOR_CHECKPOINT).is_dir():
        return write_hf_files(_dtensor_checkpoint_state(step_dir), hf_config, out, step_dir, tokenizer_dir)
    state = merge_shards(
        read_checkpoint_model_shards(step_dir), hf_config.num_hidden_layers, hf_config.tie_word_embeddings
    )
    return write_hf_directory(state, hf_config, out, step_dir, tokenizer_dir)
