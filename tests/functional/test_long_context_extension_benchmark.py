"""benchmarks/long_context_extension.py --quick: the orderings of the YaRN paper that hold robustly in miniature."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.helpers import local_ray

pytestmark = [pytest.mark.functional, pytest.mark.slow]

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "long_context_extension.py"


def test_quick_comparison_orders_the_methods_as_the_paper_does(tmp_path):
    spec = importlib.util.spec_from_file_location("long_context_extension", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through the module
    spec.loader.exec_module(module)
    out = tmp_path / "bench"
    with local_ray(2, tmp_path / "mcore"):
        module.main(["--quick", "--out", str(out)])

    results = json.loads((out / "results.json").read_text())
    assert {p.name for p in out.glob("*.png")} == {
        "perplexity_vs_length.png",
        "passkey_heatmaps.png",
        "budget_curve.png",
    }
    window, length = results["window"], results["fine_tuning_length"]
    methods = results["methods"]
    assert set(methods) == {"none", "linear", "ntk", "yarn"}

    def ppl(method: str, stage: str, n: int) -> float:
        evaluation = methods[method]["before"] if stage == "before" else methods[method]["after"]["1.0"]
        return evaluation["perplexity"][str(n)]

    def passkey(method: str, stage: str, n: int) -> float:
        evaluation = methods[method]["before"] if stage == "before" else methods[method]["after"]["1.0"]
        cells = evaluation["passkey"][str(n)].values()
        return sum(cells) / len(cells)

    # The base works inside its window and plain RoPE breaks beyond it.
    assert passkey("none", "before", window) >= 0.9 and passkey("none", "before", length) <= 0.1
    assert ppl("none", "before", length) > 2 * ppl("none", "before", window)
    # Without fine-tuning YaRN holds perplexity at the new length best (the paper's first table).
    assert ppl("yarn", "before", length) < min(ppl(m, "before", length) for m in ("none", "linear", "ntk"))
    # After the same small budget YaRN beats plain RoPE and PI at the new length, in perplexity and retrieval.
    assert ppl("yarn", "after", length) < min(ppl("none", "after", length), ppl("linear", "after", length))
    assert passkey("yarn", "after", length) > passkey("none", "after", length)
    # Every goal of the study is reported with its measurement, met or not.
    assert [g["target"] for g in results["goals"]] == [">= 0.95", "<= 1", "<= 0.02", "<= 0.1"]
    assert all(isinstance(g["met"], bool) and g["measured"] == g["measured"] for g in results["goals"])
    # The budget is what it says: 1 % of the base's pre-training tokens.
    tokens = methods["yarn"]["budget_tokens"]["1.0"]
    assert tokens == pytest.approx(0.01 * results["pretraining_tokens"], rel=0.2)
