"""Every malformed data file is refused with one line naming the file, the row and the fix.

Per data kind (chat rows for SFT, documents, preference pairs, prompts with
answers), each way a file can be broken, from a missing file to a row of the
wrong shape, is a ``DataError`` of one line ``<file>: row N: <problem>; <fix>``
(``<file>:LINE:`` where the text does not parse, ``<file>: `` where no row is
involved). Through the entry scripts the same error exits with status 2 and
one line on stderr, before Ray starts or the run's directories exist.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from nemo_rl.data.document_dataset import DocumentLoader
from nemo_rl.data.preference_dataset import load_preference_dataset
from nemo_rl.data.prompt_dataset import load_prompt_dataset
from nemo_rl.data.sft_dataset import load_sft_dataset
from nemo_rl.models.builtin_models import resolve_model_path
from nemo_rl.utils.errors import DataError, MissingDataFile
from tests.helpers import entry_main


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


GOOD_ROWS = {
    "chat": {"messages": [_user("What is 2 + 3?"), _assistant("5")]},
    "documents": {"text": "def f():\n    return 1\n"},
    "preference": {"context": [_user("What is 2 + 3?")], "chosen": [_assistant("5")], "rejected": [_assistant("7")]},
    "prompts": {"messages": [_user("What is 2 + 3?")], "answer": "5"},
}
KINDS = tuple(GOOD_ROWS)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("tiny-qwen2"))


def _loader(kind: str, tokenizer) -> Callable[[Path], object]:
    """What a run does with a file of ``kind``: the reader its ``prepare`` calls."""
    return {
        "chat": lambda path: load_sft_dataset(path, tokenizer, max_seq_len=1024),
        "documents": lambda path: DocumentLoader(tokenizer, "text", True, cache_root=None).chunks(path, 64),
        "preference": lambda path: load_preference_dataset(path, tokenizer, max_seq_len=1024),
        "prompts": lambda path: load_prompt_dataset(path, tokenizer, max_prompt_length=1023),
    }[kind]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _refused(kind: str, tokenizer, path: Path) -> str:
    """The one-line message a ``kind`` reader refuses ``path`` with."""
    with pytest.raises(DataError) as err:
        _loader(kind, tokenizer)(path)
    message = str(err.value)
    assert "\n" not in message, message
    assert message.startswith(str(path)), message
    problem, _, fix = message.partition("; ")
    assert problem and fix, f"no fix after the problem: {message}"
    return message


# ------------------------------------------------------------------ the file itself, the same for every kind
def _missing(tmp_path: Path, good: dict) -> Path:
    return tmp_path / "missing.jsonl"


def _directory(tmp_path: Path, good: dict) -> Path:
    # Permission denied cannot be provoked as root; a directory in place of the file is the unreadable case.
    (tmp_path / "dir.jsonl").mkdir()
    return tmp_path / "dir.jsonl"


def _zero_bytes(tmp_path: Path, good: dict) -> Path:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    return tmp_path / "empty.jsonl"


def _blank_lines(tmp_path: Path, good: dict) -> Path:
    (tmp_path / "blank.jsonl").write_text("\n   \n\n")
    return tmp_path / "blank.jsonl"


def _empty_array(tmp_path: Path, good: dict) -> Path:
    (tmp_path / "empty.json").write_text("[]\n")
    return tmp_path / "empty.json"


def _zero_row_parquet(tmp_path: Path, good: dict) -> Path:
    table = pa.Table.from_pylist([good])
    pq.write_table(table.slice(0, 0), tmp_path / "empty.parquet")
    return tmp_path / "empty.parquet"


def _not_utf8(tmp_path: Path, good: dict) -> Path:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((json.dumps(good) + "\n").encode() + '{"text": "café"}\n'.encode("latin-1"))
    return path


def _bad_json_line(tmp_path: Path, good: dict) -> Path:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(good) + "\n" + '{"oops": nope}' + "\n")
    return path


def _bad_json_file(tmp_path: Path, good: dict) -> Path:
    path = tmp_path / "broken.json"
    path.write_text("[\n" + json.dumps(good) + ",\n" + '{"oops": nope}' + "\n]\n")
    return path


def _text_as_parquet(tmp_path: Path, good: dict) -> Path:
    path = tmp_path / "renamed.parquet"
    path.write_text(json.dumps(good) + "\n")
    return path


def _unsupported_suffix(tmp_path: Path, good: dict) -> Path:
    path = tmp_path / "rows.csv"
    path.write_text("messages,answer\n")
    return path


def _row_not_an_object(tmp_path: Path, good: dict) -> Path:
    return _jsonl(tmp_path / "list.jsonl", [good, [good]])


def _array_item_not_an_object(tmp_path: Path, good: dict) -> Path:
    path = tmp_path / "array.json"
    path.write_text(json.dumps([good, "just text"]))
    return path


FILE_CASES = {  # how the file is broken -> (make it, what the message says, the fix it gives)
    "missing file": (_missing, "missing.jsonl: no such data file", "fix the path"),
    "directory": (_directory, "dir.jsonl: the data file is a directory", "name the .jsonl, .json or .parquet file"),
    "zero bytes": (_zero_bytes, "empty.jsonl: the file is empty", "add rows like {"),
    "only blank lines": (_blank_lines, "blank.jsonl: no rows", "add rows like {"),
    "empty JSON array": (_empty_array, "empty.json: no rows", "add rows like {"),
    "Parquet with 0 rows": (_zero_row_parquet, "empty.parquet: no rows", "add rows like {"),
    "not UTF-8": (_not_utf8, "latin1.jsonl:2: not UTF-8 text (byte 0xe9)", "save the file as UTF-8"),
    "invalid JSON line": (_bad_json_line, "broken.jsonl:2: not valid JSON", "one JSON object per line"),
    "invalid JSON file": (_bad_json_file, "broken.json:3: not valid JSON", "a JSON array of row objects"),
    "text named .parquet": (_text_as_parquet, "renamed.parquet: not a readable Parquet file", "the .jsonl suffix"),
    "unsupported suffix": (_unsupported_suffix, "rows.csv: unsupported data file suffix '.csv'", "convert it"),
    "JSONL row not an object": (_row_not_an_object, "list.jsonl: row 2: expected an object, found a list", "write"),
    "JSON item not an object": (_array_item_not_an_object, "array.json: row 2: expected an object", "write it as {"),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", FILE_CASES)
def test_a_broken_file_is_one_line_naming_it_and_the_fix(tokenizer, tmp_path, kind, case):
    make, problem, fix = FILE_CASES[case]
    message = _refused(kind, tokenizer, make(tmp_path, GOOD_ROWS[kind]))
    assert problem in message and fix in message.partition("; ")[2], message


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_that_cannot_be_read_names_the_reason(tokenizer, tmp_path, monkeypatch, kind):
    """Permission denied, without chmod (root reads everything): the read itself fails."""
    path = _jsonl(tmp_path / "locked.jsonl", [GOOD_ROWS[kind]])

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    message = _refused(kind, tokenizer, path)
    assert "locked.jsonl: cannot be read (Permission denied); fix its permissions" in message


def test_a_missing_file_is_a_missing_data_file(tokenizer, tmp_path):
    with pytest.raises(MissingDataFile):
        _loader("chat", tokenizer)(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------- rows of the wrong shape, per kind
def _chat(*messages) -> dict:
    return {"messages": list(messages)}


ROW_CASES = {  # kind -> case -> (the bad row, what the message says, the fix it gives)
    "chat": {
        "misspelled key": ({"mesages": [_user("hi")]}, "no 'messages' (the row has 'mesages')", "rename 'mesages'"),
        "messages not a list": (_chat() | {"messages": "hi"}, "'messages' must be a non-empty list", "write each row"),
        "no messages": (_chat(), "'messages' must be a non-empty list of messages, found an empty list", "write"),
        "message not an object": (_chat("hi"), "message 1 of 'messages' must be an object, found a string", "write"),
        "message without content": (
            _chat({"role": "user"}),
            "message 1 of 'messages' needs a string 'content'",
            "text",
        ),
        "content not a string": (_chat(_user(["hi"])), "needs a string 'content', found a list", "give the message"),
        "unknown role": (
            _chat(_user("hi"), {"role": "asistant", "content": "5"}),
            "message 2 of 'messages' has role 'asistant' (allowed: 'system', 'user' or 'assistant')",
            "did you mean 'assistant'?",
        ),
        "unrelated role": (_chat({"role": "tool", "content": "x"}), "has role 'tool'", "use 'system', 'user' or"),
        "no role": (_chat({"content": "hi"}), "message 1 of 'messages' has no 'role'", "use 'system'"),
        "no assistant turn": (_chat(_user("hi")), "no assistant message to train on", "add the assistant's reply"),
    },
    "documents": {
        "no text": ({"body": "x = 1"}, "no 'text' (the row has 'body')", "set data.input_key"),
        "misspelled key": ({"txt": "x = 1"}, "no 'text' (the row has 'txt')", "rename 'txt' to 'text'"),
        "text not a string": ({"text": ["x = 1"]}, "'text' must be a string, found a list", "set data.input_key"),
        "text null": ({"text": None, "id": 3}, "no 'text' (the row has 'id')", "set data.input_key"),
        "empty object": ({}, "no 'text' (the row is empty)", "set data.input_key"),
    },
    "preference": {
        "no chosen": (
            {"context": [_user("hi")], "rejected": [_assistant("no")]},
            "no 'chosen' (the row has 'context', 'rejected')",
            "write each row as",
        ),
        "empty rejected": (
            {**GOOD_ROWS["preference"], "rejected": []},
            "'rejected' must be a non-empty list of messages, found an empty list",
            "write each row as",
        ),
        "chosen as a string": (
            {**GOOD_ROWS["preference"], "chosen": "5"},
            "'chosen' must be a non-empty list of messages, found a string",
            "write each row as",
        ),
        "user turn in a side": (
            {**GOOD_ROWS["preference"], "rejected": [_user("hi"), _assistant("7")]},
            "message 1 of 'rejected' has role 'user' (allowed: 'assistant')",
            "keep the shared conversation in 'context'",
        ),
        "side without content": (
            {**GOOD_ROWS["preference"], "chosen": [{"role": "assistant"}]},
            "message 1 of 'chosen' needs a string 'content', found null",
            "give the message its text",
        ),
        "unknown role in context": (
            {**GOOD_ROWS["preference"], "context": [{"role": "User", "content": "hi"}]},
            "message 1 of 'context' has role 'User'",
            "did you mean 'user'?",
        ),
    },
    "prompts": {
        "no answer": ({"messages": [_user("2 + 3?")]}, "no 'answer' (the row has 'messages')", "reference answer"),
        "null answer": ({"messages": [_user("2 + 3?")], "answer": None}, "no 'answer'", "reference answer"),
        "empty answer": (
            {"messages": [_user("2 + 3?")], "answer": ""},
            "'answer' must be a non-empty string or a number, found an empty string",
            "give the row the reference answer its reward checks",
        ),
        "answer an object": (
            {"messages": [_user("2 + 3?")], "answer": {"value": 5}},
            "'answer' must be a non-empty string or a number, found an object",
            "a string or number: {",
        ),
        "misspelled answer": ({"messages": [_user("2 + 3?")], "anwser": "5"}, "no 'answer'", "rename 'anwser'"),
        "no messages": ({"answer": "5"}, "no 'messages' (the row has 'answer')", "write each row as"),
        "unknown role": (
            {"messages": [{"role": "human", "content": "2 + 3?"}], "answer": "5"},
            "message 1 of 'messages' has role 'human'",
            "use 'system', 'user' or 'assistant'",
        ),
        "content not a string": (
            {"messages": [_user(5)], "answer": "5"},
            "message 1 of 'messages' needs a string 'content', found a number",
            "give the message its text",
        ),
    },
}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize(
    "kind, case", [(kind, case) for kind, cases in ROW_CASES.items() for case in cases], ids="-".join
)
def test_a_row_of_the_wrong_shape_names_its_row_and_the_fix(tokenizer, tmp_path, kind, case, fmt):
    bad, problem, fix = ROW_CASES[kind][case]
    good = GOOD_ROWS[kind]
    if fmt == "jsonl":  # a blank line first: the row number is the line the editor shows
        path = tmp_path / "rows.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
        row = 3
    else:
        path = tmp_path / "rows.parquet"
        try:  # a struct array takes the union of the rows' keys (a key a row lacks is null there)
            pq.write_table(pa.Table.from_struct_array(pa.array([good, bad])), path)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pytest.skip("a Parquet column holds one type: this row can only be written as JSON")
        row = 2
    message = _refused(kind, tokenizer, path)
    assert f"{path}: row {row}: " in message, message
    assert problem in message and fix in message.partition("; ")[2], message


@pytest.mark.parametrize("kind", ["chat", "preference", "prompts"])
def test_a_conversation_the_chat_template_refuses_is_this_rows_error(tokenizer, tmp_path, kind):
    refusing = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    refusing.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    row = json.loads(json.dumps(GOOD_ROWS[kind]))
    row["context" if kind == "preference" else "messages"].insert(0, {"role": "system", "content": "Be brief."})
    path = _jsonl(tmp_path / "rows.jsonl", [row])
    message = _refused(kind, refusing, path)
    assert "rows.jsonl: row 1: the tokenizer's chat template refuses these messages (System role not supported)" in (
        message
    )


# --------------------------------------------------------------------------------------- through the entry scripts
def _bad_row_file(directory: Path, kind: str, bad: dict) -> Path:
    return _jsonl(directory / f"bad-{kind}.jsonl", [GOOD_ROWS[kind], bad])


CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
ENTRY_CASES = {  # script, arguments for a file at path P (one more file, good, at G), what stderr says
    "sft chat: validation row with an unknown role": (
        "run_sft",
        ["--config", str(CONFIGS / "sft.yaml"), "data.val_data_path={P}"],
        lambda d: _bad_row_file(d, "chat", ROW_CASES["chat"]["unknown role"][0]),
        "bad-chat.jsonl: row 2: message 2 of 'messages' has role 'asistant'",
    ),
    "sft documents: validation file of invalid JSON": (
        "run_sft",
        ["data.dataset_name=my-corpus", "data.train_data_path={G}", "data.val_data_path={P}", "data.blend=[]"],
        lambda d: _bad_json_line(d, GOOD_ROWS["documents"]),
        "broken.jsonl:2: not valid JSON",
    ),
    "sft: long-context evaluation file with a row of the wrong shape": (
        "run_sft",
        ["long_context_eval.enabled=true", "long_context_eval.data_path={P}"],
        lambda d: _jsonl(d / "eval.jsonl", [GOOD_ROWS["documents"], {"body": "no text here"}]),
        "eval.jsonl: row 2: evaluation rows need a string 'text' or a 'messages' list",
    ),
    "dpo: pair without a rejected side": (
        "run_dpo",
        ["data.train_data_path={P}"],
        lambda d: _bad_row_file(d, "preference", ROW_CASES["preference"]["empty rejected"][0]),
        "bad-preference.jsonl: row 2: 'rejected' must be a non-empty list",
    ),
    "rm: validation text named .parquet": (
        "run_rm",
        ["data.val_data_path={P}"],
        lambda d: _text_as_parquet(d, GOOD_ROWS["preference"]),
        "renamed.parquet: not a readable Parquet file",
    ),
    "grpo: validation prompt without an answer": (
        "run_grpo_math",
        ["data.val_data_path={P}"],
        lambda d: _bad_row_file(d, "prompts", ROW_CASES["prompts"]["no answer"][0]),
        "bad-prompts.jsonl: row 2: no 'answer'",
    ),
    "distillation: empty training file": (
        "run_distillation_math",
        ["data.train_data_path={P}"],
        lambda d: _zero_bytes(d, {}),
        "empty.jsonl: the file is empty",
    ),
    "distillation: missing validation file": (
        "run_distillation_math",
        ["data.val_data_path={P}"],
        lambda d: d / "missing.jsonl",
        "missing.jsonl: no such validation data file",
    ),
}


def _ray_started() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@pytest.fixture(scope="module")
def builtin_models() -> None:
    """The scripts' built-in models made beforehand: their first use writes progress bars to stderr."""
    for name in ("tiny-qwen2", "tiny-qwen2-base", "tiny-qwen2-teacher"):
        resolve_model_path(name)


@pytest.mark.parametrize("case", ENTRY_CASES)
def test_the_entry_script_refuses_bad_data_in_one_line_before_anything_starts(
    builtin_models, tmp_path, capsys, monkeypatch, case
):
    script, args, make, expected = ENTRY_CASES[case]
    data = tmp_path / "data"
    data.mkdir()
    bad = make(data)
    good = _jsonl(data / "good.jsonl", [GOOD_ROWS["documents"]])
    log_dir, checkpoint_dir = tmp_path / "run" / "logs", tmp_path / "run" / "checkpoints"
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{P}", str(bad)).replace("{G}", str(good)) for a in args]
    code = entry_main(script)([*argv, f"logger.log_dir={log_dir}", f"checkpointing.checkpoint_dir={checkpoint_dir}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("Invalid data: "), err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "run").exists(), "no run directory may be created for bad data"
    assert not _ray_started()
