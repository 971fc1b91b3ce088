"""Document data for continued pre-training: rows of ``{"text": ...}`` -> chunks with a loss on every token.

Context extension is trained on long documents (the YaRN paper fine-tunes on
PG19 books chunked to 64k tokens), not on conversations. A document is
tokenized, ends with the end-of-document token (``data.add_eos``), and is cut
into consecutive chunks of at most ``policy.max_total_sequence_length`` tokens:
nothing is truncated away, the tail is its own (shorter) chunk. Short chunks
are what sequence packing places side by side in one row (positions restart,
no attention across documents; see ``nemo_rl.data.packing``).

An extension mix is more than long documents (ProLong: keep short data in the
mix, or long-context training costs short-context skills), so a training set
can blend extra sources (``data.blend``), each a share of the training tokens
and each chunked to its own ``max_document_tokens``: the same corpus in
original-window chunks, synthetic retrieval documents, another corpus.

Chunks are stored as one flat int32 array with offsets (tens of millions of
tokens as Python lists would take gigabytes) and become ``SFTSample`` rows on
access, so the SFT collate, packing and loss work unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from nemo_rl.data.retrieval_documents import RetrievalDocuments
from nemo_rl.data.rows import existing_data_file, load_rows
from nemo_rl.data.sft_dataset import SFTSample
from nemo_rl.utils.atomic_dir import build_atomically
from nemo_rl.utils.errors import DataError

logger = logging.getLogger(__name__)

_TOKENIZE_BATCH = 256  # documents per call to the fast tokenizer
_TOKENS_COMPLETE = "complete.json"  # written last into a token cache entry


def document_texts(path: Path, input_key: str) -> list[str]:
    """The ``input_key`` strings of a data file; a row without one is an error naming file, row and fix."""
    fix = f"fix the row, or set data.input_key to the field that holds the text (now {input_key!r})"
    return [row.string(input_key, fix) for row in load_rows(path, f'{{"{input_key}": "..."}}')]


@dataclass(frozen=True)
class TokenizedDocuments:
    """Every document's token ids end to end (``flat``, int32) and each document's length."""

    flat: np.ndarray
    lengths: np.ndarray

    def save(self, directory: Path) -> None:
        np.save(directory / "tokens.npy", self.flat)
        np.save(directory / "lengths.npy", self.lengths)

    @classmethod
    def load(cls, directory: Path) -> TokenizedDocuments:
        return cls(np.load(directory / "tokens.npy"), np.load(directory / "lengths.npy"))


def tokenize_documents(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, add_eos: bool) -> TokenizedDocuments:
    """Token ids of each document, each ending with the tokenizer's end-of-document token when ``add_eos``."""
    if add_eos and tokenizer.eos_token_id is None:
        raise DataError("data.add_eos is true but the tokenizer has no eos_token; set data.add_eos=false")
    tail = [tokenizer.eos_token_id] if add_eos else []
    pieces, lengths = [], []
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        batch = tokenizer(list(texts[start : start + _TOKENIZE_BATCH]), add_special_tokens=False)["input_ids"]
        for ids in batch:
            pieces.append(np.asarray(list(ids) + tail, dtype=np.int32))
            lengths.append(len(pieces[-1]))
    flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return TokenizedDocuments(flat, np.asarray(lengths, dtype=np.int64))


def chunk_bounds(length: int, max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, end)`` pieces of at most ``max_tokens`` covering all ``length`` tokens."""
    return [(start, min(start + max_tokens, length)) for start in range(0, length, max_tokens)]


class DocumentChunks(Sequence):
    """Chunks of tokenized documents as ``SFTSample`` rows with a loss on every token.

    Chunks shorter than 2 tokens predict nothing (a lone end-of-document token
    after an exact multiple of the chunk length) and are left out.
    """

    def __init__(self, documents: TokenizedDocuments, max_tokens: int):
        self.flat = documents.flat
        self.num_documents = len(documents.lengths)
        starts, ends, offset = [], [], 0
        for n in documents.lengths.tolist():
            for a, b in chunk_bounds(n, max_tokens):
                if b - a >= 2:
                    starts.append(offset + a)
                    ends.append(offset + b)
            offset += n
        self.starts = np.asarray(starts, dtype=np.int64)
        self.ends = np.asarray(ends, dtype=np.int64)

    @classmethod
    def of(cls, documents: Sequence[Sequence[int]], max_tokens: int) -> DocumentChunks:
        """Chunks of documents given as token lists (tests, small in-memory sets)."""
        lengths = np.asarray([len(d) for d in documents], dtype=np.int64)
        flat = np.fromiter((t for d in documents for t in d), dtype=np.int32, count=int(lengths.sum()))
        return cls(TokenizedDocuments(flat, lengths), max_tokens)

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def num_tokens(self) -> int:
        return int((self.ends - self.starts).sum())

    def __getitem__(self, index: int) -> SFTSample:  # pyright: ignore[reportIncompatibleMethodOverride]  (int only: loaders never slice)
        ids = self.flat[self.starts[index] : self.ends[index]].tolist()
        return SFTSample(ids, [1] * len(ids))


@dataclass(frozen=True)
class SyntheticChunks(Sequence):
    """Synthetic retrieval documents as ``SFTSample`` rows (generated when accessed)."""

    documents: RetrievalDocuments

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> SFTSample:  # pyright: ignore[reportIncompatibleMethodOverride]  (int only: loaders never slice)
        ids = self.documents[index]
        return SFTSample(ids, [1] * len(ids))

    def mean_tokens(self, probe: int = 64) -> float:
        """Average document length over the first ``probe`` documents (they are i.i.d. by construction)."""
        n = min(probe, len(self))
        return sum(len(self.documents[i]) for i in range(n)) / n


class Subset(Sequence):
    """Items of ``base`` at ``indices`` (a blend's draw from one source)."""

    def __init__(self, base: Sequence, indices: np.ndarray):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):  # pyright: ignore[reportIncompatibleMethodOverride]  (int only: loaders never slice)
        return self.base[int(self.indices[index])]


class BlendedDocuments(Sequence):
    """Sources one after another; the resumable loader's shuffle mixes them (``data.shuffle``)."""

    def __init__(self, parts: Sequence[tuple[str, Sequence]]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for _, p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> SFTSample:  # pyright: ignore[reportIncompatibleMethodOverride]  (int only: loaders never slice)
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part][1][index - int(self.offsets[part])]

    def composition(self) -> dict[str, int]:
        return {name: len(p) for name, p in self.parts}


def draw(count: int, available: int, seed: int) -> np.ndarray:
    """``count`` indices into ``available`` items: whole shuffled passes, then part of one more (repeats only if needed)."""
    rng = np.random.default_rng(seed)
    passes = [rng.permutation(available) for _ in range(-(-count // available))]
    return np.concatenate(passes)[:count] if passes else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class BlendSource:
    """One extra source of a training blend (``data.blend[i]``), resolved to a file or the synthetic generator."""

    name: str
    share: float
    max_tokens: int
    path: Path | None  # None: synthetic retrieval documents


class DocumentLoader:
    """Tokenizes each file once per run, however many sources (chunk lengths) read it, and once per machine.

    Tokenizing the ten million tokens of the built-in corpus takes longer than a
    short fine-tuning run trains on it, so the result is cached on disk (as
    Megatron's indexed datasets are), keyed by the file's name, size and
    modification time, the tokenizer's full definition, ``input_key`` and
    ``add_eos``: any change to one of them tokenizes again.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, input_key: str, add_eos: bool, cache_root: Path | None):
        self.tokenizer, self.input_key, self.add_eos = tokenizer, input_key, add_eos
        self.cache_root = cache_root
        self._tokenized: dict[Path, TokenizedDocuments] = {}

    def documents(self, path: Path) -> TokenizedDocuments:
        path = Path(path)
        if path not in self._tokenized:
            self._tokenized[path] = self._load_or_tokenize(path)
        return self._tokenized[path]

    def _tokenize(self, path: Path) -> TokenizedDocuments:
        return tokenize_documents(document_texts(path, self.input_key), self.tokenizer, self.add_eos)

    def _load_or_tokenize(self, path: Path) -> TokenizedDocuments:
        if self.cache_root is None:
            return self._tokenize(path)
        stat = existing_data_file(path).stat()  # a missing file is a DataError, not a traceback
        key = json.dumps(
            [path.name, stat.st_size, stat.st_mtime_ns, self.input_key, self.add_eos, self._tokenizer_digest()]
        )
        target = self.cache_root / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

        def write(tmp: Path) -> None:
            self._tokenize(path).save(tmp)
            (tmp / _TOKENS_COMPLETE).write_text(key)

        if build_atomically(target, write, lambda d: (d / _TOKENS_COMPLETE).is_file()):
            logger.info("tokenized %s into %s", path, target)
        return TokenizedDocuments.load(target)

    def _tokenizer_digest(self) -> str:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        definition = backend.to_str() if backend is not None else repr(self.tokenizer)
        return hashlib.sha256(definition.encode()).hexdigest()

    def chunks(self, path: Path, max_tokens: int) -> DocumentChunks:
        chunks = DocumentChunks(self.documents(path), max_tokens)
        if not len(chunks):
            raise DataError(f"{path}: no document has 2 or more tokens; give the documents their text")
        return chunks

    def blend(self, main_path: Path, max_tokens: int, sources: Sequence[BlendSource], seed: int) -> BlendedDocuments:
        """The main file's chunks plus each source's draw, sized so that it holds ``share`` of the tokens.

        The main source keeps all its chunks and the remaining share; a source's
        chunk count is its token target over its mean chunk length.
        """
        main = self.chunks(main_path, max_tokens)
        remaining = 1.0 - sum(s.share for s in sources)
        if remaining <= 0:
            raise DataError("data.blend: the shares must sum to less than 1 (the main dataset keeps the rest)")
        total_tokens = main.num_tokens / remaining
        parts: list[tuple[str, Sequence]] = [(str(main_path), main)]
        for i, source in enumerate(sources):
            if source.path is None:
                probe = SyntheticChunks(RetrievalDocuments(self.tokenizer, source.max_tokens, 64, seed + i))
                count = max(round(source.share * total_tokens / probe.mean_tokens()), 1)
                docs = RetrievalDocuments(self.tokenizer, source.max_tokens, count, seed + i)
                parts.append((source.name, SyntheticChunks(docs)))
                continue
            chunks = self.chunks(source.path, source.max_tokens)
            count = max(round(source.share * total_tokens / (chunks.num_tokens / len(chunks))), 1)
            if count > len(chunks):
                logger.warning(
                    "data.blend[%d] (%s): %d chunks requested for share %.3f, %d available: repeating some",
                    i,
                    source.name,
                    count,
                    source.share,
                    len(chunks),
                )
            parts.append((source.name, Subset(chunks, draw(count, len(chunks), seed + 1000 + i))))
        blended = BlendedDocuments(parts)
        logger.info("training documents: %s", ", ".join(f"{k}: {v} chunks" for k, v in blended.composition().items()))
        return blended
