"""tiny-qwen3 with both tokenizers, the TransformersEngine, and the train command."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from caopd_kernels.reference import kl_per_token

from caopd.cli import main
from caopd.engines.base import SamplingParams
from caopd.engines.decode import gumbel_noise, nucleus_filter
from caopd.engines.hf import TransformersEngine
from caopd.errors import InputError
from caopd.inputs.data import load_examples
from caopd.inputs.prompts import student_messages
from caopd.modeling.models import load_model, load_tokenizer
from caopd.scoring.calibration import RolloutGroup, build_targets
from caopd.training.loss import chat_ids, distillation_loss, make_batch


@pytest.fixture(scope="module")
def tiny():
    tokenizer = load_tokenizer("tiny-qwen3", "fast")
    return tokenizer, load_model("tiny-qwen3", tokenizer, seed=0)


def test_transformers_engine_batches_seeds_and_updates_weights(tiny):
    tokenizer, model = tiny
    engine = TransformersEngine(model, tokenizer)
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in ["What is 2+2?", "Name a colour."]]
    sampling = SamplingParams(temperature=1.0, max_tokens=12, seed=7)
    first = engine.generate(prompts, 3, sampling)
    assert [len(c) for c in first] == [3, 3]
    assert engine.generate(prompts, 3, sampling) == first  # the same seed and weights: the same samples
    assert len({t for c in first for t in c}) > 1  # sampling, not one repeated string
    assert engine.generate(prompts, 3, SamplingParams(temperature=1.0, max_tokens=12, seed=8)) != first
    greedy = engine.generate(prompts, 2, SamplingParams(temperature=0.0, max_tokens=5))
    expected = []
    for prompt in prompts:  # argmax decoding by hand, no KV cache, no generate()
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(5):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        expected.append(tokenizer.decode(ids[len(prompt):], skip_special_tokens=True))
    assert greedy == [[text, text] for text in expected]
    # top_p keeps the smallest set of tokens whose probability reaches it: near 0, only the argmax
    nucleus = engine.generate(prompts, 2, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=5, seed=1))
    assert nucleus == greedy


def test_a_prompts_samples_do_not_depend_on_the_other_prompts_of_the_call(tiny):
    """World-size invariance (issue 15): a step's prompts split across two calls (two processes,
    each with its first_prompt) sample exactly what one call of all of them samples."""
    tokenizer, model = tiny
    engine = TransformersEngine(model, tokenizer)
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": q}])
               for q in ["What is 2+2?", "Name a colour.", "A long question about many things, please?", "Hi"]]
    sampling = SamplingParams(temperature=1.0, max_tokens=10, seed=11)
    whole = engine.generate(prompts, 3, sampling)
    halves = engine.generate(prompts[:2], 3, sampling) + \
        engine.generate(prompts[2:], 3, dataclasses.replace(sampling, first_prompt=2))
    assert halves == whole
    assert engine.generate(prompts[2:], 3, sampling) != whole[2:]  # the index, not the call, seeds a prompt
    assert whole[0] != whole[1]


def test_transformers_engine_generates_from_updated_weights(tiny):
    tokenizer, _ = tiny
    engine = TransformersEngine(load_model("tiny-qwen3", tokenizer, seed=0), tokenizer)
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": "What is 2+2?"}])]
    sampling = SamplingParams(temperature=1.0, max_tokens=16, seed=3)
    before = engine.generate(prompts, 4, sampling)
    other = load_model("tiny-qwen3", tokenizer, seed=1)
    engine.update_weights(other.state_dict())
    after = engine.generate(prompts, 4, sampling)
    assert after == TransformersEngine(other, tokenizer).generate(prompts, 4, sampling) and after != before


def test_real_qwen3_tokenizer_and_full_vocabulary_loss(science_rows_path):
    tokenizer = load_tokenizer("tiny-qwen3", "qwen3")
    assert len(tokenizer) == 151_669 and tokenizer.eos_token == "<|im_end|>"
    model = load_model("tiny-qwen3", tokenizer, seed=0, layers=1)
    assert model.get_output_embeddings().weight.shape[0] == 151_936
    example = load_examples(science_rows_path, "science")[0]
    prompt = chat_ids(tokenizer, student_messages(example), {"enable_thinking": False})
    text = tokenizer.decode(prompt)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3's template, thinking off
    group = RolloutGroup(example, ["<answer>\nA\n</answer>\nConfidence: 0.9", "<answer>B</answer>"], [True, False])
    targets = build_targets(group, "science", "demo", True, random.Random(0))
    batch = make_batch(tokenizer, targets, [prompt, prompt], 512, 24, {"enable_thinking": False})
    teacher = load_model("tiny-qwen3", tokenizer, seed=1, layers=1)
    result = distillation_loss(model, teacher, batch, impl="torch", skip_tokens=3)
    # the same loss from the full [tokens x 151,936] logits, computed plainly
    s_logits = model(input_ids=batch.student_ids, attention_mask=batch.student_attention).logits
    t_logits = teacher(input_ids=batch.teacher_ids, attention_mask=batch.teacher_attention).logits
    per_sequence = [kl_per_token(s_logits[b, s - 1:s - 1 + n].float(), t_logits[b, t - 1:t - 1 + n].float(),
                                 "reverse", 0.5)[3:].mean()
                    for b, (s, t, n) in enumerate(zip(batch.student_start, batch.teacher_start, batch.length))]
    assert torch.allclose(result.loss, torch.stack(per_sequence).mean(), rtol=1e-5)
    assert result.counted_tokens == sum(batch.length) - 2 * 3


def test_flash_attention_without_flash_attn_is_a_clear_error(tiny):
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    with pytest.raises(InputError, match="needs flash-attn"):
        load_model("tiny-qwen3", tiny[0], attn_implementation="flash_attention_2")


def test_train_command_runs_and_resumes(tmp_path, capsys):
    args = ["train", "--config", "tiny", "--output-dir", str(tmp_path), "--max-steps", "2", "--save-every", "1",
            "--num-generations", "2", "--prompts-per-step", "2", "--max-completion-length", "12"]
    assert main(args) == 0
    assert main(args + ["--max-steps", "3", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert main(args[:-2] + ["--max-completion-length", "8", "--max-steps", "1"]) == 2  # fresh, same dir: refused
    assert main(args[:-2] + ["--max-completion-length", "8", "--max-steps", "1", "--overwrite"]) == 0
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    assert main(["train", "--config", "tiny", "--output-dir", str(tmp_path / "opd"), "--max-steps", "1",
                 "--num-generations", "2", "--prompts-per-step", "2", "--max-completion-length", "12",
                 "--no-empirical-calibration"]) == 0
    assert "\nOPD: tiny-qwen3 on caopd:examples/arith_mc.jsonl (science), 1 steps" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--config", "nope"], "nope: no such config file"),
    (["--divergence", "kl"], "config field 'divergence'"),
    (["--num-generations"], "argument --num-generations: expected one argument"),
    (["--data", "/no/such.jsonl"], "/no/such.jsonl: no such file"),
])
def test_train_bad_input_is_one_line(args, message, capsys, tmp_path):
    assert main(["train", "--output-dir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_batched_sampling_gives_each_prompt_what_it_samples_alone(tiny):
    """One decode loop over prompts of different lengths (left-padded) samples for each prompt the
    completions it samples alone with the same seed and weights."""
    tokenizer, model = tiny
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": q}])
               for q in ["Hi", "A much longer question about colours, numbers and other things?", "What is 2+2?"]]
    sampling = SamplingParams(temperature=1.0, max_tokens=10, seed=5)
    together = TransformersEngine(model, tokenizer).generate(prompts, 4, sampling)
    alone = [TransformersEngine(model, tokenizer).generate([p], 4, dataclasses.replace(sampling, first_prompt=i))[0]
             for i, p in enumerate(prompts)]
    assert together == alone
    assert [c.token_ids for c in together[1]] == [c.token_ids for c in alone[1]]
    two_at_a_time = TransformersEngine(model, tokenizer, prompts_per_batch=2).generate(prompts, 4, sampling)
    assert two_at_a_time == together


def test_gumbel_max_draws_follow_the_softmax_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(20_000, 1)
    generator = torch.Generator().manual_seed(0)
    draws = (logits / 0.7 + gumbel_noise([generator], 20_000, 4, "cpu")).argmax(-1)
    frequencies = torch.bincount(draws, minlength=4) / 20_000
    assert torch.allclose(frequencies, (logits[0] / 0.7).softmax(-1), atol=0.01)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = nucleus_filter(probs.log(), 0.7).isfinite()  # 0.5 < 0.7 <= 0.8: the two most probable
    assert kept.tolist() == [[True, True, False, False]]
    assert nucleus_filter(probs.log(), 0.8).isfinite().sum() == 2
    assert nucleus_filter(probs.log(), 1e-9).isfinite().tolist() == [[True, False, False, False]]


def test_the_engines_first_tokens_follow_the_models_softmax(tiny):
    tokenizer, model = tiny
    prompt = chat_ids(tokenizer, [{"role": "user", "content": "What is 2+2?"}])
    sampling = SamplingParams(temperature=0.8, max_tokens=1)
    firsts = TransformersEngine(model, tokenizer).generate([prompt], 4000, sampling)
    with torch.no_grad():
        probs = (model(input_ids=torch.tensor([prompt])).logits[0, -1].float() / 0.8).softmax(-1)
    counts = torch.zeros_like(probs)
    for completion in firsts[0]:
        counts[completion.token_ids[0] if completion.token_ids else tokenizer.eos_token_id] += 1
    assert (counts / 4000 - probs).abs().max() < 0.03
