"""One decode loop over many prompts, each prompt's samples drawn from its own seed.

Rows: prompt i's n samples, left-padded to the longest prompt, all decoded together with the
model's KV cache (one forward per new token for the whole batch, not per prompt). The sampling
noise of prompt i's rows comes from a ``torch.Generator`` seeded with ``seeds[i]`` alone, so a
prompt samples the same tokens whichever prompts share its batch (the same seed and weights):

    token = argmax_v( logits_v / T + g_v ),   g_v = -log(-log u_v),  u ~ U(0, 1) from the prompt's generator

(the Gumbel-max trick: the argmax is distributed as softmax(logits / T)). ``top_p`` first keeps
the smallest set of most probable tokens whose probability reaches it (logits of the others set
to -inf); temperature 0 is greedy. A row ends at its end-of-sequence token; the loop ends when
every row has ended (with ``synced``, when every process's rows have: each process keeps running
forwards until then, as FSDP needs every process in every forward).
"""
from __future__ import annotations

import torch


def nucleus_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with every token outside the top-p nucleus set to -inf (the argmax always kept)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # the probability of the more probable tokens
    drop_sorted = before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def gumbel_noise(generators: list[torch.Generator], n: int, vocab: int, device) -> torch.Tensor:
    """[len(generators) * n, vocab] Gumbel noise; rows i*n..(i+1)*n-1 from generators[i] alone."""
    u = torch.cat([torch.rand((n, vocab), generator=g, device=device) for g in generators])
    return -torch.log(-torch.log(u.clamp_(min=torch.finfo(u.dtype).tiny, max=1.0 - torch.finfo(u.dtype).eps)))


def _any_process_unfinished(unfinished: bool, device) -> bool:
    flag = torch.tensor([1.0 if unfinished else 0.0], device=device)
    torch.distributed.all_reduce(flag)
    return bool(flag.item() > 0)


@torch.no_grad()
def sample_batch(model: torch.nn.Module, prompts: list[list[int]], n: int, seeds: list[int], *, max_tokens: int,
                 temperature: float, top_p: float, eos_id: int, pad_id: int, synced: bool = False) -> torch.Tensor:
    """[len(prompts) * n, max_tokens] sampled ids (``pad_id`` after a row's end), prompt i's rows
    first; each prompt's draws from ``seeds[i]``."""
    device = next(model.parameters()).device
    rows = len(prompts) * n
    width = max(len(p) for p in prompts)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i * n:(i + 1) * n, width - len(prompt):] = torch.tensor(prompt)
        mask[i * n:(i + 1) * n, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    generators = []
    for seed in seeds:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        generators.append(generator)
    out = torch.full((rows, max_tokens), pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    step_input, cache = ids, None
    for t in range(max_tokens):
        if synced:
            if not _any_process_unfinished(not bool(finished.all()), device):
                break
        elif bool(finished.all()):
            break
        output = model(input_ids=step_input, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1)
        cache = output.past_key_values
        logits = output.logits[:, -1].float()
        if temperature > 0:
            logits = nucleus_filter(logits / temperature, top_p) + gumbel_noise(generators, n, logits.shape[-1],
                                                                                device)
        token = logits.argmax(dim=-1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        out[:, t] = token
        finished |= token == eos_id
        step_input = token[:, None]
        mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
    return out.cpu()
