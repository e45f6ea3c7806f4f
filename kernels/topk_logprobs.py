"""topk_logprobs: a model's k most likely next tokens and their log-probabilities, from its final
hidden states and lm_head, without [N x V] logits: what a served teacher returns (vLLM's
prompt_logprobs), computed locally. Chunks of tokens: [C, V] logits / T (one buffer, reused),
log-softmax in place, top-k. Forward only (a teacher's)."""
from __future__ import annotations

import torch

from .fused_linear_kl import one_buffer_chunk_tokens
from .reference import accumulation_dtype
from .torch_chunked import _logits, log_softmax_, logits_buffer


@torch.no_grad()
def topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, k: int, *, bias: torch.Tensor | None = None,
                  temperature: float = 1.0, chunk_tokens: int | None = None, memory_budget: int | None = None,
                  ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, k] int64, log-probabilities [N, k] fp32, largest first) of softmax(W h / T) per row of
    hidden [N, H] (weight [V, H]). ``ids`` [N, k] given: the log-probabilities of those tokens instead (a
    teacher scored on the student's top k, as TRL's topk_logits does). chunk_tokens / memory_budget: as
    in fused_linear_kl (one [C, V] fp32 buffer)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] must share H, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    vocab, width = weight.shape
    if ids is not None and (ids.dim() != 2 or ids.shape[0] != hidden.shape[0] or ids.shape[1] != k):
        raise ValueError(f"ids must be [N, k] = [{hidden.shape[0]}, {k}], got {tuple(ids.shape)}")
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, V] = [1, {vocab}], got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    acc = accumulation_dtype(hidden.dtype)
    n = hidden.shape[0]
    if chunk_tokens is None:
        chunk_tokens = one_buffer_chunk_tokens(vocab, width, memory_budget)
    given = ids is not None
    ids = ids.long() if given else torch.empty(n, k, dtype=torch.int64, device=hidden.device)
    logprobs = torch.empty(n, k, dtype=acc, device=hidden.device)
    buffer = logits_buffer(hidden, weight, chunk_tokens, acc)
    for start in range(0, n, chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, n))
        out = None if buffer is None else buffer[:rows.stop - rows.start]
        logp = log_softmax_(_logits(hidden[rows], weight, bias, temperature, acc, out))
        if given:
            logprobs[rows] = logp.gather(1, ids[rows])
        else:
            torch.topk(logp, k, dim=-1, out=(logprobs[rows], ids[rows]))
    return ids, logprobs
