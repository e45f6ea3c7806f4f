"""TransformersEngine: rollouts with ``model.generate`` on the training model's current weights.

Each prompt's K samples are one batch (equal rows: no padding) with the KV cache, from the
prompt's own seed (``prompt_seed``), set for the call only (the caller's RNG streams are left
untouched): a prompt's completions depend on its seed and the weights, not on the other prompts
of the call, so a step split across processes samples exactly what one process samples. The
price against one left-padded batch of all prompts: prompt-by-prompt decoding loops (2.4x the
time for 4 prompts x 8 samples of tiny-qwen3 on a 2-core CPU); vLLM batches all prompts and
seeds each request the same way.

Under FSDP the engine generates with the sharded student itself: ``run`` calls generation through
the FSDP root (which gathers the root's parameters; each decoder layer gathers its own), and
``synced`` keeps a process whose samples end early stepping the collectives until every process
is done (transformers' ``synced_gpus``). Every process calls ``generate`` equally often: each owns
as many prompts.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from caopd.engines.base import Completion, SamplingParams, Weights, named_weights, prompt_seed, sampled_ids, snapshot


class TransformersEngine:
    def __init__(self, model: torch.nn.Module, tokenizer, *, live: bool = False, run: Callable | None = None,
                 synced: bool = False):
        """model: the weights to generate from; live: it is the training model itself, so weight
        updates need nothing (a stream of tensors is not consumed: nothing is gathered); run(fn):
        calls fn(model) where generation must happen (the FSDP root)."""
        self.model = model
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
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            return [self._sample(prompt, n, sampling, prompt_seed(sampling.seed, sampling.first_prompt + i, n), device)
                    for i, prompt in enumerate(prompts)]
        finally:
            self.model.train(was_training)

    def _sample(self, prompt: list[int], n: int, sampling: SamplingParams, seed: int, device) -> list[Completion]:
        """n samples of one prompt (n equal rows, no padding), from its own seed."""
        input_ids = torch.tensor([prompt] * n, device=device)
        sample = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0) \
            if sampling.temperature > 0 else dict(do_sample=False)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            output = self.run(lambda model: model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=sampling.max_tokens,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id, use_cache=True,
                synced_gpus=self.synced, **sample))
        new_tokens = output[:, len(prompt):]
        stop = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [Completion(text, sampled_ids(ids.tolist(), stop)) for text, ids in zip(texts, new_tokens)]
