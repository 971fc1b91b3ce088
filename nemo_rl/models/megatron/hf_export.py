"""Writing an HF directory from a live model or a training checkpoint (Megatron of any TP x PP layout, or DTensor).

Both paths go through one function so an exported model is the same whether it
came from the end of a run or from a ``step_N`` checkpoint evaluated later. The
config written is the one the run trained with (the converted checkpoint's,
carrying ``hf_config_overrides``), so transformers and vLLM load the RoPE the
trainer used.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from nemo_rl.models.megatron.hf_weights import megatron_to_hf
from nemo_rl.models.megatron.parallel_weights import merge_shards, read_checkpoint_model_shards, shard_file_name

FIRST_SHARD = shard_file_name(0, 0)  # present in every Megatron training checkpoint, whatever its layout
DTENSOR_CHECKPOINT = "dtensor"  # the DTensor worker's torch.distributed.checkpoint directory
SINGLE_FILE = "model.safetensors"  # transformers' name for a model that fits one file
INDEX_FILE = "model.safetensors.index.json"  # and the weight map of a model split over several
MAX_FILE_BYTES = 2 * 1024**3


class SafetensorsFiles:
    """HF-named tensors written to safetensors files of at most ``max_bytes`` as they arrive.

    An export then never holds more than one file's worth of tensors beside
    the model: gathering a whole model first (fp32 Qwen3-0.6B is 2.4 GB, a 7B
    model 28 GB) and serialising it in one buffer needs that much again, which
    is what ran a 2-rank CPU export of Qwen3-0.6B out of memory. Each writer
    (one per pipeline stage) names its files after ``stem``;
    ``finish_hf_directory`` joins their weight maps.
    """

    def __init__(self, out: Path, stem: str, max_bytes: int = MAX_FILE_BYTES) -> None:
        self.out, self.stem, self.max_bytes = Path(out), stem, max_bytes
        self.out.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.detach().cpu().contiguous()
        self._pending_bytes += size

    def close(self) -> tuple[dict[str, str], int]:
        """(tensor name -> file name, bytes written)."""
        if self._pending:
            self._flush()
        return self.weight_map, self.total_bytes

    def _flush(self) -> None:
        self._files += 1
        name = f"{self.stem}-{self._files:05d}.safetensors"
        save_file(self._pending, str(self.out / name), metadata={"format": "pt"})
        self.weight_map |= dict.fromkeys(self._pending, name)
        self.total_bytes += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0


def write_weight_files(
    hf_tensors: Iterable[tuple[str, torch.Tensor]],
    hf_config,
    out: Path,
    stem: str = "model",
    max_bytes: int = MAX_FILE_BYTES,
) -> tuple[dict[str, str], int]:
    """Stream ``hf_tensors`` into ``SafetensorsFiles``; a tied output layer is the embedding, written once."""
    tied = getattr(hf_config, "tie_word_embeddings", False)
    files = SafetensorsFiles(out, stem, max_bytes)
    for name, tensor in hf_tensors:
        if not (tied and name == "lm_head.weight"):
            files.add(name, tensor)
    return files.close()


def finish_hf_directory(
    out: Path,
    written: Sequence[tuple[dict[str, str], int]],
    hf_config,
    model_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Join the writers' files into one HF directory: ``model.safetensors`` when there is one file, else an index
    transformers and vLLM read; plus config.json (+ tokenizer and generation config when their sources are given)."""
    out = Path(out)
    weight_map = {name: file for files, _ in written for name, file in files.items()}
    file_names = sorted(set(weight_map.values()))
    if len(file_names) == 1:
        (out / file_names[0]).replace(out / SINGLE_FILE)
        (out / INDEX_FILE).unlink(missing_ok=True)  # an earlier, larger export's
    else:
        index = {
            "metadata": {"total_size": sum(size for _, size in written)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    hf_config.save_pretrained(out)
    if tokenizer_dir:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    if model_dir and (Path(model_dir) / "generation_config.json").exists():
        GenerationConfig.from_pretrained(model_dir).save_pretrained(out)
    return out


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
    """An HF directory from full HF-named tensors held in memory (one writer, see ``finish_hf_directory``)."""
    written = write_weight_files(hf_state.items(), hf_config, out)
    return finish_hf_directory(out, [written], hf_config, model_dir, tokenizer_dir)


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
