"""Long-context evaluation: sliding-window perplexity by length, the passkey grid and RULER-style tasks.

Runs on any HF directory (a base model, an SFT export, a checkpoint exported to
HF) with the same ``hf_config_overrides`` the run trains with, applied through
``nemo_rl.rope`` so the evaluation sees the trainer's RoPE; the
retrieval tasks generate through transformers or through a vLLM engine built
with the same overrides (``long_context_eval.generation_backend``).

:func:`evaluate` works on an in-memory model and tokenizer (what a benchmark
holds), :func:`run_long_context_eval` loads a directory and writes the report
(``long_context_eval.json``, ``passkey_heatmap.png``, ``perplexity_vs_length.png``).
The pieces (``sliding_window_perplexity``, ``passkey_grid``, ``ruler_accuracy``,
the generators and the figures) live in their modules and can be called alone.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from nemo_rl.config.schema import LongContextEvalConfig
from nemo_rl.evals.generators import Generator, HFGenerator, VllmGenerator, open_generator
from nemo_rl.evals.perplexity import (
    PerplexityPoint,
    read_documents,
    select_documents,
    sliding_window_perplexity,
    warn_if_uninformative,
)
from nemo_rl.evals.plots import write_passkey_heatmap, write_perplexity_plot
from nemo_rl.evals.retrieval import PasskeyPoint, RulerPoint, passkey_grid, ruler_accuracy
from nemo_rl.rope.hf_config import apply_hf_config_overrides, hf_rope_parameters

# The evaluation's whole public API, importable from this one module (the pieces live in their own).
__all__ = [
    "Generator",
    "HFGenerator",
    "LongContextReport",
    "PasskeyPoint",
    "PerplexityPoint",
    "RulerPoint",
    "VllmGenerator",
    "compare_table",
    "evaluate",
    "format_table",
    "load_model",
    "open_generator",
    "original_window",
    "passkey_grid",
    "read_documents",
    "ruler_accuracy",
    "run_long_context_eval",
    "select_documents",
    "sliding_window_perplexity",
    "warn_if_uninformative",
    "write_passkey_heatmap",
    "write_perplexity_plot",
    "write_report",
]

logger = logging.getLogger(__name__)

REPORT_NAME = "long_context_eval.json"
HEATMAP_NAME = "passkey_heatmap.png"
PERPLEXITY_PLOT_NAME = "perplexity_vs_length.png"


@dataclass(frozen=True)
class LongContextReport:
    """Everything one evaluation measured, in one object: what a caller logs, prints, plots or compares."""

    perplexity: list[PerplexityPoint]
    passkey: list[PasskeyPoint]
    ruler: dict[str, list[RulerPoint]]  # task name -> one point per length
    info: dict[str, Any] = field(default_factory=dict)  # model, data, RoPE and settings of the evaluation
    report_path: Path | None = None  # set by write_report
    passkey_heatmap: Path | None = None
    perplexity_plot: Path | None = None

    def metrics(self) -> dict[str, float]:
        """Flat scalars for a metrics logger: ``perplexity@L``, ``passkey@L/depthD``, ``passkey@L`` (mean over
        depths) and ``ruler/{task}@L``."""
        metrics = {f"perplexity@{p.length}": p.perplexity for p in self.perplexity}
        metrics |= {f"passkey@{p.length}/depth{p.depth:g}": p.accuracy for p in self.passkey}
        for length in dict.fromkeys(p.length for p in self.passkey):
            cell = [p.accuracy for p in self.passkey if p.length == length]
            metrics[f"passkey@{length}"] = sum(cell) / len(cell)
        metrics |= {f"ruler/{task}@{p.length}": p.accuracy for task, points in self.ruler.items() for p in points}
        return metrics


def load_model(
    model_dir: Path, overrides: Mapping[str, Any] | None, max_length: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The HF model with the run's overrides; ``sdpa`` keeps memory linear in length where it can."""
    config = apply_hf_config_overrides(AutoConfig.from_pretrained(model_dir), overrides, max_length)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, config=config, dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def original_window(config) -> int:
    """The pretraining window: the YaRN block's original length, else max_position_embeddings."""
    params = hf_rope_parameters(config)
    return int(params.get("original_max_position_embeddings") or config.max_position_embeddings)


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[Sequence[int]],
    eval_cfg: LongContextEvalConfig,
    generator: Generator | None = None,
) -> LongContextReport:
    """Every measurement ``eval_cfg`` asks for, on token-id ``documents`` (all of them, long or not: the
    perplexity documents are chosen from them); nothing is written. ``generator`` None: greedy HF generation on
    ``model``."""
    generator = generator or HFGenerator(model, tokenizer, eval_cfg.batch_size)
    cfg, seconds = eval_cfg, {}
    window = original_window(model.config)
    uninformative = warn_if_uninformative(documents, window)  # said before the minutes of work, not after
    with _timed(seconds, "perplexity"):
        perplexity = sliding_window_perplexity(
            model, documents, cfg.lengths, cfg.stride, cfg.max_documents, cfg.document_tokens, cfg.seed, cfg.batch_size
        )
    with _timed(seconds, "passkey"):
        passkey = passkey_grid(
            generator, tokenizer, cfg.passkey_lengths, cfg.passkey_depths, cfg.passkey_trials, cfg.seed
        )
    with _timed(seconds, "ruler"):
        ruler = {
            task: ruler_accuracy(generator, tokenizer, task, cfg.ruler_lengths, cfg.ruler_trials, cfg.seed)
            for task in (cfg.ruler_tasks if cfg.ruler_lengths else [])
        }
    info = {
        "original_window": window,
        "max_position_embeddings": model.config.max_position_embeddings,
        "rope_parameters": hf_rope_parameters(model.config),
        "no_document_beyond_original_window": uninformative,
        "settings": cfg.model_dump(),
        "seconds": seconds,
    }
    return LongContextReport(perplexity, passkey, ruler, info)


@contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Wall time of one phase into ``seconds`` (a benchmark running many evaluations reads where the time goes)."""
    start = time.perf_counter()
    yield
    seconds[phase] = round(time.perf_counter() - start, 3)


def run_long_context_eval(
    model_dir: Path,
    overrides: Mapping[str, Any] | None,
    max_total_sequence_length: int,
    eval_cfg: LongContextEvalConfig,
    out_dir: Path,
    default_data: Path | None = None,
) -> LongContextReport:
    """Evaluate ``model_dir`` with the run's RoPE ``overrides`` and write the report files into ``out_dir``."""
    model, tokenizer = load_model(Path(model_dir), overrides, max_total_sequence_length)
    data_path = Path(eval_cfg.data_path) if eval_cfg.data_path else default_data
    if data_path is None:
        raise ValueError("long_context_eval.data_path is required when no default evaluation data exists")
    documents = read_documents(data_path, tokenizer)
    with open_generator(
        eval_cfg.generation_backend,
        model,
        tokenizer,
        Path(model_dir),
        overrides,
        max_total_sequence_length,
        eval_cfg.batch_size,
    ) as generator:
        report = evaluate(model, tokenizer, documents, eval_cfg, generator)
    report = replace(report, info={"model_dir": str(model_dir), "data_path": str(data_path), **report.info})
    return write_report(report, Path(out_dir))


def write_report(report: LongContextReport, out_dir: Path) -> LongContextReport:
    """``long_context_eval.json`` (all points and the info block) and the figures; the report with their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    heatmap = write_passkey_heatmap(report.passkey, out_dir / HEATMAP_NAME) if report.passkey else None
    plot = (
        write_perplexity_plot(report.perplexity, out_dir / PERPLEXITY_PLOT_NAME, report.info.get("original_window"))
        if report.perplexity
        else None
    )
    path = out_dir / REPORT_NAME
    report = replace(report, report_path=path, passkey_heatmap=heatmap, perplexity_plot=plot)
    body = {
        **report.info,
        "perplexity": [asdict(p) for p in report.perplexity],
        "passkey": [asdict(p) for p in report.passkey],
        "ruler": {task: [asdict(p) for p in points] for task, points in report.ruler.items()},
        "metrics": report.metrics(),
        "files": {"passkey_heatmap": _name(heatmap), "perplexity_plot": _name(plot)},
    }
    path.write_text(json.dumps(body, indent=2))
    return report


def _name(path: Path | None) -> str | None:
    return path.name if path is not None else None


def format_table(report: LongContextReport) -> str:
    """The report as plain-text tables: perplexity by length, passkey by length x depth, RULER by length x task."""
    lines = ["length | stride | perplexity | documents", "------ | ------ | ---------- | ---------"]
    lines += [f"{p.length:6d} | {p.stride:6d} | {p.perplexity:10.3f} | {p.num_documents:9d}" for p in report.perplexity]
    if report.passkey:
        depths = list(dict.fromkeys(p.depth for p in report.passkey))
        accuracy = {(p.length, p.depth): p.accuracy for p in report.passkey}
        lines += ["", "passkey accuracy (rows: length, columns: depth)", _row(["length", *depths, "mean"])]
        for length in dict.fromkeys(p.length for p in report.passkey):
            cells = [accuracy[length, depth] for depth in depths]
            lines.append(_row([length, *cells, sum(cells) / len(cells)]))
    if report.ruler:
        tasks = list(report.ruler)
        accuracy = {(task, p.length): p.accuracy for task, points in report.ruler.items() for p in points}
        lines += ["", "RULER accuracy (rows: length, columns: task)", _row(["length", *tasks])]
        for length in dict.fromkeys(p.length for points in report.ruler.values() for p in points):
            lines.append(_row([length, *(accuracy[task, length] for task in tasks)]))
    return "\n".join(lines)


COMPARED_STAGES = {
    "base": "base (as it ships)",
    "base_extended": "base + run's RoPE, not trained",
    "fine_tuned": "fine-tuned",
}


def compare_table(reports: Mapping[str, LongContextReport]) -> str:
    """Side by side, one column per report: passkey accuracy (mean over depths) and perplexity by length.

    Columns are the ``reports`` in order, headed by ``COMPARED_STAGES`` where
    the name is one of its keys; rows are every ``passkey@L``, ``ruler/...`` and
    ``perplexity@L`` metric of the first report.
    """
    metrics = {name: report.metrics() for name, report in reports.items()}
    first = next(iter(metrics.values()))
    rows = [k for k in first if k.startswith("passkey@") and "/depth" not in k]
    rows += [k for k in first if k.startswith("ruler/")] + [k for k in first if k.startswith("perplexity@")]
    header = ["metric", *(COMPARED_STAGES.get(name, name) for name in reports)]
    body = [[key, *(f"{m.get(key, float('nan')):.3f}" for m in metrics.values())] for key in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *body]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _row(cells: Sequence[Any]) -> str:
    return " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells)
