"""Dataset rows from a file, whatever the format it was shipped in, and the one way a bad file or row is reported.

Datasets arrive as JSONL (what the built-ins write and what is easy to make by
hand), as JSON (an array of rows, or JSON Lines under a ``.json`` name, which
is what ``datasets`` writes) or as Parquet (how hub datasets are usually
stored). Reading all of them into the same rows keeps every loader
format-blind, so a dataset never has to be converted before a run can use it.

Every problem with a data file is a :class:`DataError` of one line that names
the file, where in it, what is wrong and the fix, so the entry scripts can
report it like a bad config before anything starts. Where text does not parse,
the place is ``file:LINE`` (the editor's line); a parsed row is
``file: row N``, N counted as the user sees it: the line in a JSONL file, the
1-based index in a JSON array or Parquet table. The checks every data kind
shares (a field of the right type, chat messages) are :class:`Row` methods,
so the SFT, preference and prompt readers word the same mistake the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from nemo_rl.utils.errors import DataError, MissingDataFile, nearest_key

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")
CHAT_ROLES = ("system", "user", "assistant")
MESSAGE = '{"role": "user", "content": "..."}'

T = TypeVar("T")
P = ParamSpec("P")


@dataclass(frozen=True)
class Row:
    """One row of a data file and where it sits there, so that a problem with it names the place to fix."""

    path: Path
    number: int  # 1-based: the line of a JSONL file, the index in a JSON array or Parquet table
    fields: dict[str, Any]

    def error(self, problem: str, fix: str) -> DataError:
        return row_error(self.path, self.number, problem, fix)

    def field(self, key: str, kind: str, ok: Callable[[Any], bool], fix: str) -> Any:
        """The value under ``key`` when ``ok`` accepts it; otherwise an error saying what the row holds instead.

        A missing key and a null are the same mistake (Parquet fills a column
        some rows lack with nulls); a near miss among the row's keys is
        probably a typo, so renaming it is the fix offered first.
        """
        value = self.fields.get(key)
        if ok(value):
            return value
        if value is not None:
            raise self.error(f"{key!r} must be {kind}, found {describe(value)}", fix)
        present = sorted(k for k, v in self.fields.items() if v is not None)
        near = nearest_key(key, present)
        has = f"the row has {', '.join(map(repr, present))}" if present else "the row is empty"
        raise self.error(f"no {key!r} ({has})", f"rename {near!r} to {key!r}" if near else fix)

    def string(self, key: str, fix: str) -> str:
        return self.field(key, "a string", lambda v: isinstance(v, str), fix)

    def messages(
        self, key: str, fix: str, roles: Sequence[str] = CHAT_ROLES, role_fix: str | None = None
    ) -> list[dict[str, Any]]:
        """``key``'s chat: a non-empty list of ``{"role", "content"}`` objects, each role one of ``roles``.

        Checked before tokenizing because a chat template fails on a bad
        message with an error about the template, not about the row. A role
        that is not allowed is most often a typo (the nearest allowed one is
        offered), else ``role_fix`` says where such a message belongs.
        """
        messages = self.field(key, "a non-empty list of messages", _non_empty_list, fix)
        for i, message in enumerate(messages, 1):
            where = f"message {i} of {key!r}"
            if not isinstance(message, dict):
                raise self.error(f"{where} must be an object, found {describe(message)}", f"write it as {MESSAGE}")
            role, content = message.get("role"), message.get("content")
            if role not in roles:
                allowed = _either(roles)
                near = nearest_key(role, roles) if isinstance(role, str) else None
                found = "has no 'role'" if role is None else f"has role {role!r}"
                raise self.error(
                    f"{where} {found} (allowed: {allowed})",
                    f"did you mean {near!r}?" if near else role_fix or f"use {allowed}",
                )
            if not isinstance(content, str):
                raise self.error(
                    f"{where} needs a string 'content', found {describe(content)}", "give the message its text"
                )
        return messages

    def tokenized(self, tokenize: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``tokenize(*args, **kwargs)`` on this row's messages, a chat template refusing them (say, roles that
        do not alternate) reported as this row's error rather than as the template's traceback."""
        from jinja2.exceptions import TemplateError  # what transformers' chat templates raise

        try:
            return tokenize(*args, **kwargs)
        except TemplateError as err:
            raise self.error(
                f"the tokenizer's chat template refuses these messages ({_first_line(err)})",
                "fix the row's messages, or use a tokenizer whose template accepts them",
            ) from err


def row_error(path: Path, number: int, problem: str, fix: str) -> DataError:
    """The one form of a row's problem: ``<file>: row N: <what is wrong>; <the fix>``."""
    return DataError(f"{path}: row {number}: {problem}; {fix}")


def describe(value: Any) -> str:
    """A wrong value as its JSON type ("a number", "an empty list"), which is what the user wrote in the file."""
    if value is None:
        return "null"
    name = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )
    if isinstance(value, str | list | dict) and not value:
        return f"an empty {name}"
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def load_rows(path: Path, shape: str) -> list[Row]:
    """The rows of a ``.jsonl``, ``.json`` or ``.parquet`` file, in file order, each an object.

    ``shape`` is what a row of the caller's kind looks like; the messages for
    an empty file or a row that is not an object show it as the fix. Every
    failure to read is a :class:`DataError` naming the file (a library's own
    exception is its cause, never the message).
    """
    path = existing_data_file(Path(path))
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"{path}: unsupported data file suffix {path.suffix!r} (supported: {', '.join(SUPPORTED_SUFFIXES)}); "
            "convert it to JSON Lines or Parquet"
        )
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty; add rows like {shape}, or fix the path")
        values = _read_parquet(path) if suffix == ".parquet" else _read_json(path, suffix)
    except OSError as err:
        reason = err.strerror or _first_line(err)
        raise DataError(f"{path}: cannot be read ({reason}); fix its permissions or the path") from err
    if not values:
        raise DataError(f"{path}: no rows; add rows like {shape}, or fix the path")
    rows = []
    for number, value in values:
        if not isinstance(value, dict):
            raise row_error(path, number, f"expected an object, found {describe(value)}", f"write it as {shape}")
        rows.append(Row(path, number, value))
    return rows


def read_rows(path: Path) -> list[dict]:
    """The rows of a data file as plain dicts, for readers that accept more than one row shape."""
    return [row.fields for row in load_rows(path, "a JSON object")]


def existing_data_file(path: Path, what: str = "data file") -> Path:
    """``path`` when it is a file; a :class:`MissingDataFile` (or a directory named instead) names ``what`` it is."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingDataFile(f"{path}: no such {what}; fix the path in the data config")
    if not path.is_file():
        raise DataError(f"{path}: the {what} is a directory; name the .jsonl, .json or .parquet file itself")
    return path


def _read_parquet(path: Path) -> list[tuple[int, Any]]:
    import pyarrow as pa  # only runs that read Parquet pay for the import
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except pa.ArrowException as err:
        raise DataError(
            f"{path}: not a readable Parquet file ({_first_line(err)}); write it with pandas' to_parquet or "
            "pyarrow.parquet.write_table, or give a JSON Lines file the .jsonl suffix"
        ) from err
    return list(enumerate(rows, 1))


def _read_json(path: Path, suffix: str) -> list[tuple[int, Any]]:
    """(row number, value) of a JSONL file, or of a ``.json`` file holding an array (or one row, or JSON Lines)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8"
        ) from err
    if suffix == ".json" and text.strip():
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # more than one value: JSON Lines, read line by line below
                raise DataError(
                    f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}); fix the file: a JSON "
                    "array of row objects, or one object per line"
                ) from err
        else:
            return list(enumerate(whole, 1)) if isinstance(whole, list) else [(1, whole)]
    return _json_lines(path, text)


def _json_lines(path: Path, text: str) -> list[tuple[int, Any]]:
    """(line number, value) of every non-blank line: the row number is the line the user's editor shows."""
    values = []
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            values.append((line_no, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno}); fix the line: JSON Lines "
                "hold one JSON object per line"
            ) from err
    return values


def _non_empty_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value)


def _either(choices: Sequence[str]) -> str:
    quoted = [repr(c) for c in choices]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _first_line(err: Exception) -> str:
    """A library's message, cut to its first line: the report stays one line."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
