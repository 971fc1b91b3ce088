"""Document data: chunking without truncation, a loss on every token, packing boundaries, blends, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from nemo_rl.data.dataloader import ResumableDataloader
from nemo_rl.data.document_dataset import BlendSource, DocumentChunks, DocumentLoader, chunk_bounds, draw
from nemo_rl.data.packing import pack_batch
from nemo_rl.data.python_stdlib import split_of, stdlib_documents
from nemo_rl.data.retrieval_documents import RetrievalDocuments
from nemo_rl.data.sft_dataset import collate
from nemo_rl.models.tiny_model import create_tiny_model
from nemo_rl.utils.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(create_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen2"))


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_chunk_bounds_cover_every_token():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(8, 4) == [(0, 4), (4, 8)]
    assert chunk_bounds(3, 4) == [(0, 3)]


def test_long_documents_are_chunked_not_truncated_and_end_with_eos(tokenizer, tmp_path):
    long_text = " ".join(f"apple{i % 10}" for i in range(400))
    path = _write(tmp_path / "docs.jsonl", [{"text": long_text}, {"text": "red blue"}])
    loader = DocumentLoader(tokenizer, "text", add_eos=True, cache_root=None)
    tokenized = loader.documents(path)
    ends = tokenized.lengths.cumsum()
    documents = [tokenized.flat[e - n : e].tolist() for e, n in zip(ends, tokenized.lengths)]
    assert all(d[-1] == tokenizer.eos_token_id for d in documents)
    assert len(documents[0]) > 3 * 64
    chunks = loader.chunks(path, 64)
    pieces = [chunks[i].input_ids for i in range(len(chunks))]
    assert all(len(p) <= 64 for p in pieces)
    # The chunks of document 0, in order, are the document: nothing dropped, nothing repeated.
    first = [t for p in pieces[:-1] for t in p]
    assert first == documents[0]
    assert pieces[-1] == documents[1]
    assert chunks.num_tokens == sum(len(d) for d in documents)
    assert all(set(chunks[i].loss_mask) == {1} for i in range(len(chunks)))  # loss on every token


def test_a_lone_eos_chunk_predicts_nothing_and_is_left_out(tokenizer):
    chunks = DocumentChunks.of([[5, 6, 7, 8, 0], [9, 0]], max_tokens=4)
    assert [chunks[i].input_ids for i in range(len(chunks))] == [[5, 6, 7, 8], [9, 0]]


def test_packed_documents_restart_positions_and_do_not_see_each_other(tokenizer):
    samples = DocumentChunks.of([[3, 4, 5, 0], [6, 7, 0], [8, 9, 10, 11, 0]], max_tokens=16)
    batch = collate([samples[i] for i in range(3)], tokenizer.pad_token_id, divisible_by=1)
    rows, stats = pack_batch(batch, capacity=16, multiple=1)
    assert len(rows) == 1 and stats.real_tokens == 12
    row = rows[0]
    bounds = row["cu_seqlens"].tolist()
    assert bounds == [0, 4, 7, 12, 16]  # one segment per document, then the padding segment
    for start, end in zip(bounds[:-2], bounds[1:-1]):
        assert row["position_ids"][0, start:end].tolist() == list(range(end - start))
        # The first token of each document is not a target: nothing of its own document precedes it.
        assert row["loss_mask"][0, start] == 0 and row["loss_mask"][0, start + 1 : end].tolist() == [1] * (
            end - start - 1
        )
    assert row["loss_mask"][0, 12:].sum() == 0


def test_rows_without_text_name_file_row_and_fix(tokenizer, tmp_path):
    path = _write(tmp_path / "bad.jsonl", [{"text": "fine"}, {"content": "no text key"}])
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: no 'text' \(the row has 'content'\); .*data.input_key"):
        DocumentLoader(tokenizer, "text", add_eos=True, cache_root=None).documents(path)
    with pytest.raises(DataError, match="row 1: 'text' must be a string, found a number"):
        DocumentLoader(tokenizer, "text", add_eos=True, cache_root=None).documents(
            _write(tmp_path / "int.jsonl", [{"text": 3}])
        )


def test_tokenized_documents_are_cached_until_file_or_tokenizer_change(tokenizer, tmp_path, monkeypatch):
    import nemo_rl.data.document_dataset as documents

    path = _write(tmp_path / "docs.jsonl", [{"text": "red blue green"}, {"text": "cat dog"}])
    cache = tmp_path / "tokens"
    first = DocumentLoader(tokenizer, "text", True, cache).documents(path)
    calls = []
    real = documents.tokenize_documents
    monkeypatch.setattr(documents, "tokenize_documents", lambda *a: calls.append(a) or real(*a))
    again = DocumentLoader(tokenizer, "text", True, cache).documents(path)
    assert calls == [] and again.flat.tolist() == first.flat.tolist() and again.lengths.tolist() == [4, 3]
    DocumentLoader(tokenizer, "text", False, cache).documents(path)  # add_eos is part of the key
    assert len(calls) == 1
    _write(path, [{"text": "red blue green plum"}])  # the file changed
    changed = DocumentLoader(tokenizer, "text", True, cache).documents(path)
    assert len(calls) == 2 and changed.lengths.tolist() == [5]


def test_parquet_documents_and_another_input_key(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist([{"body": "red blue green"}, {"body": "cat dog"}]), path)
    chunks = DocumentLoader(tokenizer, "body", add_eos=False, cache_root=None).chunks(path, 64)
    assert [tokenizer.decode(chunks[i].input_ids) for i in range(2)] == ["red blue green", "cat dog"]


def test_retrieval_documents_fit_their_window_and_are_reproducible(tokenizer):
    docs = RetrievalDocuments(tokenizer, max_tokens=128, size=200, seed=3)
    lengths = [len(docs[i]) for i in range(len(docs))]
    assert max(lengths) <= 128 and min(lengths) >= 16
    assert all(docs[i][-1] == tokenizer.eos_token_id for i in range(10))
    again = RetrievalDocuments(tokenizer, max_tokens=128, size=200, seed=3)
    assert [again[i] for i in range(20)] == [docs[i] for i in range(20)]
    texts = [tokenizer.decode(docs[i]) for i in range(len(docs))]
    assert any("The pass key is" in t for t in texts) and any("What is the value of" in t for t in texts)
    with pytest.raises(ValueError, match="need at least"):
        RetrievalDocuments(tokenizer, max_tokens=8, size=1)


def test_blend_gives_each_source_its_share_of_tokens(tokenizer, tmp_path):
    corpus = " ".join(f"banana{i % 10} cherry" for i in range(300))
    main = _write(tmp_path / "main.jsonl", [{"text": corpus}] * 10)
    loader = DocumentLoader(tokenizer, "text", add_eos=True, cache_root=None)
    sources = [
        BlendSource("short", 0.2, 32, main),  # the same corpus in short chunks
        BlendSource("synthetic", 0.3, 128, None),
    ]
    blend = loader.blend(main, 256, sources, seed=0)
    parts = dict(blend.parts)
    tokens = {name: sum(len(part[i].input_ids) for i in range(len(part))) for name, part in parts.items()}
    total = sum(tokens.values())
    assert abs(tokens["short"] / total - 0.2) < 0.03
    assert abs(tokens["synthetic"] / total - 0.3) < 0.03
    assert max(len(parts["short"][i].input_ids) for i in range(len(parts["short"]))) <= 32
    assert len(blend) == sum(len(p) for p in parts.values())
    with pytest.raises(DataError, match="sum to less than 1"):
        loader.blend(main, 256, [BlendSource("a", 0.6, 32, main), BlendSource("b", 0.4, 32, None)], seed=0)


def test_draw_repeats_only_after_a_full_pass():
    picks = draw(7, 5, seed=0)
    assert sorted(picks[:5].tolist()) == [0, 1, 2, 3, 4] and len(picks) == 7


def test_resume_mid_epoch_gives_the_uninterrupted_batches(tokenizer, tmp_path):
    main = _write(tmp_path / "main.jsonl", [{"text": " ".join(["plum"] * (20 + 7 * i))} for i in range(30)])
    blend = DocumentLoader(tokenizer, "text", add_eos=True, cache_root=None).blend(
        main, 128, [BlendSource("s", 0.3, 128, None)], 0
    )
    straight = ResumableDataloader(blend, 4, shuffle=True, seed=1)
    seen = [straight.next_batch() for _ in range(len(blend) // 4 + 3)]  # crosses an epoch boundary
    first = ResumableDataloader(blend, 4, shuffle=True, seed=1)
    for _ in range(5):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # as written into a checkpoint
    rebuilt = DocumentLoader(tokenizer, "text", add_eos=True, cache_root=None).blend(
        main, 128, [BlendSource("s", 0.3, 128, None)], 0
    )
    resumed = ResumableDataloader(rebuilt, 4, shuffle=True, seed=1)
    resumed.load_state_dict(state)
    rest = [resumed.next_batch() for _ in range(len(seen) - 5)]
    assert rest == seen[5:]


def test_stdlib_corpus_split_is_deterministic_and_has_long_documents(tokenizer):
    rows = stdlib_documents()
    assert len(rows) > 500
    splits = {split_of(r["path"]) for r in rows}
    assert splits == {"train", "validation"}
    assert split_of("json/decoder.py") == split_of("json/decoder.py")
    validation = [r for r in rows if split_of(r["path"]) == "validation"]
    assert 0.02 < len(validation) / len(rows) < 0.1
    assert not any("site-packages" in r["path"] for r in rows)
    longest = max(rows, key=lambda r: len(r["text"]))
    assert len(tokenizer(longest["text"][:200_000], add_special_tokens=False)["input_ids"]) > 4096


def test_collated_documents_train_on_every_real_token(tokenizer):
    samples = DocumentChunks.of([[3, 4, 5, 0], [6, 0]], max_tokens=16)
    batch = collate([samples[0], samples[1]], tokenizer.pad_token_id, divisible_by=8)
    assert batch["loss_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    assert torch.equal(batch["input_lengths"], torch.tensor([4, 2]))
