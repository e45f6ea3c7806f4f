"""LoRA (issue 16): adapters over a frozen base, the teacher the EMA of the adapters over the same base.

Deliberate bugs these catch: the teacher's adapters left swapped in for the student's backward
(gradients of the wrong weights), an EMA over the wrong tensors or with the wrong weight, a resume
that does not restore the adapters or the optimizer, base weights that move, a merge that drops
the scale.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft", reason="LoRA needs peft (pip install -e .[lora]; make test installs it)")

from caopd.config import load_config  # noqa: E402
from caopd.modeling.models import load_model, load_tokenizer  # noqa: E402
from caopd.training.lora import QWEN3_PROJECTIONS, AdapterTeacher, adapter_parameters, add_lora, merged_state_dict  # noqa: E402
from caopd.training.loss import distillation_loss, make_batch  # noqa: E402
from caopd.training.shared_prefix import make_shared_batch, shared_distillation_loss  # noqa: E402
from caopd.training.trainer import train  # noqa: E402
from tests.test_shared_prefix import targets_for  # noqa: E402


def lora_pair(seed: int = 0):
    tokenizer = load_tokenizer("tiny-qwen3", "fast")
    student = add_lora(load_model("tiny-qwen3", tokenizer, seed=seed), 4, 8, QWEN3_PROJECTIONS)
    teacher = AdapterTeacher(student)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter_parameters(student).items():  # B starts at 0: give both sets values
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            teacher.adapters[name] = torch.randn(p.shape, generator=g) * 0.05
    return tokenizer, student, teacher


def merged_model(tokenizer, state):
    model = load_model("tiny-qwen3", tokenizer, seed=99)
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("shared", [False, True])
def test_loss_and_adapter_gradients_equal_a_merged_reference(science_rows_path, shared):
    tokenizer, student, teacher = lora_pair()
    before = {name: p.detach().clone() for name, p in adapter_parameters(student).items()}
    with teacher.swapped():
        teacher_state = merged_state_dict(student)
    reference_student = merged_model(tokenizer, merged_state_dict(student))
    reference_teacher = merged_model(tokenizer, teacher_state).requires_grad_(False)
    targets, prompts = targets_for(science_rows_path, tokenizer, [3, 2])
    if shared:
        batch = make_shared_batch(tokenizer, targets, prompts, 256, 40)
        loss_fn = shared_distillation_loss
    else:
        batch = make_batch(tokenizer, targets, prompts, 256, 40)
        loss_fn = distillation_loss
    ours = loss_fn(student, teacher, batch, skip_tokens=2, impl="torch")
    ours.loss.backward()
    expected = loss_fn(reference_student, reference_teacher, batch, skip_tokens=2, impl="torch")
    expected.loss.backward()
    assert torch.allclose(ours.loss, expected.loss, rtol=1e-5), (float(ours.loss), float(expected.loss))
    assert all(p.grad is None for n, p in student.named_parameters() if "lora_" not in n)  # the base is frozen
    scale = 8 / 4
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        a, b = (student.get_parameter(f"{layer}.lora_{x}.default.weight") for x in "AB")
        a0, b0 = (before[f"{layer}.lora_{x}.default.weight"] for x in "AB")
        d_w = reference_student.get_parameter(f"{layer}.weight").grad  # dL/dW of W + scale B A
        for ours_grad, expected_grad in ((b.grad, scale * d_w @ a0.T), (a.grad, scale * b0.T @ d_w)):
            # fp32 sums in another order (threads, the merged model's path): error relative to the largest entry
            tolerance = 1e-3 * float(expected_grad.abs().max())
            assert torch.allclose(ours_grad, expected_grad, rtol=1e-4, atol=tolerance), layer
    # the teacher's forward swapped its adapters in and out: the student's are its own again
    assert all(torch.equal(p, before[name]) for name, p in adapter_parameters(student).items())


def lora_config(out, *extra):
    return load_config("tiny", ["--output-dir", str(out), "--lora-r", "4", "--max-steps", "3", "--save-every", "1",
                                "--save-total-limit", "0", "--teacher-ema", "0.1", "--num-generations", "3",
                                "--max-completion-length", "16", *extra])


def test_the_teacher_is_the_ema_of_the_adapters_and_resume_is_exact(tmp_path):
    whole = train(lora_config(tmp_path / "a"), quiet=True)
    steps = tmp_path / "a" / "checkpoints"
    teacher_1 = load_file(steps / "step-000001" / "teacher.safetensors")
    student_2 = load_file(steps / "step-000002" / "model.safetensors")
    teacher_2 = load_file(steps / "step-000002" / "teacher.safetensors")
    assert set(teacher_1) == set(student_2) and all("lora_" in k for k in student_2)  # adapters only
    for name, t1 in teacher_1.items():
        assert torch.allclose(teacher_2[name], torch.lerp(t1, student_2[name], 0.1), atol=1e-7), name
    # killed after the step-2 checkpoint: resume and finish
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000003")
    shutil.rmtree(tmp_path / "b" / "final")
    resumed = train(lora_config(tmp_path / "b", "--resume", "true"), quiet=True)
    for name, p in adapter_parameters(whole["student"]).items():
        assert torch.equal(p, adapter_parameters(resumed["student"])[name]), name
    for name, value in whole["teacher"].adapters.items():
        assert torch.equal(value, resumed["teacher"].adapters[name]), name
    base = load_model("tiny-qwen3", whole["tokenizer"], seed=42)  # --config tiny's seed: the base never moved
    trained = {n.replace(".base_layer.", "."): p for n, p in whole["student"].named_parameters() if "lora_" not in n}
    assert all(torch.equal(trained[n], p) for n, p in base.named_parameters())


def test_saved_adapters_and_merged_weights_reload(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    result = train(lora_config(tmp_path / "run", "--merge-lora", "true"), quiet=True)
    final = tmp_path / "run" / "final"
    ids = torch.randint(3, len(result["tokenizer"]), (2, 12))
    with torch.no_grad():
        expected = result["student"](input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(final / "merged")(input_ids=ids).logits
        base = load_model("tiny-qwen3", result["tokenizer"], seed=42)
        reloaded = peft.PeftModel.from_pretrained(base, final)(input_ids=ids).logits
    assert torch.allclose(merged, expected, atol=1e-5) and torch.allclose(reloaded, expected, atol=1e-5)


def test_a_frozen_teacher_is_the_base_model(tmp_path):
    result = train(lora_config(tmp_path / "run", "--teacher-ema", "0", "--max-steps", "2"), quiet=True)
    teacher, student = result["teacher"], result["student"]
    base = load_model("tiny-qwen3", result["tokenizer"], seed=42)
    ids = torch.randint(3, len(result["tokenizer"]), (2, 12))
    with torch.no_grad():
        ours = teacher.decoder(input_ids=ids).last_hidden_state
        assert torch.allclose(ours, base.model(input_ids=ids).last_hidden_state, atol=1e-6)
        assert not torch.allclose(student.model(input_ids=ids).last_hidden_state, ours, atol=1e-4)  # it trained


@pytest.mark.parametrize("r, targets, message", [
    (100_000, QWEN3_PROJECTIONS, "--lora-r 100000 is above the rank the adapted layers hold: "),
    (4, ["q_proj", "lm_head"], "--lora-target-modules lm_head: the embeddings and the lm_head take no adapters"),
    (4, ["embed_tokens"], "--lora-target-modules embed_tokens: the embeddings"),
])
def test_impossible_adapters_are_one_line(r, targets, message):
    """Issue 26 items 4 and 5: a rank of 100,000 ran for minutes at 11.6 GB; lm_head adapters were a traceback."""
    from caopd.errors import InputError

    tokenizer = load_tokenizer("tiny-qwen3", "fast")
    model = load_model("tiny-qwen3", tokenizer)
    smallest = min(min(m.in_features, m.out_features) for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in QWEN3_PROJECTIONS)
    with pytest.raises(InputError, match="^" + message.replace("(", r"\(")) as caught:
        add_lora(model, r, 8, targets)
    assert "\n" not in str(caught.value)
    if r > 4:
        assert str(caught.value).endswith(f"--lora-r <= {smallest}")
        add_lora(load_model("tiny-qwen3", tokenizer), smallest, 8, QWEN3_PROJECTIONS)  # the bound itself is fine
