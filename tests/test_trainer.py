"""CaOPD and plain OPD training on tiny-qwen3 with a scripted engine (known verdicts).

The rows are the shipped science example and synthetic tool-use rows, so none of this skips
without ../shared. Deliberate bugs these tests catch (issue 12; each tried in a scratch copy):
- P_acc computed as correct/(K+1): test_two_steps_p_acc_ema_and_no_teacher_grad;
- the trainer ignoring config.divergence, beta, temperature, skip_loss_tokens or loss_impl:
  test_the_loss_gets_the_configured_options;
- the learning-rate schedule returning 1.0: test_warmup_cosine_values, test_logged_lr_follows_the_schedule;
- sampling options not reaching the engine: test_the_engine_gets_the_configured_sampling;
- train_rollouts, teacher_context=correct_solution, weight_decay, gradient_checkpointing ignored:
  their own tests below.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from caopd_kernels.reference import kl_per_token
from safetensors.torch import load_file

from caopd.config import TrainConfig
from caopd.engines.base import ScriptedEngine
from caopd.errors import InputError
from caopd.inputs.data import load_examples
from caopd.inputs.prompts import student_messages
from caopd.modeling.models import load_model, load_tokenizer
from caopd.scoring.calibration import RolloutGroup, build_targets
from caopd.scoring.verifiers import TASKS
from caopd.training.loss import distillation_loss, make_batch
from caopd.training.trainer import prompts_at, train, warmup_cosine

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

@pytest.fixture
def seen_targets(monkeypatch) -> list:
    """Every DistillationTarget the trainer batches, in order (its batch builders, recorded)."""
    import caopd.training.trainer as trainer_module
    seen = []

    def recording(build):
        def recording_build(tokenizer, targets, *args, **kwargs):
            seen.extend(targets)
            return build(tokenizer, targets, *args, **kwargs)
        return recording_build
    monkeypatch.setattr(trainer_module, "make_batch", recording(make_batch))
    monkeypatch.setattr(trainer_module, "make_shared_batch", recording(trainer_module.make_shared_batch))
    return seen



def test_loss_equals_full_logit_computation(science_rows_path):
    examples = load_examples(science_rows_path, "science")[:2]
    tokenizer = load_tokenizer("tiny-qwen3", "fast")
    student = load_model("tiny-qwen3", tokenizer, seed=1)
    teacher = load_model("tiny-qwen3", tokenizer, seed=2)
    from caopd.training.loss import chat_ids
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
    assert all(p.grad is None for p in teacher.parameters())
    grad_ours = student.get_output_embeddings().weight.grad.clone()
    student.zero_grad()
    expected.backward()  # the full-logit loss's gradient through the same (tied) head
    assert torch.allclose(grad_ours, student.get_output_embeddings().weight.grad, atol=1e-6)


@pytest.mark.parametrize("dataset", ["science", "tooluse"])
@pytest.mark.parametrize("calibrate", [True, False])
def test_two_steps_p_acc_ema_and_no_teacher_grad(dataset, calibrate, tmp_path, request, seen_targets):
    data, examples = subset(request.getfixturevalue(f"{dataset}_rows_path"), dataset, tmp_path)
    config = config_for(data, dataset, tmp_path / "run", empirical_calibration=calibrate)
    result, engine = run(config, examples)
    assert len(seen_targets) == 2 * 3 * K
    note = "The empirical confidence for this question is"
    for i, target in enumerate(seen_targets):
        # the target: P_acc at the first step; at the last the posterior mean with the prior's full weight
        # N = 8 on the stated 0.97 (every scripted completion states it), (correct + 8 x 0.97) / (K + 8)
        prior = 0.0 if i < 3 * K else config.confidence_prior
        p_acc = (correct_count(target.example.id) + prior * 0.97) / (K + prior)
        teacher = target.teacher_messages[-1]["content"]
        assert "0.97" not in teacher or (calibrate and prior and f"{p_acc:.2f}" == "0.97")
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
        assert record["format_adherence"] == 1.0 and record["kl"] == record["loss"]
        assert record["wrong_reasons"] == {"wrong answer" if dataset == "science" else "wrong call":
                                           sum(K - correct_count(examples[i].id) for i in record["prompts"])}
    assert all(p.grad is None for p in result["teacher"].parameters())
    assert (tmp_path / "run" / "final" / "config.json").exists()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]


def test_teacher_moves_by_exactly_the_ema_rule(science_rows_path, tmp_path):
    data, examples = subset(science_rows_path, "science", tmp_path)
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
def test_kill_then_resume_equals_uninterrupted(science_rows_path, tmp_path, async_rollouts):
    data, examples = subset(science_rows_path, "science", tmp_path, n=5)
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


class RecordingEngine(KnownVerdictEngine):
    def __init__(self, *args):
        super().__init__(*args)
        self.sampling = []

    def generate(self, prompts, n, sampling):
        self.sampling.append((len(prompts), n, sampling))
        return super().generate(prompts, n, sampling)


def test_the_loss_gets_the_configured_options(science_rows_path, tmp_path, monkeypatch):
    data, examples = subset(science_rows_path, "science", tmp_path)
    calls = []

    def recording_loss(student, teacher, batch, **options):
        calls.append(options)
        return distillation_loss(student, teacher, batch, **options)
    import caopd.training.trainer as trainer_module
    monkeypatch.setattr(trainer_module, "distillation_loss", recording_loss)
    shared_loss = trainer_module.shared_distillation_loss
    monkeypatch.setattr(trainer_module, "shared_distillation_loss", lambda *args, **options: (
        calls.append({k: v for k, v in options.items() if k not in ("path", "teacher_path")}),
        shared_loss(*args, **options))[1])
    run(config_for(data, "science", tmp_path / "run", max_steps=1, divergence="jsd", beta=0.3, temperature=0.7,
                   skip_loss_tokens=2, confidence_divergence="forward", teacher_top_k=20), examples)
    expected = dict(divergence="jsd", beta=0.3, temperature=0.7, skip_tokens=2, impl="torch",
                    confidence_divergence="forward", top_k=20)
    assert calls and all({k: v for k, v in c.items() if k != "layout"} == expected for c in calls)


def test_the_engine_gets_the_configured_sampling(science_rows_path, tmp_path):
    data, examples = subset(science_rows_path, "science", tmp_path)
    config = config_for(data, "science", tmp_path / "run", max_steps=2, sampling_temperature=0.6, top_p=0.9,
                        max_completion_length=33)
    engine = RecordingEngine(examples, "science", tmp_path / "run")
    train(config, engine=engine, quiet=True)
    assert [(p, n) for p, n, _ in engine.sampling] == [(3, K), (3, K)]
    assert [(s.temperature, s.top_p, s.max_tokens) for _, _, s in engine.sampling] == [(0.6, 0.9, 33)] * 2
    assert engine.sampling[0][2].seed != engine.sampling[1][2].seed  # a new sample stream each step


def test_warmup_cosine_values():
    factor = warmup_cosine(2, 10)
    assert [factor(s) for s in (0, 1)] == pytest.approx([1 / 3, 2 / 3])
    assert [factor(s) for s in (2, 6, 10, 12)] == pytest.approx([1.0, 0.5, 0.0, 0.0], abs=1e-12)
    assert warmup_cosine(0, 4)(0) == 1.0 and warmup_cosine(0, 4)(2) == pytest.approx(0.5)


def test_logged_lr_follows_the_schedule(science_rows_path, tmp_path):
    data, examples = subset(science_rows_path, "science", tmp_path)
    result, _ = run(config_for(data, "science", tmp_path / "run", max_steps=4, warmup_ratio=0.5), examples)
    factor = warmup_cosine(2, 4)  # round(0.5 * 4) warm-up steps; the lr logged after step k is factor(k)
    assert [r["lr"] for r in result["history"]] == pytest.approx([1e-3 * factor(k) for k in range(1, 5)])


def test_train_rollouts_trains_on_that_many_completions_but_p_acc_uses_all(science_rows_path, tmp_path,
                                                                           seen_targets):
    data, examples = subset(science_rows_path, "science", tmp_path)
    result, _ = run(config_for(data, "science", tmp_path / "run", max_steps=1, train_rollouts=1), examples)
    assert len(seen_targets) == 3  # one completion for each of the 3 prompts, not K
    prompts = result["history"][0]["prompts"]
    assert [t.p_acc for t in seen_targets] == [correct_count(examples[i].id) / K for i in prompts]
    assert all(t.confidence_line == f"Confidence: {t.p_acc:.2f}" for t in seen_targets)


def test_correct_solution_context_shows_a_correct_rollout(science_rows_path, tmp_path, seen_targets):
    data, examples = subset(science_rows_path, "science", tmp_path)
    run(config_for(data, "science", tmp_path / "run", max_steps=1, teacher_context="correct_solution"), examples)
    for target in seen_targets:
        teacher = target.teacher_messages[-1]["content"]
        gold = TASKS["science"].render_answer(target.example.gold)
        if correct_count(target.example.id) == 0:
            assert target.used_fallback and "This is an example for a response" in teacher
        else:
            assert not target.used_fallback and "thinking" in teacher and gold in teacher
            assert "This is an example for a response" not in teacher


def test_weight_decay_is_decoupled_and_applied(science_rows_path, tmp_path):
    """AdamW: p1 = p0 - lr * wd * p0 - (the Adam step, the same with and without decay at step 1)."""
    data, examples = subset(science_rows_path, "science", tmp_path)
    kw = dict(max_steps=1, warmup_ratio=0.0, teacher_ema=0.0)
    plain, _ = run(config_for(data, "science", tmp_path / "plain", weight_decay=0.0, **kw), examples)
    decayed, _ = run(config_for(data, "science", tmp_path / "decay", weight_decay=0.5, **kw), examples)
    start = plain["teacher"].state_dict()  # a frozen teacher is the student's starting point
    for name, p1 in decayed["student"].state_dict().items():
        expected = plain["student"].state_dict()[name] - 1e-3 * 0.5 * start[name]
        assert torch.allclose(p1, expected, atol=1e-6), name


def test_gradient_checkpointing_is_on_and_changes_nothing(science_rows_path, tmp_path):
    data, examples = subset(science_rows_path, "science", tmp_path)
    # padded both times (with shared prefixes the two would take different layouts, each tested exact in
    # test_shared_prefix.py; after Adam's first step, rounding-level gradient differences become lr-sized)
    plain, _ = run(config_for(data, "science", tmp_path / "plain", max_steps=1, shared_prefix=False), examples)
    checkpointed, _ = run(config_for(data, "science", tmp_path / "ckpt", max_steps=1, gradient_checkpointing=True,
                                     shared_prefix=False), examples)
    assert checkpointed["student"].is_gradient_checkpointing and not plain["student"].is_gradient_checkpointing
    assert checkpointed["history"][0]["loss"] == pytest.approx(plain["history"][0]["loss"], rel=1e-6)
    for name, value in plain["student"].state_dict().items():
        assert torch.allclose(value, checkpointed["student"].state_dict()[name], atol=1e-6), name


def test_logged_loss_is_the_distillation_loss_of_the_step(science_rows_path, tmp_path, monkeypatch):
    """Step 1's logged loss, recomputed from the step's targets with the initial weights (the
    teacher starts as a copy of the student) in one micro-batch."""
    data, examples = subset(science_rows_path, "science", tmp_path)
    import caopd.training.trainer as trainer_module
    seen = []

    def recording_make_batch(tokenizer, targets, *args, **kwargs):
        seen.append((targets, args, kwargs))
        return make_batch(tokenizer, targets, *args, **kwargs)
    monkeypatch.setattr(trainer_module, "make_batch", recording_make_batch)
    config = config_for(data, "science", tmp_path / "run", max_steps=1, micro_batch_prompts=3, shared_prefix=False)
    result, _ = run(config, examples)
    tokenizer = load_tokenizer("tiny-qwen3", str(tmp_path / "run" / "tokenizer"))
    start = load_model("tiny-qwen3", tokenizer, seed=config.seed)
    ((targets, args, kwargs),) = seen
    batch = make_batch(tokenizer, targets, *args, **kwargs)
    expected = distillation_loss(start, start, batch, skip_tokens=config.skip_loss_tokens, impl="torch")
    assert result["history"][0]["loss"] == pytest.approx(float(expected.loss.detach()), rel=1e-6)


class GradientWatchingEngine(KnownVerdictEngine):
    """Records, at each generation, whether the student still holds gradients (issue 13, item 3:
    they must be freed right after the optimizer step, before the engine takes the memory)."""

    def __init__(self, *args, student_ref):
        super().__init__(*args)
        self.student_ref, self.grads_held = student_ref, []

    def generate(self, prompts, n, sampling):
        model = self.student_ref[0]
        self.grads_held.append(any(p.grad is not None for p in model.parameters()) if model is not None else None)
        return super().generate(prompts, n, sampling)


def test_gradients_are_freed_before_each_generation(science_rows_path, tmp_path, monkeypatch):
    data, examples = subset(science_rows_path, "science", tmp_path)
    import caopd.training.placement as placement
    student_ref = [None]

    def keep(*args, **kwargs):
        student_ref[0] = load_model(*args, **kwargs)
        return student_ref[0]
    monkeypatch.setattr(placement, "load_model", keep)
    engine = GradientWatchingEngine(examples, "science", tmp_path / "run", student_ref=student_ref)
    train(config_for(data, "science", tmp_path / "run", max_steps=3), engine=engine, quiet=True)
    assert engine.grads_held == [False, False, False]


def test_gradient_checkpointing_works_for_a_from_pretrained_model(science_rows_path, tmp_path, monkeypatch):
    """from_pretrained returns eval mode, where checkpointing silently does nothing (issue 13, item 2):
    with it on, each student decoder layer runs twice a micro-batch (forward, then recompute)."""
    data, examples = subset(science_rows_path, "science", tmp_path)
    saved = tmp_path / "saved"
    tokenizer = load_tokenizer("tiny-qwen3", "fast")
    load_model("tiny-qwen3", tokenizer, seed=0).save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    import caopd.training.placement as placement
    calls, first_layer = [], []

    def counted(*args, **kwargs):
        model = load_model(*args, **kwargs)
        first_layer[:] = [model.model.layers[0]]
        return model
    monkeypatch.setattr(placement, "load_model", counted)
    layer_class = type(load_model("tiny-qwen3", tokenizer).model.layers[0])
    forward = layer_class.forward

    def counting_forward(self, *args, **kwargs):  # (a forward hook does not see checkpointing's recompute)
        calls.append(self is first_layer[0])
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(layer_class, "forward", counting_forward)
    for checkpointing in (False, True):
        calls.clear()
        config = config_for(data, "science", tmp_path / f"run-{checkpointing}", model=str(saved),
                            tokenizer=str(saved), max_steps=1, micro_batch_prompts=3, shared_prefix=False,
                            gradient_checkpointing=checkpointing)  # padded: one forward of each layer
        result, _ = run(config, examples)
        assert result["student"].training
        assert calls.count(True) == (2 if checkpointing else 1), checkpointing  # the teacher's copy: False


def test_async_rollouts_with_a_colocated_vllm_on_a_gpu_is_refused(tmp_path):
    from caopd.training.trainer import check_engine_options

    config = config_for("x.jsonl", "science", tmp_path, rollout_engine="vllm", async_rollouts=True)
    with pytest.raises(InputError, match="--async-rollouts with a colocated vLLM engine on a GPU"):
        check_engine_options(config, on_gpu=True)
    check_engine_options(config, on_gpu=False)  # on CPU the engine never sleeps
    check_engine_options(config_for("x.jsonl", "science", tmp_path, rollout_engine="vllm", async_rollouts=True,
                                    vllm_placement="separate", vllm_device=1), on_gpu=True)


def test_the_gradient_norm_is_summed_in_fp64():
    """Issue 27 item 4: two processes reported the norm of the same gradients 2e-5..5e-4 apart (fp32 sums over
    a 151,936-row embedding gradient, split differently); fp64 gives the same norm however it is split."""
    from caopd.training.optim import clip_grad_norm_fp64

    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(151_936, 64))
    weight.grad = torch.rand(151_936, 64, generator=g) * 1e-3 + 1e-4
    exact = float(weight.grad.double().norm())
    halves = [torch.nn.Parameter(torch.zeros(75_968, 64)) for _ in range(2)]
    for half, part in zip(halves, weight.grad.chunk(2)):
        half.grad = part.clone()
    whole_norm = clip_grad_norm_fp64([weight], float("inf"))
    sharded = clip_grad_norm_fp64([halves[0]], float("inf"), all_reduce=lambda own: own + float(halves[1].grad.double()
                                                                                                   .norm()) ** 2)
    assert whole_norm == pytest.approx(exact, rel=1e-12) and sharded == pytest.approx(exact, rel=1e-12)
    assert clip_grad_norm_fp64([weight], 0.5 * exact) == pytest.approx(exact, rel=1e-12)  # returns the norm before
    assert float(weight.grad.double().norm()) == pytest.approx(0.5 * exact, rel=1e-5)  # and clips to max_norm
