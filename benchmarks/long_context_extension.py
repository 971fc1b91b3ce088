"""The YaRN paper's comparison in miniature, through this framework: none / PI / NTK-aware / YaRN, fine-tuned alike.

    uv run benchmarks/long_context_extension.py [--out results/bench_long_context] [--factor 4] [--quick]

The base is the built-in ``tiny-qwen2-base``: pre-trained by this project at a
128-token window with plain RoPE (``tools/build_base_model.py``), it retrieves
a passkey inside its window and fails beyond it. Each method extends it by
``--factor`` and is evaluated before fine-tuning, then fine-tuned through
``examples/run_sft.py`` (Megatron worker, Ray; the main job's recipe
``examples/configs/sft_long_context.yaml``) in document mode on the same data,
steps and schedule, with checkpoints at each fine-tuning budget (a share of
the base's pre-training tokens). The schedule is the recipe's (warm-up, then
cosine decay over the largest budget), so the largest budget is exactly that
recipe run to it, and a smaller budget is the same run's checkpoint at that
point (its learning rate not yet decayed: the same handicap for every method).
Every checkpoint is exported to HF and evaluated as the paper reports:
sliding-window perplexity from 1x to twice the fine-tuning length (where
each method breaks), passkey retrieval on a length x depth grid, and
short-context perplexity (inside the window) against the base.

Writes ``results.json``, ``perplexity_vs_length.png`` (every method before and
after fine-tuning), ``passkey_heatmaps.png`` (one length x depth heatmap per
method), ``budget_curve.png`` (quality vs fine-tuning tokens) under ``--out``
and prints the table and the study's goals, each with what was measured
(also in ``results.json``: a goal missed is a finding, not an error). ``--quick`` (a slow test) runs one small budget and a
smaller evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: examples/ is not a package

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

METHODS = ("none", "linear", "ntk", "yarn")
LABELS = {"none": "none (plain RoPE)", "linear": "linear (PI)", "ntk": "NTK-aware", "yarn": "YaRN"}
RECIPE = ROOT / "examples" / "configs" / "sft_long_context.yaml"


@dataclass(frozen=True)
class Settings:
    factor: float
    budgets: tuple[float, ...]  # % of the base's pre-training tokens
    methods: tuple[str, ...]
    beta_fast: float
    beta_slow: float
    perplexity_documents: int
    passkey_depths: tuple[float, ...]
    passkey_trials: int
    seed: int = 0


@dataclass
class Evaluation:
    """One model's scores: perplexity per length, passkey accuracy per (length, depth)."""

    perplexity: dict[int, float]
    passkey: dict[int, dict[float, float]]

    def passkey_at(self, length: int) -> float:
        return _mean(self.passkey.get(length, {}).values())


@dataclass
class MethodResult:
    method: str
    overrides: dict | None
    before: Evaluation | None = None
    after: dict[float, Evaluation] = field(default_factory=dict)  # budget % -> evaluation
    budget_tokens: dict[float, int] = field(default_factory=dict)
    budget_steps: dict[float, int] = field(default_factory=dict)
    fine_tune_seconds: float = 0.0


def parse_args(argv=None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/bench_long_context"))
    parser.add_argument("--factor", type=float, default=4.0, help="extension factor (8 to extend to 8x)")
    parser.add_argument("--budgets", default="0.5,1,2,5", help="fine-tuning budgets, %% of pre-training tokens")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--betas",
        choices=("paper", "scaled"),
        default="paper",
        help="YaRN's beta_fast/beta_slow: the paper's 32/1, or scaled by window/4096 (1 and 1/32)",
    )
    parser.add_argument(
        "--passkey-trials",
        type=int,
        default=None,
        help="random keys per (length, depth) cell (default 20: a depth's accuracy to 5 %%; 4 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="one budget (1 %%), a smaller evaluation")
    args = parser.parse_args(argv)
    betas = (32.0, 1.0) if args.betas == "paper" else (1.0, 1.0 / 32)
    budgets = (1.0,) if args.quick else tuple(float(b) for b in args.budgets.split(","))
    settings = Settings(
        factor=args.factor,
        budgets=tuple(sorted(budgets)),
        methods=tuple(args.methods.split(",")),
        beta_fast=betas[0],
        beta_slow=betas[1],
        perplexity_documents=4 if args.quick else 10,
        passkey_depths=(0.1, 0.5, 0.9) if args.quick else (0.05, 0.25, 0.5, 0.75, 0.95),
        passkey_trials=args.passkey_trials or (4 if args.quick else 20),
    )
    return args, settings


def main(argv=None) -> dict:
    args, settings = parse_args(argv)
    study = Study(settings, args.out)
    results = study.run()
    summary = study.write(results)
    print(format_table(summary))
    print(format_goals(summary["goals"]))
    print(f"results: {args.out / 'results.json'}")
    return summary


class Study:
    """One base, every method: evaluate, fine-tune with checkpoints at the budgets, evaluate each checkpoint."""

    def __init__(self, settings: Settings, out: Path):
        from transformers import AutoConfig, AutoTokenizer

        from nemo_rl.data.builtin_datasets import resolve_dataset_paths
        from nemo_rl.evals.long_context import read_documents
        from nemo_rl.models.builtin_models import resolve_model_path
        from nemo_rl.models.tiny_base_model import BASE_NAME, build_report

        self.settings, self.out = settings, out
        self.base_dir = resolve_model_path(BASE_NAME)
        self.base_config = AutoConfig.from_pretrained(self.base_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        self.window = self.base_config.max_position_embeddings
        self.length = int(self.window * settings.factor)  # the fine-tuning length
        self.pretraining_tokens = int(build_report()["pretraining_tokens"])
        _, val = resolve_dataset_paths("python-stdlib", None, None)
        self.documents = read_documents(val, self.tokenizer)
        # The recipe at this study's length (its YaRN factor is replaced per method, see ``fine_tune``).
        self.recipe_overrides = [f"policy.max_total_sequence_length={self.length}"]
        # From the window to twice the fine-tuning length (where each method breaks), as the paper does.
        self.eval_lengths = [self.window, 2 * self.window, self.length, 2 * self.length]
        self.passkey_lengths = [self.window, 2 * self.window, self.length, 2 * self.length]

    # ------------------------------------------------------------------ steps
    def overrides(self, method: str) -> dict | None:
        from nemo_rl.models.long_context import LongContextConfig, run_overrides

        if method == "none":
            return None
        yarn_knobs = {"beta_fast": self.settings.beta_fast, "beta_slow": self.settings.beta_slow}
        cfg = LongContextConfig(method, self.settings.factor, self.window, **(yarn_knobs if method == "yarn" else {}))
        return run_overrides(cfg, self.base_config)

    def evaluate(self, model_dir: Path, overrides: dict | None, desc: str) -> Evaluation:
        from nemo_rl.evals.long_context import HFGenerator, load_model, passkey_grid, sliding_window_perplexity

        s = self.settings
        model, tokenizer = load_model(model_dir, overrides, max(self.eval_lengths))
        perplexity = sliding_window_perplexity(
            model,
            self.documents,
            self.eval_lengths,
            stride=self.window,
            max_documents=s.perplexity_documents,
            document_tokens=2 * max(self.eval_lengths),
        )
        passkey = passkey_grid(
            HFGenerator(model, tokenizer), tokenizer, self.passkey_lengths, s.passkey_depths, s.passkey_trials, s.seed
        )
        grid: dict[int, dict[float, float]] = {}
        for point in passkey:
            grid.setdefault(point.length, {})[point.depth] = point.accuracy
        tqdm.write(f"{desc}: " + ", ".join(f"passkey@{n} {sum(c.values()) / len(c):.2f}" for n, c in grid.items()))
        return Evaluation({p.length: p.perplexity for p in perplexity}, grid)

    def budget_steps(self, tokens_per_step: float) -> dict[float, int]:
        return {b: max(round(b / 100 * self.pretraining_tokens / tokens_per_step), 1) for b in self.settings.budgets}

    def fine_tune(self, method: str, overrides: dict | None, steps: list[int]) -> Path:
        """``examples/run_sft.py`` with this method's RoPE, checkpoints at ``steps``; returns the run directory."""
        from examples.run_sft import main as run_sft
        from nemo_rl.config.loader import override_value

        run_dir = self.out / method
        save_period = math.gcd(*steps)
        argv = [
            "--config",
            str(RECIPE),
            *self.recipe_overrides,
            "~policy.hf_config_overrides",
            *([f"++policy.hf_config_overrides={override_value(overrides)}"] if overrides else []),
            f"sft.max_num_steps={max(steps)}",
            "sft.val_period=0",
            "sft.export_hf_dir=null",
            f"checkpointing.checkpoint_dir={run_dir / 'checkpoints'}",
            f"checkpointing.save_period={save_period}",
            "checkpointing.keep_top_k=null",
            f"logger.log_dir={run_dir / 'logs'}",
            "logger.tensorboard_enabled=false",
            "long_context_eval.enabled=false",
        ]
        if run_sft(argv) != 0:
            raise RuntimeError(f"fine-tuning {method} failed: examples/run_sft.py {' '.join(argv)}")
        return run_dir

    def run(self) -> list[MethodResult]:
        from nemo_rl.models.megatron.hf_export import export_training_checkpoint
        from nemo_rl.utils.logger import read_metrics

        s = self.settings
        tokens_per_step = self.estimate_tokens_per_step()
        budget_steps = self.budget_steps(tokens_per_step)
        results = []
        for method in tqdm(s.methods, desc="methods"):
            overrides = self.overrides(method)
            result = MethodResult(method, overrides)
            result.before = self.evaluate(self.base_dir, overrides, f"{method}, before fine-tuning")
            start = time.perf_counter()
            run_dir = self.fine_tune(method, overrides, sorted(set(budget_steps.values())))
            result.fine_tune_seconds = time.perf_counter() - start
            tokens = _cumulative_tokens(read_metrics(run_dir / "logs", "train"))
            for budget, step in budget_steps.items():
                export = export_training_checkpoint(
                    run_dir / "checkpoints" / f"step_{step}", run_dir / f"hf_step_{step}"
                )
                result.after[budget] = self.evaluate(export, None, f"{method}, {budget:g} % budget")
                result.budget_steps[budget], result.budget_tokens[budget] = step, tokens[step]
            results.append(result)
        return results

    def estimate_tokens_per_step(self) -> float:
        """Real (unpadded) tokens in a step of the recipe's batch, from its training data: what budgets count."""
        from nemo_rl.algorithms.sft import document_dataset, document_loader
        from nemo_rl.config.loader import load_config, resolve_config
        from nemo_rl.config.schema import validate_sft_config
        from nemo_rl.data.builtin_datasets import resolve_dataset_paths

        cfg = validate_sft_config(resolve_config(load_config(RECIPE, self.recipe_overrides)))
        train, _ = resolve_dataset_paths(cfg.data.dataset_name, cfg.data.train_data_path, None)
        max_len = cfg.policy.max_total_sequence_length
        data = document_dataset(
            document_loader(cfg.data, self.tokenizer), cfg.data, train, "train", max_len, cfg.sft.seed
        )
        probe = range(0, len(data), max(len(data) // 4000, 1))
        return cfg.policy.train_global_batch_size * sum(len(data[i].input_ids) for i in probe) / len(probe)

    # ---------------------------------------------------------------- outputs
    def write(self, results: list[MethodResult]) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        summary = {
            "base": str(self.base_dir),
            "window": self.window,
            "factor": self.settings.factor,
            "fine_tuning_length": self.length,
            "pretraining_tokens": self.pretraining_tokens,
            "settings": asdict(self.settings),
            "eval_lengths": self.eval_lengths,
            "passkey_lengths": self.passkey_lengths,
            "base_short_context_perplexity": results[0].before.perplexity[self.window] if results else None,
            "methods": {r.method: _method_json(r) for r in results},
        }
        summary["goals"] = goals(summary)
        (self.out / "results.json").write_text(json.dumps(summary, indent=2, allow_nan=True))
        plot_perplexity(results, self.eval_lengths, self.window, self.length, self.out / "perplexity_vs_length.png")
        plot_heatmaps(results, self.out / "passkey_heatmaps.png")
        plot_budget_curve(results, self.length, self.out / "budget_curve.png")
        return summary


def _cumulative_tokens(rows: list[dict]) -> dict[int, int]:
    total, out = 0, {}
    for row in sorted(rows, key=lambda r: r["step"]):
        total += int(row["input_tokens"])
        out[int(row["step"])] = total
    return out


def _method_json(result: MethodResult) -> dict:
    def evaluation(e: Evaluation) -> dict:
        return {
            "perplexity": {str(k): v for k, v in e.perplexity.items()},
            "passkey": {str(n): {str(d): a for d, a in cells.items()} for n, cells in e.passkey.items()},
        }

    return {
        "overrides": result.overrides,
        "before": evaluation(result.before),
        "after": {str(b): evaluation(e) for b, e in result.after.items()},
        "budget_tokens": {str(b): t for b, t in result.budget_tokens.items()},
        "budget_steps": {str(b): s for b, s in result.budget_steps.items()},
        "fine_tune_seconds": result.fine_tune_seconds,
    }


def format_table(summary: dict) -> str:
    window, length = summary["window"], summary["fine_tuning_length"]
    lengths = summary["eval_lengths"]
    head = (
        ["method", "budget %", "tokens"]
        + [f"ppl@{n}" for n in lengths]
        + [f"key@{n}" for n in summary["passkey_lengths"]]
        + [f"worst depth@{length}", "short ppl vs base"]
    )
    base_short = summary["base_short_context_perplexity"]
    rows = []
    for method, r in summary["methods"].items():
        stages = [("0 (before)", 0, r["before"])] + [
            (budget, r["budget_tokens"][budget], e) for budget, e in r["after"].items()
        ]
        for budget, tokens, e in stages:
            ppl = [e["perplexity"][str(n)] for n in lengths]
            keys = [_mean(e["passkey"][str(n)].values()) for n in summary["passkey_lengths"]]
            short = e["perplexity"][str(window)] / base_short - 1
            worst = min(e["passkey"][str(length)].values())
            rows.append(
                [method, str(budget), str(tokens)]
                + [f"{p:.2f}" for p in ppl]
                + [f"{k:.2f}" for k in keys]
                + [f"{worst:.2f}", f"{short:+.1%}"]
            )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    title = f"window {window}, fine-tuned at {length} ({summary['factor']:g}x), base pre-trained on {summary['pretraining_tokens']:,} tokens"
    return title + "\n" + "\n".join(lines)


def goals(summary: dict) -> list[dict]:
    """The study's targets, each with what was measured: YaRN at the largest budget, plain RoPE before any training."""
    window, length, methods = summary["window"], summary["fine_tuning_length"], summary["methods"]
    out = []
    if "yarn" in methods and methods["yarn"]["after"]:
        budget = max(methods["yarn"]["after"], key=float)
        after = methods["yarn"]["after"][budget]
        ppl = after["perplexity"]
        short = ppl[str(window)] / summary["base_short_context_perplexity"] - 1
        out += [
            _goal(
                f"YaRN, {budget} %: passkey at {length} at every depth",
                min(after["passkey"][str(length)].values()),
                ">=",
                0.95,
            ),
            _goal(
                f"YaRN, {budget} %: perplexity at {length} / at {window}",
                ppl[str(length)] / ppl[str(window)],
                "<=",
                1.0,
            ),
            _goal(f"YaRN, {budget} %: short-context perplexity vs base", short, "<=", 0.02),
        ]
    if "none" in methods:
        before = methods["none"]["before"]["passkey"]
        out.append(
            _goal(f"plain RoPE, no fine-tuning: passkey at {length}", _mean(before[str(length)].values()), "<=", 0.1)
        )
    return out


def _goal(name: str, value: float, relation: str, target: float) -> dict:
    met = value >= target if relation == ">=" else value <= target
    return {"goal": name, "measured": value, "target": f"{relation} {target:g}", "met": met}


def format_goals(rows: list[dict]) -> str:
    return "goals:\n" + "\n".join(
        f"  [{'met' if g['met'] else 'MISSED'}] {g['goal']}: {g['measured']:.3f} (target {g['target']})" for g in rows
    )


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def plot_perplexity(results: list[MethodResult], lengths: list[int], window: int, length: int, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(results):
        color = f"C{i}"
        ax.plot(
            lengths,
            [r.before.perplexity[n] for n in lengths],
            ls=":",
            marker="o",
            color=color,
            label=f"{LABELS[r.method]}, no fine-tuning",
        )
        if r.after:
            best = max(r.after)
            ax.plot(
                lengths,
                [r.after[best].perplexity[n] for n in lengths],
                ls="-",
                marker="o",
                color=color,
                label=f"{LABELS[r.method]}, fine-tuned ({best:g} %)",
            )
    ax.axvline(window, color="grey", ls="--", lw=1)
    ax.axvline(length, color="black", ls="--", lw=1)
    ax.text(window, ax.get_ylim()[1], " window", va="top", fontsize=8)
    ax.text(length, ax.get_ylim()[1], " fine-tuning length", va="top", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("sliding-window perplexity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_heatmaps(results: list[MethodResult], path: Path) -> None:
    fig, axes = plt.subplots(2, len(results), figsize=(3.2 * len(results), 5.6), squeeze=False)
    for col, r in enumerate(results):
        best = max(r.after) if r.after else None
        for row, (stage, e) in enumerate(
            (("before fine-tuning", r.before), (f"fine-tuned, {best:g} %", r.after.get(best)))
        ):
            ax = axes[row][col]
            if e is None:
                ax.axis("off")
                continue
            lengths = sorted(e.passkey)
            depths = sorted(next(iter(e.passkey.values())))
            grid = [[e.passkey[n][d] for d in depths] for n in lengths]
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
            for y, row_values in enumerate(grid):
                for x, value in enumerate(row_values):
                    ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_title(f"{LABELS[r.method]}\n{stage}", fontsize=8)
            if col == 0:
                ax.set_ylabel("prompt length (tokens)")
            if row == 1:
                ax.set_xlabel("needle depth")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_budget_curve(results: list[MethodResult], length: int, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    for i, r in enumerate(results):
        budgets = [0.0, *sorted(r.after)]
        evals = [r.before, *(r.after[b] for b in budgets[1:])]
        left.plot(budgets, [e.passkey_at(length) for e in evals], marker="o", color=f"C{i}", label=LABELS[r.method])
        right.plot(budgets, [e.perplexity[length] for e in evals], marker="o", color=f"C{i}", label=LABELS[r.method])
    left.set_ylabel(f"passkey accuracy at {length} tokens")
    right.set_ylabel(f"perplexity at {length} tokens")
    right.set_yscale("log")
    for ax in (left, right):
        ax.set_xlabel("fine-tuning tokens, % of pre-training")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
