"""The long-context tasks through vLLM give transformers' answers: same RoPE (YaRN 4x), same greedy text.

One in-process vLLM engine (about 30 s to start on CPU) is built by the factory
the evaluation uses (``open_generator``), from a copy of the tiny model whose
query/key projections are scaled up, so greedy output depends on the prompt and
on positions beyond the original window (a negative control without YaRN shows
the texts would differ if vLLM had not received the overrides).
"""

from __future__ import annotations

import random

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_rl.config.schema import LongContextEvalConfig
from nemo_rl.data.passkey import make_passkey_prompt
from nemo_rl.data.ruler import RULER_TASKS
from nemo_rl.evals.generators import HFGenerator, open_generator
from nemo_rl.evals.long_context import evaluate, load_model
from nemo_rl.evals.retrieval import PASSKEY_NEW_TOKENS, generate_each, prompt_ids
from nemo_rl.models.builtin_models import resolve_model_path
from tests.helpers import yarn_block
from tests.unit.test_long_context_eval import sharpen

pytestmark = [pytest.mark.functional, pytest.mark.slow]

MAX_LEN = 1024  # 4x the tiny model's original window of 256
OVERRIDES = {"rope_scaling": yarn_block()}


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharp") / "tiny-qwen2-sharp"
    source = resolve_model_path("tiny-qwen2")
    sharpen(AutoModelForCausalLM.from_pretrained(source)).save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def backends(sharp_dir):
    model, tokenizer = load_model(sharp_dir, OVERRIDES, MAX_LEN)
    with open_generator("vllm", model, tokenizer, sharp_dir, OVERRIDES, MAX_LEN, batch_size=16) as vllm:
        yield model, tokenizer, HFGenerator(model, tokenizer), vllm


def _passkey_prompts(tokenizer) -> list[list[int]]:
    rng = random.Random(0)
    texts = [
        make_passkey_prompt(tokenizer, length - PASSKEY_NEW_TOKENS, depth, rng).text
        for length in (200, 600, 1024)
        for depth in (0.1, 0.5, 0.9)
    ]
    return [prompt_ids(tokenizer, text) for text in texts]


def test_passkey_and_ruler_answers_are_the_same_through_hf_and_vllm(backends, sharp_dir):
    model, tokenizer, hf, vllm = backends
    passkey = _passkey_prompts(tokenizer)
    from_hf, from_vllm = hf.generate(passkey, PASSKEY_NEW_TOKENS), vllm.generate(passkey, PASSKEY_NEW_TOKENS)
    assert from_vllm == from_hf
    assert len(set(from_hf)) >= 6, f"the answers must depend on the prompt for this to test anything: {from_hf}"

    rng = random.Random(1)
    ruler = [RULER_TASKS[task](tokenizer, length, rng) for task in RULER_TASKS for length in (512, 1024)]
    ids, budgets = [prompt_ids(tokenizer, p.text) for p in ruler], [p.max_new_tokens for p in ruler]
    assert generate_each(vllm, ids, budgets) == generate_each(hf, ids, budgets)

    # Negative control: without YaRN the prompts beyond the original window get other answers.
    plain, _ = load_model(sharp_dir, None, MAX_LEN)
    beyond = [i for i, p in enumerate(passkey) if len(p) > 256]
    without_yarn = HFGenerator(plain, tokenizer).generate([passkey[i] for i in beyond], PASSKEY_NEW_TOKENS)
    assert without_yarn != [from_vllm[i] for i in beyond]


def test_the_evaluation_scores_the_same_through_either_backend(backends):
    model, tokenizer, hf, vllm = backends
    config = LongContextEvalConfig(
        enabled=True,
        data_path=None,
        lengths=[],
        passkey_lengths=[300, 1024],
        passkey_depths=[0.25, 0.75],
        passkey_trials=3,
        ruler_lengths=[1024],
        ruler_trials=2,
        seed=0,
    )
    through_hf = evaluate(model, tokenizer, [], config, hf)
    through_vllm = evaluate(model, tokenizer, [], config, vllm)
    assert through_vllm.passkey == through_hf.passkey and through_vllm.ruler == through_hf.ruler
    assert len(through_hf.passkey) == 4 and sorted(through_hf.ruler) == sorted(RULER_TASKS)


def test_a_prompt_past_the_engine_window_is_a_clear_error(backends):
    _, _, _, vllm = backends
    with pytest.raises(ValueError, match=r"exceeds vLLM's max_model_len = 1024 \(max_total_sequence_length\)"):
        vllm.generate([[5] * 1020], PASSKEY_NEW_TOKENS)
