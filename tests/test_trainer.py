"""CaOPD and plain OPD training on tiny-qwen3 with real rows, a scripted engine (known verdicts)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from caopd_kernels.reference import kl_per_token
from safetensors.torch import load_file

from caopd.calibration import RolloutGroup, build_targets
from caopd.config import TrainConfig, load_config
from caopd.data import load_examples
from caopd.engines.base import ScriptedEngine
from caopd.errors import InputError
from caopd.loss import distillation_loss, make_batch
from caopd.models import load_model, load_tokenizer
from caopd.prompts import CONFIDENCE_INSTRUCTION, student_messages
from caopd.trainer import prompts_at, train
from caopd.verifiers import TASKS

K = 4


def subset(path, dataset, tmp_path, n=6):
    lines = path.read_text().splitlines()[:n]
    out = tmp_path / f"{dataset}.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out, load_examples(out, dataset)


def correct_count(example_id: int) -> int:
    return example_id % (K + 1)  # 0..K correct of K: P_acc = 0, .25, .5, .75, 1


class KnownVerdictEngine(ScriptedEngine):
    """Completion k for example e is correct iff k < correct_count(e.id). The example is found by
    decoding the prompt with the tokenizer the trainer saved in its output dir."""

    def __init__(self, examples, dataset, out):
        task = TASKS[dataset]
        wrong = "<answer>Z</answer>" if dataset == "science" else "Action: noSuchTool\nAction Input: {}"

        def script(_, ids, n):
            tokenizer = load_tokenizer("tiny-qwen3", str(out / "tokenizer"))
            text = tokenizer.decode(ids)
            (e,) = [e for e in examples if student_messages(e)[-1]["content"] in text]
            return [f"thinking {k}\n" + (task.render_answer(e.gold) if k < correct_count(e.id) else wrong)
                    + "\nConfidence: 0.97" for k in range(n)]
        super().__init__(script)


def config_for(data, dataset, out, **kw) -> TrainConfig:
    values = dict(model="tiny-qwen3", tokenizer="fast", dataset=dataset, data=str(data), output_dir=str(out),
                  num_generations=K, prompts_per_step=3, micro_batch_prompts=2, max_prompt_length=128,
                  max_completion_length=40, max_steps=2, learning_rate=1e-3, save_every=1, bf16=False, seed=3,
                  loss_impl="torch", teacher_ema=0.1)
    values.update(kw)
    return TrainConfig(**values)


def run(config, examples, stop_after_steps=None):
    engine = KnownVerdictEngine(examples, config.dataset, Path(config.output_dir))
    return train(config, engine=engine, stop_after_steps=stop_after_steps, quiet=True), engine


def test_student_prompt_injection(tooluse_path, science_path):
    tool = load_examples(tooluse_path, "tooluse")[0]
    content = student_messages(tool)[0]["content"]
    assert content.index(CONFIDENCE_INSTRUCTION) < content.index("\n\nBegin!") and content.count("Begin!") == 1
    science = load_examples(science_path, "science")[0]
    messages = student_messages(science)
    assert messages[0] == science.prompt[0] and messages[1]["content"].endswith(CONFIDENCE_INSTRUCTION)


@pytest.mark.parametrize("mode", ["demo", "correct_solution"])
def test_targets_carry_p_acc_in_three_places(science_path, mode):
    example = load_examples(science_path, "science")[3]
    gold = TASKS["science"].render_answer(example.gold)
    completions = [gold + "\nConfidence: 0.99", "<answer>Z</answer>\nConfidence: 0.9", "no answer", gold]
    group = RolloutGroup(example, completions, [True, False, False, True])
    targets = build_targets(group, "science", mode, calibrate=True, rng=random.Random(0))
    assert group.p_acc == 0.5 and len(targets) == 4
    for t, c in zip(targets, completions):
        assert t.confidence_line == "Confidence: 0.50" and "Confidence" not in t.completion
        assert t.completion == c.split("\nConfidence")[0]
    teacher = targets[0].teacher_messages[-1]["content"]
    assert "Confidence: 0.50" in teacher and "Confidence: 0.99" not in teacher
    note = "The empirical confidence for this question is 0.50. Output this exact value in the 'Confidence:' field."
    closing = "Now answer with a response of your own" if mode == "demo" else "Correctly solve the original question."
    assert teacher.index(note) < teacher.index(closing)
    assert ("This is an example for a response" in teacher) == (mode == "demo")
    plain = build_targets(group, "science", mode, calibrate=False, rng=random.Random(0))
    assert plain[0].completion == completions[0] and plain[0].confidence_line is None
    assert "Confidence: 1.00" in plain[0].teacher_messages[-1]["content"] and note not in \
        plain[0].teacher_messages[-1]["content"]


def test_correct_solution_without_a_correct_rollout_falls_back_to_demo(science_path):
    example = load_examples(science_path, "science")[0]
    group = RolloutGroup(example, ["x", "y"], [False, False])
    (t, _) = build_targets(group, "science", "correct_solution", calibrate=True, rng=random.Random(0))
    assert t.used_fallback and "This is an example for a response" in t.teacher_messages[-1]["content"]


def test_loss_equals_full_logit_computation(science_path):
    examples = load_examples(science_path, "science")[:2]
    tokenizer = load_tokenizer("tiny-qwen3", "fast")
    student = load_model("tiny-qwen3", tokenizer, seed=1)
    teacher = load_model("tiny-qwen3", tokenizer, seed=2)
    from caopd.loss import chat_ids
    groups = [RolloutGroup(e, [TASKS["science"].render_answer(e.gold) + " because", "<answer>Q</answer> hmm"],
                           [True, False]) for e in examples]
    targets = [t for g in groups for t in build_targets(g, "science", "demo", True, random.Random(0))]
    prompts = [chat_ids(tokenizer, student_messages(g.example)) for g in groups for _ in range(2)]
    batch = make_batch(tokenizer, targets, prompts, 64, 30)
    ours = distillation_loss(student, teacher, batch, skip_tokens=3, temperature=0.8)
    s_logits = student(input_ids=batch.student_ids, attention_mask=batch.student_attention).logits
    t_logits = teacher(input_ids=batch.teacher_ids, attention_mask=batch.teacher_attention).logits
    per_sequence = []
    for b in range(len(targets)):
        s, t, n = batch.student_start[b], batch.teacher_start[b], batch.length[b]
        kl = kl_per_token(s_logits[b, s - 1:s - 1 + n].float() / 0.8, t_logits[b, t - 1:t - 1 + n].float() / 0.8,
                          "reverse", 0.5)
        per_sequence.append(kl[3:].mean())
        assert torch.equal(batch.student_ids[b, s:s + n], batch.teacher_ids[b, t:t + n])
    expected = torch.stack(per_sequence).mean()
    assert torch.allclose(ours.loss, expected, rtol=1e-5, atol=1e-6), (float(ours.loss), float(expected))
    ours.loss.backward()
    assert student.get_output_embeddings().weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("dataset", ["science", "tooluse"])
@pytest.mark.parametrize("calibrate", [True, False])
def test_two_steps_p_acc_ema_and_no_teacher_grad(dataset, calibrate, tmp_path, request, monkeypatch):
    data, examples = subset(request.getfixturevalue(f"{dataset}_path"), dataset, tmp_path)
    config = config_for(data, dataset, tmp_path / "run", empirical_calibration=calibrate)
    import caopd.trainer as trainer_module
    seen = []

    def recording_make_batch(tokenizer, targets, *args, **kwargs):
        seen.extend(targets)
        return make_batch(tokenizer, targets, *args, **kwargs)
    monkeypatch.setattr(trainer_module, "make_batch", recording_make_batch)
    result, engine = run(config, examples)
    assert len(seen) == 2 * 3 * K
    note = "The empirical confidence for this question is"
    for target in seen:
        p_acc = correct_count(target.example.id) / K
        teacher = target.teacher_messages[-1]["content"]
        assert "0.97" not in teacher
        if calibrate:
            assert target.confidence_line == f"Confidence: {p_acc:.2f}" and "Confidence" not in target.completion
            assert f"Confidence: {p_acc:.2f}" in teacher and f"{note} {p_acc:.2f}." in teacher
        else:
            assert target.confidence_line is None and target.completion.endswith("Confidence: 0.97")
            assert "Confidence: 1.00" in teacher and note not in teacher
    history = result["history"]
    assert len(history) == 2 and engine.weight_updates == 2
    for record in history:
        expected = sum(correct_count(examples[i].id) / K for i in record["prompts"]) / len(record["prompts"])
        assert record["mean_p_acc"] == pytest.approx(expected)
        assert record["format_adherence"] == 1.0 and record["loss"] > 0
    assert all(p.grad is None for p in result["teacher"].parameters())
    assert (tmp_path / "run" / "final" / "config.json").exists()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]


def test_teacher_moves_by_exactly_the_ema_rule(science_path, tmp_path):
    data, examples = subset(science_path, "science", tmp_path)
    first, _ = run(config_for(data, "science", tmp_path / "a", max_steps=1), examples)
    second, _ = run(config_for(data, "science", tmp_path / "b", max_steps=2, save_every=1), examples)
    # teacher_2 = 0.9 teacher_1 + 0.1 student_2, with teacher_1 and student_2 from the same run
    teacher_1 = load_file(tmp_path / "b" / "checkpoints" / "step-000001" / "teacher.safetensors")
    assert "model.norm.weight" in teacher_1  # (a tied lm_head is stored once, as its embedding)
    for name, t1 in teacher_1.items():
        t2 = second["teacher"].state_dict()[name]
        expected = torch.lerp(t1, second["student"].state_dict()[name], 0.1)
        assert torch.allclose(t2, expected, atol=1e-7), name
    assert not torch.equal(first["teacher"].state_dict()["model.norm.weight"],
                           first["student"].state_dict()["model.norm.weight"])


@pytest.mark.parametrize("async_rollouts", [False, True])
def test_kill_then_resume_equals_uninterrupted(science_path, tmp_path, async_rollouts):
    data, examples = subset(science_path, "science", tmp_path, n=5)
    kw = dict(max_steps=3, async_rollouts=async_rollouts, max_staleness=0)
    straight, _ = run(config_for(data, "science", tmp_path / "straight", **kw), examples)
    killed = config_for(data, "science", tmp_path / "killed", **kw)
    run(killed, examples, stop_after_steps=2)
    (tmp_path / "killed" / "checkpoints" / "step-000003.tmp").mkdir()  # a half-written one is ignored
    resumed, _ = run(config_for(data, "science", tmp_path / "killed", resume=True, **kw), examples)
    assert [r["prompts"] for r in resumed["history"]] == [straight["history"][2]["prompts"]]
    seen = [i for r in straight["history"] for i in r["prompts"]]
    assert seen == prompts_at(0, 9, 5, 3) and sorted(seen[:5]) == list(range(5))
    for name, value in straight["student"].state_dict().items():
        assert torch.equal(value, resumed["student"].state_dict()[name]), name
    for name, value in straight["teacher"].state_dict().items():
        assert torch.equal(value, resumed["teacher"].state_dict()[name]), name


def test_config_overrides_and_errors(tmp_path):
    config = load_config("tiny", ["--num-generations", "2", "--empirical-calibration", "false",
                                  "--chat-template-kwargs", "{enable_thinking: true}"])
    assert config.num_generations == 2 and not config.empirical_calibration
    assert config.chat_template_kwargs == {"enable_thinking": True} and config.data_path().exists()
    with pytest.raises(InputError, match="unknown option '--nope'"):
        load_config("tiny", ["--nope", "1"])
    with pytest.raises(InputError, match="expected int"):
        load_config("tiny", ["--num-generations", "many"])
    with pytest.raises(InputError, match="'divergence'"):
        load_config("tiny", ["--divergence", "kl"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 1\n")
    with pytest.raises(InputError, match="unknown config field 'learning_rat'"):
        load_config(str(bad), [])
