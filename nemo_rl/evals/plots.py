"""The long-context report's figures: the passkey heatmap (length x depth) and perplexity against length.

Figures are drawn on matplotlib's Agg canvas directly (``Figure`` without
``pyplot``), so writing them needs no display and never changes the global
backend of a process that also plots interactively.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from nemo_rl.evals.perplexity import PerplexityPoint
from nemo_rl.evals.retrieval import PasskeyPoint


def write_passkey_heatmap(points: Sequence[PasskeyPoint], path: Path) -> Path:
    """A PNG grid: x = needle depth, y = prompt length, colour and text = accuracy."""
    depths = sorted({p.depth for p in points})
    lengths = sorted({p.length for p in points})
    accuracy = {(p.length, p.depth): p.accuracy for p in points}
    grid = [[accuracy.get((length, depth), float("nan")) for depth in depths] for length in lengths]
    figure = Figure(figsize=(1.0 + 0.8 * len(depths), 1.0 + 0.5 * len(lengths)), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, origin="lower", aspect="auto")
    for row, cells in enumerate(grid):
        for col, value in enumerate(cells):
            axes.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
    axes.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    axes.set_yticks(range(len(lengths)), [str(length) for length in lengths])
    axes.set_xlabel("needle depth")
    axes.set_ylabel("prompt length (tokens)")
    axes.set_title("passkey accuracy")
    figure.colorbar(image, ax=axes)
    return _save(figure, path)


def write_perplexity_plot(points: Sequence[PerplexityPoint], path: Path, original_window: int | None = None) -> Path:
    """A PNG line: sliding-window perplexity against context length, the original window marked."""
    figure = Figure(figsize=(5, 3.5), layout="constrained")
    axes = figure.add_subplot()
    axes.plot([p.length for p in points], [p.perplexity for p in points], marker="o")
    if original_window is not None:
        axes.axvline(original_window, color="grey", linestyle="--", label=f"original window ({original_window})")
        axes.legend()
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("perplexity")
    axes.set_title("sliding-window perplexity")
    return _save(figure, path)


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
