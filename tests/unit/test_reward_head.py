"""The reward model's scalar head: its HF config, its forward, and the HF <-> Megatron name of its weight."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen2ForSequenceClassification

from nemo_rl.algorithms.loss_functions import BradleyTerryLoss
from nemo_rl.models.megatron.hf_weights import hf_to_megatron, megatron_to_hf
from nemo_rl.models.megatron.parallel_weights import ShardLayout, tp_partition_dim, tp_slice
from nemo_rl.models.megatron.reward_head import SCORE_WEIGHT, ScalarHead, attach_scalar_head, reward_model_config
from tests.helpers import tiny_qwen2_config


def _lm_config(**changes):
    return tiny_qwen2_config(**({"pad_token_id": 0, "architectures": ["Qwen2ForCausalLM"]} | changes))


# ----------------------------------------------------------------------------
# reward_model_config
# ----------------------------------------------------------------------------
def test_reward_model_config_is_the_untied_one_label_classifier():
    lm = _lm_config()
    before = lm.to_dict()
    rm = reward_model_config(lm)
    assert rm.architectures == ["Qwen2ForSequenceClassification"]
    assert rm.num_labels == 1
    assert rm.tie_word_embeddings is False
    assert rm.pad_token_id == 0
    assert (rm.hidden_size, rm.vocab_size, rm.num_hidden_layers) == (lm.hidden_size, lm.vocab_size, 1)
    assert lm.to_dict() == before, "the causal LM's config must not change"
    assert lm.architectures == ["Qwen2ForCausalLM"] and lm.tie_word_embeddings is True


def test_a_sequence_classification_config_stays_one():
    rm = reward_model_config(_lm_config(architectures=["Qwen2ForSequenceClassification"]))
    assert rm.architectures == ["Qwen2ForSequenceClassification"]


def test_reward_model_config_needs_a_pad_token_id():
    with pytest.raises(ValueError, match="pad_token_id"):
        reward_model_config(_lm_config(pad_token_id=None))


def test_reward_model_config_refuses_an_architecture_that_is_not_a_causal_lm():
    with pytest.raises(ValueError, match="Qwen2Model"):
        reward_model_config(_lm_config(architectures=["Qwen2Model"]))


# ----------------------------------------------------------------------------
# ScalarHead
# ----------------------------------------------------------------------------
def test_scalar_head_without_sequence_parallelism_is_one_linear_map():
    head = ScalarHead(16, sequence_parallel=False, dtype=torch.float32)
    assert head.sequence_parallel is False
    hidden = torch.randn(5, 2, 16)  # [S, B, H]
    scores, bias = head(hidden)
    assert bias is None
    assert scores.shape == (5, 2, 1)
    torch.testing.assert_close(scores, hidden @ head.score.weight.T)
    assert head.score.bias is None


def test_scalar_head_scores_what_hf_sequence_classification_pools():
    """With HF's weights, the head's score at ``input_lengths - 1`` is HF's reward (the last non-pad token)."""
    config = reward_model_config(_lm_config())
    torch.manual_seed(0)
    hf = Qwen2ForSequenceClassification(config).eval()
    lengths = torch.tensor([6, 3, 5, 4])
    input_ids = torch.randint(1, config.vocab_size, (4, 6))
    input_ids[torch.arange(6).expand(4, -1) >= lengths.unsqueeze(1)] = config.pad_token_id
    attention_mask = (input_ids != config.pad_token_id).long()
    head = ScalarHead(config.hidden_size, sequence_parallel=False, dtype=torch.float32)
    with torch.no_grad():
        head.score.weight.copy_(hf.score.weight)
        expected = hf(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        hidden = hf.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        scores, _ = head(hidden.transpose(0, 1))
    scores = scores[..., 0].transpose(0, 1)  # [B, L], as the worker hands it to the loss
    torch.testing.assert_close(scores[torch.arange(4), lengths - 1], expected, rtol=1e-5, atol=1e-5)
    loss, _, _ = BradleyTerryLoss()(scores, {"input_lengths": lengths})
    margin = expected[0::2] - expected[1::2]
    assert loss.item() == pytest.approx(float(torch.nn.functional.softplus(-margin).sum()), rel=1e-5)


def test_attach_scalar_head_replaces_the_last_stages_output_layer_reproducibly():
    config = _lm_config(hidden_size=256, initializer_range=0.05)
    first = SimpleNamespace(post_process=True, output_layer="vocab projection")
    second = SimpleNamespace(post_process=True, output_layer="vocab projection")
    attach_scalar_head(first, config, sequence_parallel=True, dtype=torch.float32, seed=3)
    attach_scalar_head(second, config, sequence_parallel=True, dtype=torch.float32, seed=3)
    assert isinstance(first.output_layer, ScalarHead) and first.output_layer.sequence_parallel is True
    weight = first.output_layer.score.weight
    assert weight.shape == (1, 256)
    assert torch.equal(weight, second.output_layer.score.weight), "TP replicas must start equal"
    assert 0.03 < weight.std().item() < 0.07  # HF's init: normal(0, initializer_range)
    not_last = SimpleNamespace(post_process=False, output_layer="vocab projection")
    attach_scalar_head(not_last, config, sequence_parallel=False, dtype=torch.float32, seed=3)
    assert not_last.output_layer == "vocab projection"


# ----------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------
def test_hf_reward_model_weights_round_trip_through_megatron_names():
    config = reward_model_config(_lm_config())
    torch.manual_seed(0)
    hf_state = Qwen2ForSequenceClassification(config).state_dict()
    assert "score.weight" in hf_state and "lm_head.weight" not in hf_state
    mcore = hf_to_megatron(hf_state, config)
    assert SCORE_WEIGHT == "output_layer.score.weight"
    assert torch.equal(mcore[SCORE_WEIGHT], hf_state["score.weight"])
    assert "output_layer.weight" not in mcore
    back = megatron_to_hf(mcore, config)
    assert set(back) == set(hf_state)
    for name, tensor in hf_state.items():
        assert torch.equal(back[name], tensor), name


def test_the_score_weight_is_replicated_across_tensor_parallel_ranks():
    assert tp_partition_dim(SCORE_WEIGHT) is None
    assert tp_partition_dim("output_layer.weight") == 0  # the vocabulary projection it replaces is split
    full = torch.randn(1, 64)
    for rank in range(2):
        assert torch.equal(tp_slice(full, SCORE_WEIGHT, ShardLayout(tp_size=2, tp_rank=rank)), full)
