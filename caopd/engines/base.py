"""The rollout-engine interface the trainer talks to, and a scripted engine for tests.

An engine takes prompts as token ids and returns ``n`` completions per prompt, each a ``Completion``:
its text (special tokens removed), carrying the token ids that were sampled, so the loss trains on
the sequence the student produced rather than a re-tokenization of its text (a text does not
always tokenize back to the ids that were sampled). After each
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


class Completion(str):
    """A completion's text (a ``str`` everywhere text is expected) with ``token_ids``: the ids the
    engine sampled, up to and without the end-of-sequence token (None when unknown)."""

    token_ids: tuple[int, ...] | None

    def __new__(cls, text: str, token_ids=None):
        completion = super().__new__(cls, text)
        completion.token_ids = None if token_ids is None else tuple(int(t) for t in token_ids)
        return completion

    def __reduce__(self):  # copies and pickles keep the ids
        return Completion, (str(self), self.token_ids)


def sampled_ids(ids, stop_ids: set[int]) -> tuple[int, ...]:
    """The sampled ids up to (without) the first end-of-sequence or padding id."""
    out = []
    for token in ids:
        if int(token) in stop_ids:
            break
        out.append(int(token))
    return tuple(out)


class WeightStream:
    """The trainer's weights as whole tensors, one at a time; each pass over it is a fresh one (under
    FSDP every tensor is gathered when asked for: a collective every process runs). ``specs``
    declares (name, shape, dtype) of each tensor beforehand, for engines that must announce what they
    send; ``config`` is the model's transformers config."""

    def __init__(self, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                 open_pass: Callable[[], Iterable[tuple[str, torch.Tensor]]], config=None):
        self.specs, self.open_pass, self.config = specs, open_pass, config

    def __iter__(self):
        return iter(self.open_pass())


def snapshot(weights: Weights) -> dict[str, torch.Tensor]:
    """A copy of the weights, for an engine that loads them while the trainer goes on (async rollouts)."""
    return {name: tensor.detach().clone() for name, tensor in named_weights(weights)}


def staged(engine, weights: Weights) -> object:
    """What an asynchronous worker passes to ``engine.update_weights`` later: the engine's own ``stage``
    (optional in the protocol), else a copy."""
    stage = getattr(engine, "stage", None)
    return stage(weights) if stage is not None else snapshot(weights)


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
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[list[Completion]]:
        """``n`` completions (text, special tokens removed, with the sampled ids) for each prompt, in order."""

    def update_weights(self, weights: Weights) -> None:
        """Generate from these weights from now on."""

    # optional: stage(weights) -> what an asynchronous rollout worker later passes to update_weights,
    # taken on the trainer's thread (a copy, when absent; a folder the servers reload from)


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

    def stage(self, weights) -> None:
        return None  # the script ignores weights
