"""uv run python tools/make_tiny_assets.py [--out-dir DIR] [--seed N]

Creates the built-in tiny Qwen2 model (``tiny-qwen2``) and chat dataset
(``tiny-chat``), and materialises the pre-trained base (``tiny-qwen2-base``,
committed; ``tools/build_base_model.py`` rebuilds it) and the long-document
corpus (``python-stdlib``) in the cache. Runs create them on first use anyway;
this script does it ahead of time (e.g. before launching many workers), or
writes the tiny model and chat data into ``--out-dir`` to inspect them or to
use them as explicit paths in a config.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from nemo_rl.data.builtin_datasets import resolve_dataset_paths
from nemo_rl.data.tiny_chat import write_tiny_chat
from nemo_rl.models.builtin_models import resolve_model_path
from nemo_rl.models.tiny_model import create_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out-dir", type=Path, help="write <out-dir>/tiny-qwen2 and <out-dir>/tiny-chat (default: the nemo_rl cache)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for weights and data; only with --out-dir (the cache holds seed 0)"
    )
    args = parser.parse_args()
    if args.seed != 0 and args.out_dir is None:
        parser.error("--seed needs --out-dir: the cached built-in assets are always made with seed 0")

    start = time.perf_counter()
    if args.out_dir is None:
        model = resolve_model_path("tiny-qwen2")
        train, val = resolve_dataset_paths("tiny-chat", None, None)
        print(f"base:       {resolve_model_path('tiny-qwen2-base')}")
        print(f"documents:  {resolve_dataset_paths('python-stdlib', None, None)[0].parent}")
    else:
        model = create_tiny_model(args.out_dir / "tiny-qwen2", seed=args.seed)
        data = write_tiny_chat(args.out_dir / "tiny-chat", seed=args.seed)
        train, val = data["train"], data["validation"]
    print(f"model:      {model}")
    print(f"train:      {train}")
    print(f"validation: {val}")
    print(f"took {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
