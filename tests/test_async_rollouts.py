"""AsyncRollouts: order, staleness, errors, shutdown, and equality with the synchronous trainer."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from caopd.config import TrainConfig
from caopd.engines.async_rollouts import AsyncRollouts, RolloutRequest
from caopd.engines.base import SamplingParams
from caopd.training.trainer import train


class LaggyEngine:
    """Echoes the prompts after a random delay; records the weights version it held per call."""

    def __init__(self, seed=0, max_delay=0.01, fail_at_step=None):
        self.rng = random.Random(seed)
        self.max_delay, self.fail_at_step = max_delay, fail_at_step
        self.version = None

    def update_weights(self, weights):
        self.version = weights["version"]

    def generate(self, prompts, n, sampling):
        if sampling.seed == self.fail_at_step:
            raise ValueError(f"engine broke at step {sampling.seed}")
        time.sleep(self.rng.random() * self.max_delay)
        return [[f"{p[0]}:{k}" for k in range(n)] for p in prompts]


def request(step: int) -> RolloutRequest:
    return RolloutRequest([[step * 10 + j] for j in range(3)], 2, SamplingParams(seed=step))


def no_worker_left() -> bool:
    return not any(t.name == "caopd-rollouts" for t in threading.enumerate())


@pytest.mark.parametrize("max_staleness", [0, 1, 3])
def test_order_coverage_and_staleness_with_random_latencies(max_staleness):
    rng = random.Random(max_staleness)
    engine = LaggyEngine(seed=max_staleness)
    with AsyncRollouts(engine, request, 0, 25, max_staleness) as rollouts:
        seen = []
        for step in range(25):
            batch = rollouts.get(step, timeout=10)
            assert batch.step == step and 0 <= step - batch.policy_version <= max_staleness
            seen += [c for group in batch.completions for c in group]
            time.sleep(rng.random() * 0.01)  # training
            rollouts.publish({"version": step + 1}, step + 1)
    assert seen == [f"{s * 10 + j}:{k}" for s in range(25) for j in range(3) for k in range(2)]
    assert no_worker_left()


def test_negative_staleness_is_refused():
    with pytest.raises(ValueError, match="max_staleness"):
        AsyncRollouts(LaggyEngine(), request, 0, 1, max_staleness=-1)


def test_worker_error_surfaces_and_thread_ends():
    with AsyncRollouts(LaggyEngine(fail_at_step=2), request, 0, 5, max_staleness=2) as rollouts:
        rollouts.get(0, timeout=10)
        rollouts.get(1, timeout=10)
        with pytest.raises(ValueError, match="engine broke at step 2"):
            rollouts.get(2, timeout=10)
    assert no_worker_left()


class GatedEngine:
    """generate(step) announces itself, then waits until the test opens that step's gate: the test
    decides every interleaving, so what it checks never depends on timing."""

    def __init__(self):
        self.entered = {s: threading.Event() for s in range(10)}
        self.gate = {s: threading.Event() for s in range(10)}
        self.loaded = []

    def update_weights(self, weights):
        self.loaded.append(weights["version"])

    def generate(self, prompts, n, sampling):
        self.entered[sampling.seed].set()
        assert self.gate[sampling.seed].wait(10), "the test never opened this gate"
        return [[f"{p[0]}:{k}" for k in range(n)] for p in prompts]


def test_exact_policy_versions_when_the_test_orders_every_event():
    engine = GatedEngine()
    with AsyncRollouts(engine, request, 0, 4, max_staleness=1) as rollouts:
        assert engine.entered[0].wait(10)
        engine.gate[0].set()
        assert rollouts.get(0, timeout=10).policy_version == 0
        assert engine.entered[1].wait(10)  # step 1 may use version 0 (1 - staleness 1): it did not wait
        rollouts.publish({"version": 1}, 1)  # published while step 1 is being sampled
        engine.gate[1].set()
        assert rollouts.get(1, timeout=10).policy_version == 0
        assert engine.entered[2].wait(10)  # step 2 needs version >= 1: it loaded the published weights
        assert engine.loaded == [1]
        rollouts.publish({"version": 2}, 2)
        rollouts.publish({"version": 3}, 3)  # two publishes before the worker looks: it loads the newest only
        engine.gate[2].set()
        assert rollouts.get(2, timeout=10).policy_version == 1
        assert engine.entered[3].wait(10)
        engine.gate[3].set()
        assert rollouts.get(3, timeout=10).policy_version == 3 and engine.loaded == [1, 3]
    assert no_worker_left()


def test_close_while_the_worker_waits_for_a_newer_policy():
    engine = GatedEngine()
    for step in range(3):
        engine.gate[step].set()
    rollouts = AsyncRollouts(engine, request, 0, 100, max_staleness=2)
    assert engine.entered[2].wait(10)  # steps 0-2 use version 0; step 3 waits for version 1
    rollouts.close()
    assert no_worker_left() and not engine.entered[3].is_set()


def tiny_config(tmp_path, name, **kw):
    values = dict(model="tiny-qwen3", tokenizer="fast", output_dir=str(tmp_path / name), num_generations=2,
                  prompts_per_step=3, micro_batch_prompts=3, max_prompt_length=96, max_completion_length=10,
                  max_steps=3, learning_rate=1e-3, save_every=10, bf16=False, seed=5, loss_impl="torch")
    values.update(kw)
    return TrainConfig(**values)


def test_max_staleness_0_equals_the_synchronous_trainer_bit_for_bit(tmp_path):
    sync = train(tiny_config(tmp_path, "sync"), quiet=True)
    async0 = train(tiny_config(tmp_path, "async", async_rollouts=True, max_staleness=0), quiet=True)
    assert [r["prompts"] for r in sync["history"]] == [r["prompts"] for r in async0["history"]]
    assert [r["loss"] for r in sync["history"]] == [r["loss"] for r in async0["history"]]
    for name, value in sync["student"].state_dict().items():
        assert torch.equal(value, async0["student"].state_dict()[name]), name
    assert no_worker_left()


def test_async_trainer_covers_an_epoch_once_and_surfaces_engine_errors(tmp_path):
    result = train(tiny_config(tmp_path, "epoch", async_rollouts=True, max_staleness=2, max_steps=0, epochs=1,
                               data="caopd:examples/arith_mc.jsonl", prompts_per_step=40), quiet=True)
    seen = [i for r in result["history"] for i in r["prompts"]]
    assert sorted(seen) == list(range(120))
    assert all(r["step"] - 1 - r["policy_version"] <= 2 for r in result["history"])

    class Broken:
        def update_weights(self, weights):
            pass

        def generate(self, prompts, n, sampling):
            raise OSError("rollout server went away")
    with pytest.raises(OSError, match="rollout server went away"):
        train(tiny_config(tmp_path, "broken", async_rollouts=True), engine=Broken(), quiet=True)
    assert no_worker_left()
