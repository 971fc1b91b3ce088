"""Built-in model and dataset names, resolved to local directories created on first use.

Runs never download anything: a config names either a local directory or a
built-in asset (``tiny-qwen2``, ``tiny-qwen2-teacher``, ``tiny-qwen2-base``, ``tiny-qwen2-base-init``,
``tiny-chat``, ``tiny-math``, ``tiny-preference``, ``python-stdlib``) that the project generates itself into the cache (:func:`nemo_rl.utils.cache_paths.nemo_rl_cache_dir`).

Several processes (Ray workers, parallel test runs) may ask for the same asset
at once, so creation goes through :func:`nemo_rl.utils.atomic_dir.build_atomically`
with a completion marker written last; a directory without the marker is never used.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

from nemo_rl.data.python_stdlib import corpus_name, write_python_stdlib
from nemo_rl.data.rows import DataError, MissingDataFile
from nemo_rl.data.tiny_chat import write_tiny_chat
from nemo_rl.data.tiny_math import write_tiny_math
from nemo_rl.data.tiny_preference import write_tiny_preference
from nemo_rl.models.tiny_base_model import cache_name as base_cache_name
from nemo_rl.models.tiny_base_model import copy_base_model, create_base_init
from nemo_rl.models.tiny_model import create_tiny_model, create_tiny_teacher
from nemo_rl.utils.atomic_dir import build_atomically
from nemo_rl.utils.cache_paths import nemo_rl_cache_dir

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".nemo_rl_complete"  # written last inside the temporary dir, before the rename
BUILTIN_MODELS: dict[str, Callable[[Path], object]] = {
    "tiny-qwen2": create_tiny_model,
    "tiny-qwen2-teacher": create_tiny_teacher,
    "tiny-qwen2-base": copy_base_model,  # pre-trained at a 128-token window, committed (tools/build_base_model.py)
    "tiny-qwen2-base-init": create_base_init,  # its shape and tokenizer, random weights: where pre-training starts
}
BUILTIN_DATASETS: dict[str, Callable[[Path], object]] = {
    "tiny-chat": write_tiny_chat,
    "tiny-math": write_tiny_math,
    "tiny-preference": write_tiny_preference,
    "python-stdlib": write_python_stdlib,
}
# Cache directory names that differ from the asset's name: the corpus is the running interpreter's, the
# pre-trained base is the committed one.
_CACHE_NAMES: dict[str, Callable[[], str]] = {"python-stdlib": corpus_name, "tiny-qwen2-base": base_cache_name}


def _cache_name(name: str) -> str:
    return _CACHE_NAMES[name]() if name in _CACHE_NAMES else name


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def _write_with_marker(build: Callable[[Path], object]) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        build(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"created_unix": time.time()}))

    return write


def materialize(target: Path, build: Callable[[Path], object]) -> Path:
    """``target``, built by ``build(tmp_dir)`` unless a complete copy exists.

    A ``target`` left without the marker (e.g. made by hand or by an older
    layout) is replaced, not trusted.
    """
    if build_atomically(target, _write_with_marker(build), is_complete):
        logger.info("Created built-in asset %s", target)
    return target


def resolve_model_path(model_name: str) -> Path:
    """The local HF directory for ``model_name``.

    Built-in names win (so the result never depends on the working directory;
    write ``./tiny-qwen2`` to mean a local folder of that name), then existing
    local directories, then a hub id only if it is already in the local HF cache.
    """
    if model_name in BUILTIN_MODELS:
        return materialize(nemo_rl_cache_dir() / "tiny_models" / _cache_name(model_name), BUILTIN_MODELS[model_name])
    local = Path(model_name).expanduser()
    if local.is_dir():
        return local
    try:
        return Path(snapshot_download(model_name, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError):
        raise FileNotFoundError(
            f"model {model_name!r} is neither a local HF model directory nor a built-in model "
            f"(built-ins: {', '.join(sorted(BUILTIN_MODELS))}), and it is not in the local Hugging Face cache. "
            "nemo_rl downloads nothing at run time: pass a local directory or a built-in name."
        ) from None


def _existing_file(path: str, split: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise MissingDataFile(f"{split} data file {file} does not exist; fix the path in the data config")
    return file


def resolve_dataset_paths(
    dataset_name: str, train_data_path: str | None, val_data_path: str | None
) -> tuple[Path, Path | None]:
    """(train JSONL, validation JSONL or None) for a data config.

    An explicit path wins over the built-in file of the same split and must
    exist; a dataset that is not built in needs an explicit training file.
    """
    builtin: dict[str, Path] = {}
    if dataset_name in BUILTIN_DATASETS and (train_data_path is None or val_data_path is None):
        root = materialize(nemo_rl_cache_dir() / "datasets" / _cache_name(dataset_name), BUILTIN_DATASETS[dataset_name])
        builtin = {"train": root / "train.jsonl", "validation": root / "validation.jsonl"}
    elif train_data_path is None:
        raise DataError(
            f"dataset {dataset_name!r} is not built in (built-ins: {', '.join(sorted(BUILTIN_DATASETS))}); "
            "set data.train_data_path to a JSONL or Parquet file of rows"
        )
    train = _existing_file(train_data_path, "train") if train_data_path is not None else builtin["train"]
    val = _existing_file(val_data_path, "validation") if val_data_path is not None else builtin.get("validation")
    return train, val
