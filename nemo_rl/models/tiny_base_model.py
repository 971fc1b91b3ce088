"""The built-in ``tiny-qwen2-base``: a base model this project pre-trains itself, with a real 128-token window.

Showing that a context extension *works* needs a model that works inside its
window (retrieves a passkey) and fails outside it, as real base models do; a
randomly initialised model does neither. This module defines that model's
shape and tokenizer and the randomly initialised starting point
(``tiny-qwen2-base-init``); ``tools/build_base_model.py`` pre-trains it through
the project's own offline loop (``examples/run_sft.py`` in document mode, plain
RoPE at the window) and writes the result to ``assets/tiny-qwen2-base``, which
is committed: :func:`copy_base_model` is how the built-in name is materialised.

Why these numbers:
- window 128 and head dim 64 (vLLM's CPU attention supports no smaller head);
- ``rope_theta`` 500: the slowest RoPE pair has a wavelength of about 20
  windows, close to Llama-2's 13 (theta 1e4, head dim 128, window 4096).
  With the usual 1e4 a 128-token window leaves half the pairs rotating so
  slowly that they never leave the trained range even at 8x, and plain RoPE
  then does not fail beyond the window at all (the probe in the notes: 29 %
  passkey at 1x and at 4x). With 500 it fails, as real models do;
- four layers (retrieval is an induction-style copy that needs at least two),
  hidden 128, vocabulary 2,048 trained on the same corpus: about 1.05M
  parameters, 4.2 MB in float32, cheap enough to commit and to fine-tune four
  ways in one benchmark on two CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from transformers import PreTrainedTokenizerFast, Qwen2Config

from nemo_rl.data.python_stdlib import split_of, stdlib_documents
from nemo_rl.data.retrieval_documents import key_value_text, passkey_text
from nemo_rl.models.tiny_model import save_initialized, tiny_qwen2_config, train_tokenizer

BASE_NAME = "tiny-qwen2-base"
BASE_WINDOW = 128
BASE_ROPE_THETA = 500.0
BASE_VOCAB_SIZE = 2048
ASSET_DIR = Path(__file__).parent / "assets" / BASE_NAME
BUILD_COMMAND = "uv run tools/build_base_model.py"
BUILD_REPORT = "build_report.json"
_TOKENIZER_SYNTHETIC_DOCS = 4000  # retrieval texts in the tokenizer's corpus: their words become single tokens


def tokenizer_corpus() -> list[str]:
    """The base's tokenizer corpus: the stdlib train split plus retrieval texts, as the model will see them."""
    import random

    rng = random.Random("tiny-qwen2-base/tokenizer")
    code = [row["text"] for row in stdlib_documents() if split_of(row["path"]) == "train"]
    synthetic = [
        passkey_text(rng, rng.randint(20, 600)) if i % 3 else key_value_text(rng, rng.randint(2, 12))
        for i in range(_TOKENIZER_SYNTHETIC_DOCS)
    ]
    return code + synthetic


def base_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    return tiny_qwen2_config(tokenizer, num_hidden_layers=4, window=BASE_WINDOW, rope_theta=BASE_ROPE_THETA)


def create_base_init(out_dir: Path, seed: int = 0) -> Path:
    """``tiny-qwen2-base-init``: the base's shape and tokenizer with random weights (what pre-training starts from)."""
    tokenizer = train_tokenizer(tokenizer_corpus(), BASE_VOCAB_SIZE)
    return save_initialized(base_config(tokenizer), tokenizer, Path(out_dir), seed)


def copy_base_model(out_dir: Path) -> Path:
    """Materialise the committed pre-trained base (``assets/tiny-qwen2-base``) into ``out_dir``."""
    if not (ASSET_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the pre-trained {BASE_NAME} is missing from {ASSET_DIR}; rebuild it with `{BUILD_COMMAND}` "
            "(about an hour on 2 CPU cores)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in ASSET_DIR.iterdir():
        if path.is_file():
            shutil.copy2(path, out_dir / path.name)
    return out_dir


def cache_name() -> str:
    """The cache directory of the materialised base: named by the committed weights' digest, so a rebuilt
    asset is copied again instead of an old copy (and its Megatron conversion) being reused."""
    weights = ASSET_DIR / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12] if weights.is_file() else "missing"
    return f"{BASE_NAME}-{digest}"


def build_report() -> dict:
    """How the committed base was made and what it measured (written by the build tool)."""
    return json.loads((ASSET_DIR / BUILD_REPORT).read_text())
