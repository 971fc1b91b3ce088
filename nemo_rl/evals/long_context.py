"""Long-context evaluation: perplexity as a function of context length, and passkey retrieval.

Runs on any HF directory (a base model, an SFT export, a checkpoint exported to
HF) with the same ``hf_config_overrides`` the run trains with, applied through
``nemo_rl.models.rope_scaling`` so the evaluation sees the trainer's RoPE.
Perplexity is computed per document truncated to each length, so a length is
only scored on documents that really are that long; data with nothing beyond
the original window cannot say anything about the extension, and is flagged.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from nemo_rl.data.passkey import make_passkey_prompt, passkey_correct
from nemo_rl.models import rope_scaling

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityPoint:
    length: int
    perplexity: float  # nan when no document reaches this length
    num_documents: int


@dataclass(frozen=True)
class PasskeyPoint:
    length: int
    depth: float
    accuracy: float
    trials: int


def load_model(model_dir: Path, overrides: Mapping[str, Any] | None, max_length: int):
    """The HF model with the run's overrides; ``sdpa`` keeps memory linear in length where it can."""
    config = rope_scaling.apply_hf_config_overrides(AutoConfig.from_pretrained(model_dir), overrides, max_length)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, config=config, dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def read_documents(path: Path, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids per document of a JSONL file of ``{"text": ...}`` or chat ``{"messages": [...]}`` rows."""
    documents = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "messages" in row:
            ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        elif "text" in row:
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        else:
            raise ValueError(f"{path}: each row needs 'text' or 'messages', got keys {sorted(row)}")
        documents.append(list(ids))
    return documents


def warn_if_uninformative(documents: Sequence[Sequence[int]], original_window: int | None) -> bool:
    """True (and a warning) when no document is longer than the original window."""
    longest = max((len(d) for d in documents), default=0)
    if original_window is not None and longest <= original_window:
        logger.warning(
            "No evaluation document is longer than the original window (%d tokens; the longest has %d): "
            "perplexity here says nothing about the context extension.",
            original_window,
            longest,
        )
        return True
    return False


@torch.no_grad()
def perplexity_by_length(model, documents: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[PerplexityPoint]:
    points = []
    for length in tqdm(sorted(lengths), desc="perplexity", leave=False):
        usable = [d[:length] for d in documents if len(d) >= length]
        nll, tokens = 0.0, 0
        for doc in usable:
            ids = torch.tensor([doc])
            logits = model(ids).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            tokens += len(doc) - 1
        if not usable:
            logger.warning("No evaluation document has %d tokens; perplexity at that length is undefined", length)
        points.append(PerplexityPoint(length, math.exp(nll / tokens) if tokens else float("nan"), len(usable)))
    return points


@torch.no_grad()
def passkey_accuracy(
    model,
    tokenizer: PreTrainedTokenizerBase,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    seed: int = 0,
) -> list[PasskeyPoint]:
    rng = random.Random(seed)
    points = []
    grid = [(length, depth) for length in lengths for depth in depths]
    for length, depth in tqdm(grid, desc="passkey", leave=False):
        correct = 0
        for _ in range(trials):
            prompt = make_passkey_prompt(tokenizer, length, depth, rng)
            ids = tokenizer(prompt.text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            correct += passkey_correct(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), prompt.key)
        points.append(PasskeyPoint(length, depth, correct / trials, trials))
    return points


def format_table(perplexity: Sequence[PerplexityPoint], passkey: Sequence[PasskeyPoint]) -> str:
    lines = ["length | perplexity | documents", "------ | ---------- | ---------"]
    lines += [f"{p.length:6d} | {p.perplexity:10.3f} | {p.num_documents:9d}" for p in perplexity]
    if passkey:
        lines += ["", "length | depth | passkey accuracy | trials", "------ | ----- | ---------------- | ------"]
        lines += [f"{p.length:6d} | {p.depth:5.2f} | {p.accuracy:16.2f} | {p.trials:6d}" for p in passkey]
    return "\n".join(lines)


def write_report(
    out_dir: Path, perplexity: Sequence[PerplexityPoint], passkey: Sequence[PasskeyPoint], info: dict
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "long_context_eval.json"
    report = {**info, "perplexity": [asdict(p) for p in perplexity], "passkey": [asdict(p) for p in passkey]}
    path.write_text(json.dumps(report, indent=2))
    return path


def original_window(config) -> int:
    """The pretraining window: the YaRN block's original length, else max_position_embeddings."""
    params = rope_scaling.hf_rope_parameters(config)
    return int(params.get("original_max_position_embeddings") or config.max_position_embeddings)


def run_long_context_eval(
    model_dir: Path,
    overrides: Mapping[str, Any] | None,
    max_total_sequence_length: int,
    eval_cfg,
    out_dir: Path,
    default_data: Path | None = None,
) -> tuple[list[PerplexityPoint], list[PasskeyPoint], Path]:
    """Evaluate ``model_dir`` and write ``long_context_eval.json`` into ``out_dir``."""
    model, tokenizer = load_model(Path(model_dir), overrides, max_total_sequence_length)
    data_path = Path(eval_cfg.data_path) if eval_cfg.data_path else default_data
    if data_path is None:
        raise ValueError("long_context_eval.data_path is required when no default evaluation data exists")
    documents = read_documents(data_path, tokenizer)
    window = original_window(model.config)
    uninformative = warn_if_uninformative(documents, window)
    perplexity = perplexity_by_length(model, documents, eval_cfg.lengths)
    passkey = passkey_accuracy(
        model, tokenizer, eval_cfg.passkey_lengths, eval_cfg.passkey_depths, eval_cfg.passkey_trials, eval_cfg.seed
    )
    info = {
        "model_dir": str(model_dir),
        "data_path": str(data_path),
        "original_window": window,
        "max_position_embeddings": model.config.max_position_embeddings,
        "rope_parameters": rope_scaling.hf_rope_parameters(model.config),
        "no_document_beyond_original_window": uninformative,
    }
    return perplexity, passkey, write_report(Path(out_dir), perplexity, passkey, info)
