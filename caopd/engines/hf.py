"""TransformersEngine: rollouts from the training model's current weights, decoded with its KV cache.

A call's prompts are decoded together (``decode.sample_batch``: up to ``prompts_per_batch`` of
them a loop, their K samples each, left-padded, with the KV cache), and each prompt's sampling
noise comes from a generator of its own seed (``prompt_seed``; the caller's RNG streams are left
untouched): a prompt's completions depend on its seed and the weights, not on the other prompts
of the call, so a step split across processes samples exactly what one process samples, as vLLM
seeds each request.

Under FSDP the engine generates with the sharded student itself: ``run`` calls generation through
the FSDP root (which gathers the root's parameters; each decoder layer gathers its own), and
``synced`` keeps a process whose samples end early stepping the collectives until every process
is done (as transformers' ``synced_gpus``). Every process calls ``generate`` equally often: each owns
as many prompts.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from caopd.engines.base import Completion, SamplingParams, Weights, named_weights, prompt_seed, sampled_ids, snapshot
from caopd.engines.decode import sample_batch


class TransformersEngine:
    def __init__(self, model: torch.nn.Module, tokenizer, *, live: bool = False, run: Callable | None = None,
                 synced: bool = False, prompts_per_batch: int | None = None):
        """model: the weights to generate from; live: it is the training model itself, so weight
        updates need nothing (a stream of tensors is not consumed: nothing is gathered); run(fn):
        calls fn(model) where generation must happen (the FSDP root); prompts_per_batch: prompts
        decoded together (their KV cache is what generation holds), all of a call's when None."""
        self.model = model
        self.prompts_per_batch = prompts_per_batch
        self.tokenizer = tokenizer
        self.live = live
        self.run = run or (lambda fn: fn(self.model))
        self.synced = synced

    def stage(self, weights: Weights) -> dict[str, torch.Tensor]:
        return snapshot(weights)

    def update_weights(self, weights: Weights) -> None:
        if self.live or weights is self.model:
            return
        targets = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in named_weights(weights):
                targets[name].copy_(tensor)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[list[Completion]]:
        was_training = self.model.training
        self.model.eval()
        batch = self.prompts_per_batch or max(1, len(prompts))
        try:
            out = []
            for start in range(0, len(prompts), batch):
                chunk = prompts[start:start + batch]
                seeds = [prompt_seed(sampling.seed, sampling.first_prompt + start + i, n) for i in range(len(chunk))]
                ids = self.run(lambda model, chunk=chunk, seeds=seeds: sample_batch(
                    model, chunk, n, seeds, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                    top_p=sampling.top_p, eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
                    synced=self.synced))
                out += [self._completions(ids[i * n:(i + 1) * n]) for i in range(len(chunk))]
            return out
        finally:
            self.model.train(was_training)

    def _completions(self, new_tokens: torch.Tensor) -> list[Completion]:
        stop = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [Completion(text, sampled_ids(ids.tolist(), stop)) for text, ids in zip(texts, new_tokens)]
