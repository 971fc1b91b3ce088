"""Built-in dataset names, resolved to local files created on first use.

Runs never download anything: a data config names either a local file or a
built-in dataset (``tiny-chat``, ``tiny-math``, ``tiny-preference``, ``python-stdlib``)
that the project generates itself into the cache
(:func:`nemo_rl.utils.cache_paths.nemo_rl_cache_dir`) through
:func:`nemo_rl.utils.atomic_dir.materialize`. Built-in models are
``nemo_rl.models.builtin_models``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from nemo_rl.data.python_stdlib import corpus_name, write_python_stdlib
from nemo_rl.data.rows import existing_data_file
from nemo_rl.data.tiny_chat import write_tiny_chat
from nemo_rl.data.tiny_math import write_tiny_math
from nemo_rl.data.tiny_preference import write_tiny_preference
from nemo_rl.utils.atomic_dir import materialize
from nemo_rl.utils.cache_paths import nemo_rl_cache_dir
from nemo_rl.utils.errors import DataError

logger = logging.getLogger(__name__)

BUILTIN_DATASETS: dict[str, Callable[[Path], object]] = {
    "tiny-chat": write_tiny_chat,
    "tiny-math": write_tiny_math,
    "tiny-preference": write_tiny_preference,
    "python-stdlib": write_python_stdlib,
}


def resolve_dataset_paths(
    dataset_name: str, train_data_path: str | None, val_data_path: str | None
) -> tuple[Path, Path | None]:
    """(train file, validation file or None) for a data config.

    An explicit path wins over the built-in file of the same split and must
    exist (checked here, so a typo in either path fails before any data is
    tokenized); a dataset that is not built in needs an explicit training file.
    """
    builtin: dict[str, Path] = {}
    if dataset_name in BUILTIN_DATASETS and (train_data_path is None or val_data_path is None):
        cache_name = corpus_name() if dataset_name == "python-stdlib" else dataset_name  # the running interpreter's
        root = materialize(nemo_rl_cache_dir() / "datasets" / cache_name, BUILTIN_DATASETS[dataset_name])
        builtin = {"train": root / "train.jsonl", "validation": root / "validation.jsonl"}
    elif train_data_path is None:
        raise DataError(
            f"dataset {dataset_name!r} is not built in (built-ins: {', '.join(sorted(BUILTIN_DATASETS))}); "
            "set data.train_data_path to a .jsonl, .json or .parquet file of rows"
        )
    train = (
        existing_data_file(Path(train_data_path), "train data file")
        if train_data_path is not None
        else builtin["train"]
    )
    val = (
        existing_data_file(Path(val_data_path), "validation data file")
        if val_data_path is not None
        else builtin.get("validation")
    )
    return train, val
