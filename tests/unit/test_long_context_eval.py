"""Long-context evaluation: passkey prompts and grid, sliding-window perplexity against a direct computation,
batched generation, the report and its files, the configuration, the command."""

from __future__ import annotations

import json
import logging
import math
import random
import re

import pytest
import torch
from transformers import AutoTokenizer

from nemo_rl.config.loader import load_config, resolve_config
from nemo_rl.config.schema import LongContextEvalConfig, validate_long_context_eval_config
from nemo_rl.data.builtin_datasets import resolve_dataset_paths
from nemo_rl.data.passkey import FILLER, NEEDLE, QUESTION, make_passkey_prompt, passkey_correct
from nemo_rl.data.ruler import RULER_TASKS
from nemo_rl.evals.generators import HFGenerator, completion_text, stop_token_ids
from nemo_rl.evals.long_context import evaluate, format_table, load_model, write_report
from nemo_rl.evals.perplexity import (
    read_documents,
    select_documents,
    sliding_window_perplexity,
    warn_if_uninformative,
    window_starts,
)
from nemo_rl.evals.retrieval import PASSKEY_NEW_TOKENS, passkey_grid, prompt_ids
from nemo_rl.models.builtin_models import resolve_model_path
from nemo_rl.utils.errors import ConfigError, DataError, MissingDataFile
from tests.helpers import sft_config, yarn_block

EVAL_YAML = "examples/configs/long_context_eval.yaml"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("tiny-qwen2"))


@pytest.fixture(scope="module")
def yarn_model():
    model, _ = load_model(resolve_model_path("tiny-qwen2"), {"rope_scaling": yarn_block()}, 1024)
    assert model.config.rope_parameters["rope_type"] == "yarn"
    return model


def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """Scale the query/key projections so attention is sharp and greedy output depends on the prompt (the random
    tiny model otherwise answers ' is is is' to everything, and any batching bug would go unseen)."""
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                weight.mul_(12.0)
    return model


# ----------------------------------------------------------------------------
# Passkey prompts and the grid
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("length", [300, 512, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_fits_its_budget_and_hides_the_key_at_depth(tokenizer, length, depth):
    prompt = make_passkey_prompt(tokenizer, length, depth, random.Random(0))
    n_tokens = len(tokenizer(prompt.text, add_special_tokens=False)["input_ids"])
    one_filler = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    assert length - one_filler < n_tokens <= length
    assert prompt.text.count(str(prompt.key)) == 2 and prompt.text.endswith("The pass key is")
    needle_at = prompt.text.index(f"The pass key is {prompt.key}")
    repeats = (len(prompt.text) - len(NEEDLE.format(key=prompt.key)) - len(QUESTION)) // len(FILLER)
    assert needle_at % len(FILLER) == 0, "the needle sits between filler sentences"
    # depth is met to the nearest whole filler block
    assert abs(needle_at // len(FILLER) - depth * repeats) <= 0.5


def test_passkey_scoring_uses_the_first_integer():
    assert passkey_correct(" 12345. Remember", 12345)
    assert not passkey_correct(" 1234 5", 12345)
    assert not passkey_correct(" no digits", 12345)


class KeyReader:
    """A generator that reads the pass key out of each prompt (``answer`` True) or says a wrong number."""

    def __init__(self, tokenizer, answer: bool = True):
        self.tokenizer, self.answer, self.calls = tokenizer, answer, []

    def generate(self, prompt_token_ids, max_new_tokens):
        self.calls.append(([len(p) for p in prompt_token_ids], max_new_tokens))
        keys = [re.search(r"pass key is (\d+)", self.tokenizer.decode(p)) for p in prompt_token_ids]
        return [f" {key.group(1)}." if key and self.answer else " 1." for key in keys]


def test_passkey_grid_scores_each_cell_and_keeps_prompts_and_answers_within_the_length(tokenizer):
    reader = KeyReader(tokenizer)
    points = passkey_grid(reader, tokenizer, [300, 600], [0.05, 0.95], trials=3, seed=0)
    assert [(p.length, p.depth, p.accuracy, p.trials) for p in points] == [
        (300, 0.05, 1.0, 3),
        (300, 0.95, 1.0, 3),
        (600, 0.05, 1.0, 3),
        (600, 0.95, 1.0, 3),
    ]
    (short, new_300), (long, new_600) = reader.calls
    assert new_300 == new_600 == PASSKEY_NEW_TOKENS
    assert len(short) == 6 and max(short) + PASSKEY_NEW_TOKENS <= 300 and max(long) + PASSKEY_NEW_TOKENS <= 600
    wrong = passkey_grid(KeyReader(tokenizer, answer=False), tokenizer, [300], [0.5], trials=4)
    assert [p.accuracy for p in wrong] == [0.0]


def test_passkey_cells_do_not_depend_on_the_rest_of_the_grid(tokenizer):
    small, large = KeyReader(tokenizer), KeyReader(tokenizer)
    passkey_grid(small, tokenizer, [300], [0.5], trials=2, seed=4)
    passkey_grid(large, tokenizer, [300], [0.1, 0.5, 0.9], trials=2, seed=4)
    assert small.calls[0][0] == large.calls[0][0][2:4], "the depth-0.5 cell got the same prompts"


# ----------------------------------------------------------------------------
# Sliding-window perplexity
# ----------------------------------------------------------------------------
def direct_nll(model, document: list[int], length: int, stride: int) -> tuple[float, int]:
    """The definition, one window at a time: slide by ``stride`` (the last window ending at the document's end),
    score each token once, in the first window that reaches it."""
    nll, tokens, scored_until, start = 0.0, 0, 1, 0
    while True:
        start = min(start, len(document) - length)
        window = torch.tensor([document[start : start + length]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(window).logits[0].double(), -1)
        for position in range(max(scored_until, start + 1), start + length):
            nll -= logprobs[position - start - 1, document[position]].item()
            tokens += 1
        scored_until = start + length
        if scored_until == len(document):
            return nll, tokens
        start += stride


def test_window_starts_cover_the_document_with_full_windows():
    assert window_starts(1024, 256, 128) == [0, 128, 256, 384, 512, 640, 768]
    assert window_starts(1000, 256, 128) == [0, 128, 256, 384, 512, 640, 744]
    assert window_starts(300, 300, 150) == [0]
    with pytest.raises(ValueError, match="stride"):
        window_starts(300, 100, 101)


@pytest.mark.parametrize("stride", [None, 40])
def test_sliding_window_perplexity_matches_a_direct_unbatched_computation(yarn_model, stride):
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 550, (n,), generator=generator).tolist() for n in (330, 301)]
    lengths = [64, 150, 300]
    points = sliding_window_perplexity(yarn_model, docs, lengths, stride=stride, document_tokens=400, batch_size=3)
    assert [(p.length, p.num_documents, p.num_tokens) for p in points] == [(n, 2, 329 + 300) for n in lengths]
    for point in points:
        step = stride or point.length // 2
        assert point.stride == step
        direct = [direct_nll(yarn_model, doc, point.length, step) for doc in docs]
        assert sum(t for _, t in direct) == point.num_tokens
        assert point.perplexity == pytest.approx(math.exp(sum(n for n, _ in direct) / point.num_tokens), rel=1e-5)


def test_one_window_over_the_whole_document_is_plain_perplexity(yarn_model):
    doc = list(range(3, 303))
    (point,) = sliding_window_perplexity(yarn_model, [doc], [300])
    with torch.no_grad():
        ids = torch.tensor([doc])
        nll = torch.nn.functional.cross_entropy(yarn_model(ids).logits[0, :-1], ids[0, 1:])
    assert point.perplexity == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_every_length_is_scored_on_the_same_documents(yarn_model, caplog):
    docs = [[5] * n for n in (100, 700, 50, 900, 1200, 640)]
    chosen = select_documents(docs, min_tokens=640, document_tokens=800, max_documents=3, seed=0)
    assert len(chosen) == 3 and all(640 <= len(d) <= 800 for d in chosen), "long enough, cut to document_tokens"
    assert chosen == select_documents(docs, 640, 800, 3, seed=0), "the choice is a function of the seed"
    assert len(select_documents(docs, 640, 800, 10, seed=0)) == 4, "every long-enough document, no more"
    points = sliding_window_perplexity(yarn_model, docs, [128, 640], max_documents=3, document_tokens=800)
    assert points[0].num_documents == points[1].num_documents == 3
    assert points[0].num_tokens == points[1].num_tokens == sum(len(d) - 1 for d in chosen)
    with caplog.at_level(logging.WARNING):
        empty = sliding_window_perplexity(yarn_model, docs, [128, 5000])
    assert [p.num_documents for p in empty] == [0, 0] and all(math.isnan(p.perplexity) for p in empty)
    assert "No evaluation document has 5000 tokens" in caplog.text


def test_data_without_long_documents_is_flagged(tokenizer, caplog):
    _, validation = resolve_dataset_paths("tiny-chat", None, None)
    documents = read_documents(validation, tokenizer)
    with caplog.at_level(logging.WARNING):
        assert not warn_if_uninformative(documents, 256)
        assert warn_if_uninformative([d[:200] for d in documents], 256)
    assert "says nothing about the context extension" in caplog.text


def test_bad_evaluation_data_names_the_file_and_row(tokenizer, tmp_path):
    with pytest.raises(MissingDataFile, match=r"missing\.jsonl does not exist; fix long_context_eval\.data_path"):
        read_documents(tmp_path / "missing.jsonl", tokenizer)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2: not valid JSON"):
        read_documents(broken, tokenizer)
    keyless = tmp_path / "keyless.jsonl"
    keyless.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"keyless\.jsonl: row 2: .*'text' or a 'messages' list, found keys \['body'\]"):
        read_documents(keyless, tokenizer)


# ----------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------
def test_batched_hf_generation_equals_one_prompt_at_a_time(tokenizer):
    model, _ = load_model(resolve_model_path("tiny-qwen2"), {"rope_scaling": yarn_block()}, 1024)
    sharpen(model)
    rng = random.Random(0)
    texts = [make_passkey_prompt(tokenizer, n, d, rng).text for n in (100, 300, 600) for d in (0.1, 0.9)]
    texts += [build(tokenizer, 512, rng).text for build in RULER_TASKS.values()]
    prompts = [prompt_ids(tokenizer, text) for text in texts]
    batched = HFGenerator(model, tokenizer, batch_size=4).generate(prompts, 10)
    alone = HFGenerator(model, tokenizer, batch_size=1).generate(prompts, 10)
    assert batched == alone
    assert len(set(batched)) >= 6, f"the outputs must depend on the prompt for this to test anything: {batched}"


def test_generation_stops_where_vllm_stops(tokenizer, yarn_model):
    stops = stop_token_ids(tokenizer, yarn_model.generation_config)
    assert stops == sorted({tokenizer.eos_token_id, *yarn_model.generation_config.eos_token_id})
    ids = tokenizer(" 12345 is", add_special_tokens=False)["input_ids"]
    assert completion_text(tokenizer, ids + [stops[-1], *ids], stops) == " 12345 is"


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------
def small_config(**changes) -> LongContextEvalConfig:
    fields = dict(
        enabled=True,
        data_path=None,
        lengths=[128, 300],
        passkey_lengths=[300, 512],
        passkey_depths=[0.25, 0.75],
        passkey_trials=2,
        ruler_lengths=[512],
        ruler_trials=2,
        seed=0,
    )
    return LongContextEvalConfig(**(fields | changes))


def test_the_report_holds_every_measurement_and_writes_json_and_figures(tokenizer, yarn_model, tmp_path):
    docs = [list(range(3, 403)), list(range(10, 310)), list(range(5, 105))]
    report = evaluate(yarn_model, tokenizer, docs, small_config(), KeyReader(tokenizer))
    assert [(p.length, p.num_documents) for p in report.perplexity] == [(128, 2), (300, 2)]
    assert [(p.length, p.depth, p.accuracy) for p in report.passkey][:2] == [(300, 0.25, 1.0), (300, 0.75, 1.0)]
    assert {task: [(p.length, p.accuracy) for p in points] for task, points in report.ruler.items()} == {
        task: [(512, 0.0)] for task in RULER_TASKS
    }, "RULER prompts have no pass key: the reader answers them wrongly"
    assert report.info["original_window"] == 256
    assert set(report.info["seconds"]) == {"perplexity", "passkey", "ruler"}
    metrics = report.metrics()
    assert metrics["passkey@300"] == 1.0 and metrics["passkey@512/depth0.25"] == 1.0
    named = {"perplexity@128", "perplexity@300", "ruler/niah_multikey@512", "ruler/variable_tracking@512"}
    assert named <= set(metrics)

    written = write_report(report, tmp_path / "out")
    body = json.loads(written.report_path.read_text())
    assert [p["length"] for p in body["perplexity"]] == [128, 300] and body["metrics"] == metrics
    assert body["ruler"]["niah_multikey"][0]["trials"] == 2 and body["settings"]["passkey_trials"] == 2
    for figure in (written.passkey_heatmap, written.perplexity_plot):
        assert figure.parent == written.report_path.parent
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 5000
    assert body["files"] == {"passkey_heatmap": "passkey_heatmap.png", "perplexity_plot": "perplexity_vs_length.png"}

    table = format_table(written)
    assert "300 | 1.00 | 1.00 | 1.00" in table, table
    assert "length | niah_multikey | variable_tracking" in table


def test_an_evaluation_without_retrieval_lengths_skips_them_and_their_figure(tokenizer, yarn_model, tmp_path):
    config = small_config(lengths=[], passkey_lengths=[], ruler_lengths=[])
    report = write_report(evaluate(yarn_model, tokenizer, [], config, KeyReader(tokenizer)), tmp_path)
    assert (report.perplexity, report.passkey, report.ruler) == ([], [], {})
    assert report.passkey_heatmap is None and report.perplexity_plot is None and report.metrics() == {}


# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------
def _eval_config(*overrides: str):
    return validate_long_context_eval_config(resolve_config(load_config(EVAL_YAML, list(overrides))))


def test_the_new_keys_default_so_an_old_section_still_validates():
    old = LongContextEvalConfig(
        enabled=True, data_path=None, lengths=[128], passkey_lengths=[], passkey_depths=[], passkey_trials=1, seed=0
    )
    assert (old.stride, old.document_tokens, old.max_documents, old.batch_size) == (None, None, 10, 16)
    assert (old.ruler_lengths, old.ruler_trials, old.generation_backend) == ([], 10, "hf")
    assert old.ruler_tasks == ["niah_multikey", "variable_tracking"]
    shown = _eval_config().long_context_eval
    assert shown.passkey_trials == 10 and shown.ruler_lengths == [512, 1024]
    assert sft_config().long_context_eval.ruler_lengths == [512]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stride=300", "long_context_eval.stride: 300 is above the shortest of long_context_eval.lengths (128)"),
        ("document_tokens=512", "long_context_eval.document_tokens: 512 is below the longest of long_context_eval"),
        ("ruler_tasks=[niah_multikey,qa]", "long_context_eval.ruler_tasks: unknown task qa; known: niah_multikey, "),
        ("ruler_tasks=[niah_multikey,niah_multikey]", "long_context_eval.ruler_tasks: a task is listed twice"),
        ("generation_backend=sglang", "long_context_eval.generation_backend: Input should be 'hf' or 'vllm'"),
        ("passkey_lengths=[2048]", "long_context_eval.passkey_lengths: 2048 is above max_total_sequence_length = "),
        ("ruler_trials=0", "long_context_eval.ruler_trials: Input should be greater than 0"),
        ("max_documents=0", "long_context_eval.max_documents: Input should be greater than 0"),
        ("lengths=[1]", "long_context_eval.lengths.0: Input should be greater than or equal to 2"),
        ("strid=64", "long_context_eval.strid: no such key (did you mean long_context_eval.stride?)"),
    ],
)
def test_bad_values_are_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        _eval_config(f"long_context_eval.{override}")
    assert message in str(err.value)


def test_the_sft_section_rejects_bad_values_too():
    with pytest.raises(ConfigError, match="long_context_eval.stride: 200 is above the shortest"):
        sft_config("long_context_eval.stride=200")


# ----------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------
def _hydra_dict(block: dict) -> str:
    return ",".join(f"{k}:{str(v).lower() if isinstance(v, bool) else v}" for k, v in block.items())


def _run_command(*args: str) -> int:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "run_eval", Path(__file__).resolve().parents[2] / "examples" / "run_long_context_eval.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


def test_the_command_runs_on_an_hf_directory(tmp_path, capsys):
    code = _run_command(
        f"model_dir={resolve_model_path('tiny-qwen2')}",
        f"output_dir={tmp_path}",
        "long_context_eval.lengths=[128,512]",
        "long_context_eval.passkey_lengths=[300]",
        "long_context_eval.passkey_depths=[0.5]",
        "long_context_eval.passkey_trials=1",
        "long_context_eval.ruler_lengths=[512]",
        "long_context_eval.ruler_trials=1",
        f"++hf_config_overrides={{rope_scaling:{{{_hydra_dict(yarn_block())}}}}}",
    )
    assert code == 0
    report = json.loads((tmp_path / "long_context_eval.json").read_text())
    assert report["original_window"] == 256 and report["max_position_embeddings"] == 1024
    assert [p["length"] for p in report["perplexity"]] == [128, 512]
    assert all(p["perplexity"] > 1 and p["num_documents"] == 10 for p in report["perplexity"])
    assert report["data_path"].endswith("validation.jsonl") and "python-stdlib" in report["data_path"]
    assert report["passkey"][0]["trials"] == 1 and 0.0 <= report["passkey"][0]["accuracy"] <= 1.0
    assert sorted(report["ruler"]) == sorted(RULER_TASKS)
    assert (tmp_path / "passkey_heatmap.png").is_file() and (tmp_path / "perplexity_vs_length.png").is_file()
    assert "perplexity" in capsys.readouterr().out


def test_the_command_reports_a_missing_data_file_in_one_line(tmp_path, capsys):
    code = _run_command(
        f"model_dir={resolve_model_path('tiny-qwen2')}",
        f"output_dir={tmp_path}",
        f"long_context_eval.data_path={tmp_path / 'nope.jsonl'}",
    )
    assert code == 2
    assert f"Invalid data: evaluation data file {tmp_path / 'nope.jsonl'} does not exist" in capsys.readouterr().err


def test_sft_after_export_logs_every_metric_of_the_report(tmp_path):
    from types import SimpleNamespace

    from nemo_rl.algorithms.sft import SFTRun

    cfg = sft_config(
        "long_context_eval.lengths=[128,300]",
        "long_context_eval.passkey_lengths=[300]",
        "long_context_eval.passkey_trials=1",
        "long_context_eval.ruler_trials=1",
    )
    logged = []
    run = SimpleNamespace(
        cfg=cfg,
        log_dir=tmp_path,
        val_path=resolve_dataset_paths("tiny-chat", None, None)[1],
        metrics=SimpleNamespace(log=lambda metrics, step, prefix: logged.append((metrics, step, prefix))),
    )
    SFTRun.after_export(run, resolve_model_path("tiny-qwen2"), 8)
    ((metrics, step, prefix),) = logged
    assert (step, prefix) == (8, "long_context_eval")
    assert set(metrics) == {
        "perplexity@128",
        "perplexity@300",
        "passkey@300/depth0.5",
        "passkey@300",
        "ruler/niah_multikey@512",
        "ruler/variable_tracking@512",
    }
    assert all(math.isfinite(value) for value in metrics.values())
    assert {p.name for p in tmp_path.iterdir()} >= {"long_context_eval.json", "passkey_heatmap.png"}
