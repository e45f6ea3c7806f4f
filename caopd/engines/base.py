"""The rollout-engine interface the trainer talks to, and a scripted engine for tests.

An engine takes prompts as token ids and returns ``n`` completion texts per prompt; after each
optimizer step the trainer hands it the new weights, as a stream of ``(name, whole tensor)``
pairs that the engine consumes one at a time (under FSDP each is gathered from the shards when
the engine asks for it, so an engine that generates from the training weights themselves asks for
none). An asynchronous or a vLLM engine plugs in behind the same two calls, so the trainer never
changes for them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int = 0  # the same seed and weights give the same completions
    # this call's prompt i is prompt first_prompt + i of the step: each prompt's samples are seeded by
    # prompt_seed(seed, first_prompt + i, n), so they do not depend on which other prompts share the
    # call (a step split across processes samples what one process would)
    first_prompt: int = 0


Weights = torch.nn.Module | dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def named_weights(weights: Weights) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a module's state, a dict, or a stream of pairs (left lazy)."""
    if isinstance(weights, torch.nn.Module):
        return weights.state_dict().items()
    if isinstance(weights, dict):
        return weights.items()
    return weights


def prompt_seed(seed: int, prompt_index: int, n: int) -> int:
    """The seed of a prompt's n samples (vLLM seeds the i-th of n with seed + i: each prompt its own range)."""
    return (seed * 1_000_003 + prompt_index * n) % (2**31 - 1)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[list[str]]:
        """``n`` completions (text, special tokens removed) for each prompt, in prompt order."""

    def update_weights(self, weights: Weights) -> None:
        """Generate from these weights from now on."""


class ScriptedEngine:
    """Returns what ``script(prompt_index_in_call, prompt_ids, n)`` says: known completions for tests."""

    def __init__(self, script: Callable[[int, list[int], int], list[str]]):
        self.script = script
        self.weight_updates = 0

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[list[str]]:
        out = [self.script(i, ids, n) for i, ids in enumerate(prompts)]
        if any(len(c) != n for c in out):
            raise ValueError(f"the script must return {n} completions per prompt")
        return out

    def update_weights(self, weights) -> None:
        self.weight_updates += 1
