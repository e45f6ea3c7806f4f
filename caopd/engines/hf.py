"""TransformersEngine: rollouts with ``model.generate`` on the training model's current weights.

All K x prompts sequences are sampled in one left-padded batch with the KV cache; the seed is
set for the call only (the caller's RNG streams are left untouched).
"""
from __future__ import annotations

import torch

from caopd.engines.base import SamplingParams


class TransformersEngine:
    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def update_weights(self, weights) -> None:
        if isinstance(weights, dict):
            self.model.load_state_dict(weights)
        elif weights is not self.model:
            self.model.load_state_dict(weights.state_dict())

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[list[str]]:
        if not prompts:
            return []
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        rows = [p for p in prompts for _ in range(n)]
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=device)
        was_training = self.model.training
        self.model.eval()
        try:
            sample = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0) \
                if sampling.temperature > 0 else dict(do_sample=False)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(sampling.seed)
                output = self.model.generate(
                    input_ids=input_ids, attention_mask=attention, max_new_tokens=sampling.max_tokens,
                    pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id, use_cache=True, **sample)
        finally:
            self.model.train(was_training)
        texts = self.tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]
