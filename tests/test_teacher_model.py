"""--teacher-model: a frozen teacher other than the student (issue 30), on one process.

A 3-layer, wider teacher (random weights from a config.json, a head padded past the tokenizer) and
tiny-qwen3 (2 layers) as the student, one tokenizer."""
from __future__ import annotations

import json

import pytest
import torch

from caopd.config import TEACHER_EMA_DEFAULT
from caopd.errors import InputError
from caopd.modeling.models import check_teacher_tokenizer, fast_tokenizer, load_model, load_tokenizer, tiny_qwen3_config
from caopd.training.placement import load_teacher
from tests.test_trainer import config_for, run, subset


@pytest.fixture
def teacher_config(tmp_path):
    """random:<this file>: 3 layers, hidden 96, a 1,040-row head (the tokenizer has fewer ids)."""
    values = tiny_qwen3_config(1040, hidden_size=96, layers=3, intermediate_size=160).to_dict()
    path = tmp_path / "teacher" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(values))
    return f"random:{path}"


def test_a_frozen_teacher_of_its_own_trains_saves_and_resumes(science_rows_path, tmp_path, teacher_config):
    data, examples = subset(science_rows_path, "science", tmp_path, n=5)
    kw = dict(max_steps=3, teacher_model=teacher_config, teacher_ema=TEACHER_EMA_DEFAULT)  # the default: not applied
    straight, _ = run(config_for(data, "science", tmp_path / "straight", **kw), examples)
    teacher = straight["teacher"]
    assert teacher.config.num_hidden_layers == 3 and teacher.get_output_embeddings().weight.shape == (1040, 96)
    assert all(h["loss"] > 0 for h in straight["history"]) and len(straight["history"]) == 3
    config = config_for(data, "science", tmp_path / "straight", **kw)
    fresh = load_teacher(config, load_tokenizer("tiny-qwen3", str(tmp_path / "straight" / "tokenizer")), torch.float32)
    for name, value in fresh.state_dict().items():  # frozen: what was loaded, after three steps
        assert torch.equal(teacher.state_dict()[name], value), name
    step = tmp_path / "straight" / "checkpoints" / "step-000003"
    assert (step / "model.safetensors").exists() and not (step / "teacher.safetensors").exists()

    run(config_for(data, "science", tmp_path / "killed", **kw), examples, stop_after_steps=2)
    resumed, _ = run(config_for(data, "science", tmp_path / "killed", resume=True, **kw), examples)
    for name, value in straight["student"].state_dict().items():
        assert torch.equal(value, resumed["student"].state_dict()[name]), name


def test_the_ema_does_not_apply_to_a_teacher_of_its_own():
    with pytest.raises(InputError, match=r"^--teacher-ema 0.1: a --teacher-model teacher is frozen"):
        config_for("x", "science", "out", teacher_model="random:Qwen3-0.6B", teacher_ema=0.1)


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path):
    ours = fast_tokenizer(["the cat sat on the mat"] * 20)
    theirs = fast_tokenizer(["completely different words in here"] * 20)
    folder = tmp_path / "teacher"
    load_model("tiny-qwen3", theirs).save_pretrained(folder)
    theirs.save_pretrained(folder)
    with pytest.raises(InputError, match=rf"^--teacher-model {folder}: its tokenizer is not the student's \("):
        check_teacher_tokenizer(str(folder), ours)
    check_teacher_tokenizer(str(folder), theirs)  # its own: accepted
    with pytest.raises(InputError, match=rf"^--teacher-model {tmp_path}: its tokenizer cannot be loaded"):
        check_teacher_tokenizer(str(tmp_path), ours)


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_teacher_top_k_at_the_vocabulary_is_the_dense_loss_and_below_it_the_topk_reference(divergence):
    """--teacher-top-k k: the teacher's top-k log-probabilities (topk_logprobs, as a server returns them) and
    fused_linear_kl_topk; at k = V exactly the full-vocabulary loss, below it the top-k reference."""
    from caopd_kernels import fused_linear_kl_topk_reference

    from caopd.training.loss import fused_loss

    tokenizer = fast_tokenizer()
    student, teacher = (load_model("tiny-qwen3", tokenizer, seed=s) for s in (1, 2))
    vocab = student.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    student_rows = torch.randn(23, 64, generator=g, requires_grad=True)
    teacher_rows = torch.randn(23, 64, generator=g)
    weights = torch.rand(23, generator=g) * (torch.rand(23, generator=g) > 0.2)
    kw = dict(divergence=divergence, beta=0.4, temperature=0.8, impl="torch")
    dense = fused_loss(student, teacher, student_rows, teacher_rows, weights, **kw).loss
    every = fused_loss(student, teacher, student_rows, teacher_rows, weights, top_k=vocab, **kw).loss
    assert torch.allclose(every, dense, rtol=1e-5, atol=1e-7), (float(every), float(dense))
    few = fused_loss(student, teacher, student_rows, teacher_rows, weights, top_k=20, **kw).loss
    with torch.no_grad():
        logprobs, ids = torch.log_softmax(teacher_rows @ teacher.get_output_embeddings().weight.T / 0.8, -1).topk(20)
    expected = fused_linear_kl_topk_reference(student_rows.double(), student.get_output_embeddings().weight.double(),
                                              ids, logprobs.double(), weights.double(), divergence=divergence,
                                              beta=0.4, temperature=0.8, reduction="sum")
    assert torch.allclose(few.double(), expected, rtol=1e-5), (float(few), float(expected))
    assert not torch.allclose(few, dense, rtol=1e-3)  # 20 of the tokens: another loss
