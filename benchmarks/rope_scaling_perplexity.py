"""Perplexity vs context length for no scaling, linear PI, NTK-aware and YaRN on one base model.

    uv run benchmarks/rope_scaling_perplexity.py [--window 64] [--factor 4] [--steps 300] [--out results/bench_rope]

The base is the project's tiny Qwen2, first pre-trained here for ``--steps``
steps on ``--window``-token windows of the tiny-chat data so that its window is
a real one (a short window keeps RoPE's slow dimensions unseen, as in a real
pretraining run); each method then extends it by ``--factor`` through
``nemo_rl.models.long_context.apply_rope_scaling`` with no further training
(the setting of the YaRN paper's first comparison). Prints a table and writes
``perplexity_vs_length.png`` and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from nemo_rl.data.builtin_assets import resolve_dataset_paths, resolve_model_path  # noqa: E402
from nemo_rl.evals.long_context import perplexity_by_length, read_documents  # noqa: E402
from nemo_rl.models.long_context import LongContextConfig, apply_rope_scaling  # noqa: E402


def pretrain_at_window(model, documents: list[list[int]], window: int, steps: int, seed: int = 0) -> list[float]:
    """Next-token training on random ``window``-token windows of the concatenated documents."""
    stream = torch.tensor([t for doc in documents for t in doc])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc=f"pre-training at {window} tokens"):
        starts = torch.randint(0, len(stream) - window - 1, (8,), generator=generator)
        batch = torch.stack([stream[s : s + window] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=64, help="pre-training (original) window in tokens")
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("results/bench_rope"))
    args = parser.parse_args()
    torch.manual_seed(0)

    model_dir = resolve_model_path("tiny-qwen2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_path, val_path = resolve_dataset_paths("tiny-chat", None, None)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    start = time.perf_counter()
    losses = pretrain_at_window(base, read_documents(train_path, tokenizer), args.window, args.steps)
    base.eval()
    print(
        f"pre-training: {args.steps} steps in {time.perf_counter() - start:.0f}s, loss {losses[0]:.2f} -> {losses[-1]:.2f}"
    )

    documents = read_documents(val_path, tokenizer)
    lengths = sorted({args.window // 2, args.window, *(int(args.window * f) for f in (1.5, 2, 3, args.factor))})
    methods = {"none": None, "linear": "linear", "ntk": "ntk", "yarn": "yarn"}
    results: dict[str, list[float]] = {}
    for name, method in methods.items():
        model = copy.deepcopy(base)
        if method:
            apply_rope_scaling(
                model,
                LongContextConfig(method=method, factor=args.factor, original_max_position_embeddings=args.window),
            )
        results[name] = [p.perplexity for p in perplexity_by_length(model, documents, lengths)]
    counts = [p.num_documents for p in perplexity_by_length(base, documents, lengths)]

    header = "length | docs | " + " | ".join(f"{m:>8}" for m in methods)
    print(header)
    print("-" * len(header))
    for i, length in enumerate(lengths):
        print(f"{length:6d} | {counts[i]:4d} | " + " | ".join(f"{results[m][i]:8.2f}" for m in methods))

    args.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in methods:
        ax.plot(lengths, results[name], marker="o", label=name)
    ax.axvline(args.window, color="grey", linestyle="--", linewidth=1, label="original window")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(f"tiny-qwen2, {args.factor:g}x RoPE extension, no fine-tuning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "perplexity_vs_length.png", dpi=120)
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "window": args.window,
                "factor": args.factor,
                "lengths": lengths,
                "documents": counts,
                "perplexity": results,
            },
            indent=2,
        )
    )
    print(f"plot: {args.out / 'perplexity_vs_length.png'}")


if __name__ == "__main__":
    main()
