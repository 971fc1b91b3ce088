"""Built-in model names, resolved to local HF directories created on first use.

Runs never download anything: a config names either a local directory or a
built-in model (``tiny-qwen2``, ``tiny-qwen2-teacher``, ``tiny-qwen2-20m``, ``tiny-qwen2-base``,
``tiny-qwen2-base-init``, and the real shapes ``qwen3-0.6b-shape``, ``qwen2.5-1.5b-shape``,
``llama-3.2-1b-shape``) that the project generates itself into the cache
(:func:`nemo_rl.utils.cache_paths.nemo_rl_cache_dir`) through
:func:`nemo_rl.utils.atomic_dir.materialize`; a hub id is accepted only if it is
already in the local Hugging Face cache.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

from nemo_rl.models.real_shape_models import REAL_SHAPES, create_real_shape_model
from nemo_rl.models.tiny_base_model import cache_name as base_cache_name
from nemo_rl.models.tiny_base_model import copy_base_model, create_base_init
from nemo_rl.models.tiny_model import create_tiny_20m_model, create_tiny_model, create_tiny_teacher
from nemo_rl.utils.atomic_dir import materialize
from nemo_rl.utils.cache_paths import nemo_rl_cache_dir

BUILTIN_MODELS: dict[str, Callable[[Path], object]] = {
    "tiny-qwen2": create_tiny_model,
    "tiny-qwen2-teacher": create_tiny_teacher,
    "tiny-qwen2-20m": create_tiny_20m_model,  # the tiny model's family and tokenizer, ~20M parameters (speed)
    "tiny-qwen2-base": copy_base_model,  # pre-trained at a 128-token window, committed (tools/build_base_model.py)
    "tiny-qwen2-base-init": create_base_init,  # its shape and tokenizer, random weights: where pre-training starts
}
# The real recipes' shapes with random weights (real_shape_models): 2.4 GB (Qwen3-0.6B) to 6.2 GB, built once.
BUILTIN_MODELS |= {name: partial(create_real_shape_model, name) for name in REAL_SHAPES}


def resolve_model_path(model_name: str) -> Path:
    """The local HF directory for ``model_name``.

    Built-in names win (so the result never depends on the working directory;
    write ``./tiny-qwen2`` to mean a local folder of that name), then existing
    local directories, then a hub id only if it is already in the local HF cache.
    """
    if model_name in BUILTIN_MODELS:
        return materialize(
            nemo_rl_cache_dir()
            / ("real_shape_models" if model_name in REAL_SHAPES else "tiny_models")
            / (base_cache_name() if model_name == "tiny-qwen2-base" else model_name),
            BUILTIN_MODELS[model_name],
        )
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
