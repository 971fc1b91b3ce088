"""The teacher must share the student's vocabulary; the built-in tiny teacher does, with other, sharper weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from nemo_rl.algorithms.distillation import check_teacher_compatible
from nemo_rl.models.tiny_model import create_tiny_model, create_tiny_teacher
from nemo_rl.utils.errors import ConfigError
from tests.helpers import tiny_qwen2_config


@pytest.fixture
def model_dir(tmp_path):
    def write(name: str, vocab_size: int):
        tiny_qwen2_config(vocab_size=vocab_size).save_pretrained(tmp_path / name)
        return tmp_path / name

    return write


def _errors(student, teacher, k) -> list[str]:
    with pytest.raises(ConfigError) as info:
        check_teacher_compatible(student, teacher, k)
    return info.value.messages


def test_a_teacher_of_the_students_vocabulary_is_accepted(model_dir):
    student, teacher = model_dir("student", 128), model_dir("teacher", 128)
    assert check_teacher_compatible(student, teacher, 64) is None
    assert check_teacher_compatible(student, teacher, 128) is None  # k may be the whole vocabulary


def test_a_teacher_of_another_vocabulary_is_refused_naming_teacher_model_name(model_dir):
    (error,) = _errors(model_dir("student", 128), model_dir("teacher", 256), 16)
    assert error.startswith("teacher.model_name: vocabulary of 256 entries, the student's has 128")
    assert "same tokenizer" in error


def test_k_larger_than_the_vocabulary_is_refused_naming_topk_logits_k(model_dir):
    student, teacher = model_dir("student", 128), model_dir("teacher", 128)
    assert _errors(student, teacher, 129) == [
        "distillation.topk_logits_k: 129 is more than the vocabulary (128 entries); lower it"
    ]


def test_both_problems_are_reported_together(model_dir):
    errors = _errors(model_dir("student", 128), model_dir("teacher", 64), 100)
    assert len(errors) == 2
    assert errors[0].startswith("teacher.model_name: vocabulary of 64 entries")
    assert errors[1].startswith("distillation.topk_logits_k: 100 is more than the vocabulary (64 entries)")


def test_the_error_is_a_config_error_so_entry_scripts_exit_2(model_dir):
    with pytest.raises(ValueError):  # ConfigError is a ValueError: the entry's handler reports it
        check_teacher_compatible(model_dir("student", 128), model_dir("teacher", 192), 8)


# ----------------------------------------------------------------------------
# the built-in tiny teacher
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    student = create_tiny_model(tmp_path_factory.mktemp("student"))
    teacher = create_tiny_teacher(tmp_path_factory.mktemp("teacher"))
    return student, teacher


def test_tiny_teacher_shares_the_tiny_models_tokenizer_and_shape(tiny_pair):
    student, teacher = tiny_pair
    assert (student / "tokenizer.json").read_text() == (teacher / "tokenizer.json").read_text()
    student_cfg = json.loads((student / "config.json").read_text())
    teacher_cfg = json.loads((teacher / "config.json").read_text())
    differing = {k for k in student_cfg.keys() | teacher_cfg.keys() if student_cfg.get(k) != teacher_cfg.get(k)}
    assert differing == {"initializer_range"}
    assert teacher_cfg["initializer_range"] > student_cfg["initializer_range"]
    check_teacher_compatible(student, teacher, 64)


def test_tiny_teacher_has_other_and_larger_weights(tiny_pair):
    student, teacher = (load_file(path / "model.safetensors") for path in tiny_pair)
    assert student.keys() == teacher.keys()
    embedding = "model.embed_tokens.weight"
    assert student[embedding].shape == teacher[embedding].shape
    assert not torch.equal(student[embedding], teacher[embedding])
    student_std, teacher_std = student[embedding].std().item(), teacher[embedding].std().item()
    assert teacher_std > 3 * student_std
    for name, tensor in student.items():
        if tensor.dim() == 2:  # every projection differs, not only the embedding
            assert not torch.equal(tensor, teacher[name]), name


def test_tiny_teacher_is_reproducible(tiny_pair, tmp_path):
    _, teacher = tiny_pair
    again = create_tiny_teacher(tmp_path / "again")
    first, second = load_file(teacher / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)
