"""Sliding-window perplexity as a function of context length, as the YaRN paper (arXiv:2309.00071) measures it.

For a context length L, a window of L tokens slides over each document with
stride S; each window scores only the tokens the previous window did not (the
first scores all but its first token), so every token is predicted from at
least L - S tokens of context once past the first window, and perplexity is
exp(mean NLL) over the scored tokens. The paper's code shortens the last
window at the document's end; here it is moved back to end there with the full
L tokens, so all windows of a document have one length and go through the
model in one batch (and no token is scored with less context than the rest).

Every length is scored on the *same* documents (those with at least the
longest length's tokens, cut to one prefix length), so each of them scores the
same tokens and the curve compares context lengths, not data sets. Data with
no document long enough gives nan and a warning, never a silently smaller set.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from nemo_rl.data.rows import read_rows
from nemo_rl.utils.errors import DataError, MissingDataFile

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityPoint:
    length: int
    perplexity: float  # nan when no document reaches the longest evaluated length
    num_documents: int
    stride: int
    num_tokens: int  # tokens scored: the same at every length of one evaluation


def read_documents(path: Path, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids per row of a JSONL/Parquet file of ``{"text": ...}`` or chat ``{"messages": [...]}`` rows."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataFile(f"evaluation data file {path} does not exist; fix long_context_eval.data_path")
    documents = []
    for row_no, row in enumerate(read_rows(path), 1):
        if isinstance(row.get("messages"), list):
            ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        elif isinstance(row.get("text"), str):
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        else:
            raise DataError(
                f"{path}: row {row_no}: evaluation rows need a string 'text' or a 'messages' list, found keys "
                f"{sorted(row)}"
            )
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


def select_documents(
    documents: Sequence[Sequence[int]], min_tokens: int, document_tokens: int, max_documents: int, seed: int
) -> list[list[int]]:
    """Up to ``max_documents`` documents of at least ``min_tokens`` tokens, each cut to its first
    ``document_tokens``: a seeded sample (kept in file order), so a file sorted by topic does not pick one topic."""
    eligible = [i for i, doc in enumerate(documents) if len(doc) >= min_tokens]
    chosen = sorted(random.Random(seed).sample(eligible, min(max_documents, len(eligible))))
    return [list(documents[i][:document_tokens]) for i in chosen]


def window_starts(num_tokens: int, length: int, stride: int) -> list[int]:
    """Starts of the windows of ``length`` tokens, ``stride`` apart, the last one ending at the document's end."""
    if not 0 < stride <= length <= num_tokens:
        raise ValueError(f"need 0 < stride ({stride}) <= length ({length}) <= document tokens ({num_tokens})")
    return list(range(0, num_tokens - length, stride)) + [num_tokens - length]


def sliding_window_perplexity(
    model: torch.nn.Module,
    documents: Sequence[Sequence[int]],
    lengths: Sequence[int],
    stride: int | None = None,
    max_documents: int = 10,
    document_tokens: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
) -> list[PerplexityPoint]:
    """Perplexity at each of ``lengths`` (ascending), every one on the same documents: up to ``max_documents``
    of those with at least ``max(lengths)`` tokens, each cut to ``document_tokens`` (None: ``max(lengths)``),
    chosen by ``seed`` (:func:`select_documents`). ``stride`` None: half of each length."""
    lengths = sorted(lengths)
    if not lengths:
        return []
    if document_tokens is not None and document_tokens < lengths[-1]:
        raise ValueError(f"document_tokens ({document_tokens}) must be at least the longest length ({lengths[-1]})")
    scored = select_documents(documents, lengths[-1], document_tokens or lengths[-1], max_documents, seed)
    if not scored:
        logger.warning(
            "No evaluation document has %d tokens (the longest evaluated length): perplexity is undefined (nan) at "
            "every length; evaluate on longer documents or shorter long_context_eval.lengths",
            lengths[-1],
        )
    points = []
    progress = tqdm(total=len(lengths) * len(scored), desc="perplexity", leave=False)
    for length in lengths:
        step = stride or max(length // 2, 1)
        nll, tokens = 0.0, 0
        for document in scored:
            nll += document_nll(model, document, length, step, batch_size)
            tokens += len(document) - 1
            progress.update()
        perplexity = math.exp(nll / tokens) if tokens else float("nan")
        points.append(PerplexityPoint(length, perplexity, len(scored), step, tokens))
    progress.close()
    return points


@torch.inference_mode()
def document_nll(
    model: torch.nn.Module, document: Sequence[int], length: int, stride: int, batch_size: int = 16
) -> float:
    """Summed NLL of tokens 1.. of ``document``, each scored once by the first sliding window that reaches it."""
    ids = torch.tensor(document)
    starts = torch.tensor(window_starts(len(document), length, stride))
    windows = ids[starts[:, None] + torch.arange(length)]
    # Window k scores its tokens from position first[k] on: those past the previous window's end.
    first = torch.cat([torch.ones(1, dtype=torch.long), length - starts.diff()])
    scored = torch.arange(1, length)[None, :] >= first[:, None]  # over target positions 1..length-1
    labels = windows[:, 1:].masked_fill(~scored, -100)
    device = next(model.parameters()).device
    total = 0.0
    for begin in range(0, len(windows), batch_size):
        logits = model(input_ids=windows[begin : begin + batch_size].to(device)).logits[:, :-1].float()
        batch_labels = labels[begin : begin + batch_size].to(device)
        total += torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch_labels, reduction="sum").item()
    return total
