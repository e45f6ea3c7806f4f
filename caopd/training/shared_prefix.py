"""Stage 5, sharing prefixes: each prompt's prefix forwarded once for all its completions.

A group is one prompt's trained completions with one teacher context. Its row holds the prefix
once, then every completion:  [prefix | completion 1 | completion 2 | ...]. Position ids restart
at len(prefix) for each completion, and a 4-D attention mask lets each completion see the prefix
and itself (causally), never another completion. The hidden states are then exactly those of
the padded path (one row per completion) — the same model layers, the same attention kernel
(SDPA with a mask) — while the prefix is encoded once instead of K times on each side. The
prefix's gradient is the sum over its completions, as autograd gives it. Completion token k is
predicted from the position before it: the prefix's last token for k = 0 (shared by the group),
else the completion's own previous token.

Rows of a micro-batch are right-padded; a pad position attends only to itself (a fully masked
row would give NaN) and nothing attends to it.

Two ways to run a group, the same hidden states (up to float rounding): ``mask`` (one row with the
4-D mask above; SDPA then computes every (query, key) pair of the row, masked ones included) and
``cache`` (the prefix forwarded once with ``use_cache``, its keys and values repeated for the K
completions, which then run as a batch on top: attention costs K L (P + L), the least there is).
The student takes ``cache`` unless gradient checkpointing is on (transformers turns the cache off
then); the teacher, without gradients, always does. ``choose_layout`` picks among these and the
unshared layouts of caopd.training.loss (padded, packed) from the attention implementation and the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from caopd.scoring.calibration import DistillationTarget
from caopd.training.loss import LossOutput, chat_ids, completion_ids, fused_loss, token_weights

# Decoders whose layers take position ids, a 2-D mask over cached + new keys and a DynamicCache
# (batch_repeat_interleave): the shared-prefix forwards are tested on qwen3; the others have the same
# decoder structure in transformers.
SHARED_PREFIX_ARCHITECTURES = ("qwen3", "qwen2", "llama", "mistral")


def choose_layout(shared_prefix: bool, attn_implementation: str, model_type: str,
                  gradient_checkpointing: bool, fsdp: bool = False) -> tuple[str, str | None]:
    """The forward layout — "shared-cache", "shared-mask", "packed" or "padded" — and a line saying
    why, where --shared-prefix asked for sharing and it cannot be done. Under FSDP every process must
    run each sharded layer equally often: one forward a side (the cache path runs one per group)."""
    unshared = "packed" if attn_implementation == "flash_attention_2" else "padded"  # varlen: no padding
    if not shared_prefix:
        return unshared, None
    if model_type not in SHARED_PREFIX_ARCHITECTURES:
        return unshared, (f"--shared-prefix: not supported for model type {model_type!r} (supported: "
                          f"{', '.join(SHARED_PREFIX_ARCHITECTURES)}); using the {unshared} forwards")
    if not (gradient_checkpointing or fsdp):
        return "shared-cache", None
    if attn_implementation == "sdpa":
        return "shared-mask", None
    needs = "gradient checkpointing" if gradient_checkpointing else "--fsdp"
    return unshared, (f"--shared-prefix with {needs} needs attn_implementation sdpa (a 4-D attention mask; "
                      f"{'checkpointing turns the KV cache off' if gradient_checkpointing else 'one forward a side'}"
                      f"), not {attn_implementation}; using the {unshared} forwards")


@dataclass
class SharedSide:
    """One side (student or teacher) of a shared-prefix micro-batch, G rows of T tokens."""

    ids: torch.Tensor  # [G, T]
    positions: torch.Tensor  # [G, T]
    mask: torch.Tensor  # [G, 1, T, T] bool: True where a query (row) may attend to a key (column)
    rows: torch.Tensor  # [n]: flat index into [G * T] of the hidden state predicting each completion token


@dataclass
class PrefixGroup:
    """One group for the cache path: its prefix and its K completions (right-padded)."""

    prefix: torch.Tensor  # [1, P]
    completions: torch.Tensor  # [K, L]
    lengths: list[int]


@dataclass
class SharedPrefixBatch:
    """Each group's student and teacher prefix and its completions' tokens; the inputs of either
    path are built on first use (the mask path's [G, 1, T, T] masks only when it runs)."""

    student_prefixes: list[list[int]]
    teacher_prefixes: list[list[int]]
    completions: list[list[list[int]]]  # per group, its completions' tokens
    pad: int

    @property
    def length(self) -> list[int]:  # tokens of each completion, in target order (token_weights reads it)
        return [len(c) for group in self.completions for c in group]

    @property
    def groups(self) -> int:
        return len(self.completions)

    @cached_property
    def student(self) -> SharedSide:
        return _side(self.student_prefixes, self.completions, self.pad)

    @cached_property
    def teacher(self) -> SharedSide:
        return _side(self.teacher_prefixes, self.completions, self.pad)

    @cached_property
    def student_groups(self) -> list[PrefixGroup]:
        return _cache_groups(self.student_prefixes, self.completions, self.pad)

    @cached_property
    def teacher_groups(self) -> list[PrefixGroup]:
        return _cache_groups(self.teacher_prefixes, self.completions, self.pad)

    @property
    def completion_tokens(self) -> int:
        return sum(self.length)


def completion_mask(prefix: int, lengths: list[int]) -> torch.Tensor:
    """[T, T] bool for one row: the prefix causal, each completion the prefix plus itself causally."""
    total = prefix + sum(lengths)
    segment = torch.zeros(total, dtype=torch.long)  # 0 = prefix, k = completion k (1-based)
    start = prefix
    for k, n in enumerate(lengths, start=1):
        segment[start:start + n] = k
        start += n
    causal = torch.ones(total, total, dtype=torch.bool).tril_()
    key_is_prefix = (segment == 0).unsqueeze(0)  # [1, T]
    same_segment = segment.unsqueeze(1) == segment.unsqueeze(0)  # [T, T]
    return causal & (key_is_prefix | same_segment)


def _side(prefixes: list[list[int]], completions: list[list[list[int]]], pad: int) -> SharedSide:
    rows_tokens, positions, masks, predicting = [], [], [], []
    width = max(len(p) + sum(len(c) for c in cs) for p, cs in zip(prefixes, completions))
    for g, (prefix, group) in enumerate(zip(prefixes, completions)):
        tokens, pos = list(prefix), list(range(len(prefix)))
        start = len(prefix)
        for completion in group:
            tokens += completion
            pos += range(len(prefix), len(prefix) + len(completion))
            # token j of this completion is predicted at the prefix's last position (j = 0) or at j - 1
            predicting += [g * width + (len(prefix) - 1 if j == 0 else start + j - 1) for j in range(len(completion))]
            start += len(completion)
        mask = torch.eye(width, dtype=torch.bool)  # pads attend to themselves only
        mask[:len(tokens), :len(tokens)] = completion_mask(len(prefix), [len(c) for c in group])
        rows_tokens.append(tokens + [pad] * (width - len(tokens)))
        positions.append(pos + [0] * (width - len(pos)))
        masks.append(mask)
    return SharedSide(torch.tensor(rows_tokens), torch.tensor(positions), torch.stack(masks).unsqueeze(1),
                      torch.tensor(predicting))


def make_shared_batch(tokenizer, targets: list[DistillationTarget], student_prompt_ids: list[list[int]],
                      max_prompt_tokens: int, max_completion_tokens: int,
                      chat_template_kwargs: dict | None = None) -> SharedPrefixBatch:
    """Group consecutive targets with the same student prompt and teacher context (a fallback
    context in correct_solution mode is a group of its own); the same tokens as make_batch."""
    groups: list[tuple[list[int], list[dict], list[list[int]]]] = []
    for target, prompt in zip(targets, student_prompt_ids, strict=True):
        completion = completion_ids(tokenizer, target, max_completion_tokens)
        if groups and groups[-1][0] is prompt and groups[-1][1] is target.teacher_messages:
            groups[-1][2].append(completion)
        else:
            groups.append((prompt, target.teacher_messages, [completion]))
    teacher_prefixes = {}
    for _, messages, _ in groups:
        if id(messages) not in teacher_prefixes:
            teacher_prefixes[id(messages)] = chat_ids(tokenizer, messages, chat_template_kwargs)[-max_prompt_tokens:]
    return SharedPrefixBatch([p[-max_prompt_tokens:] for p, _, _ in groups],
                             [teacher_prefixes[id(m)] for _, m, _ in groups], [cs for _, _, cs in groups],
                             tokenizer.pad_token_id)


def _cache_groups(prefixes: list[list[int]], completions: list[list[list[int]]], pad: int) -> list[PrefixGroup]:
    out = []
    for prefix, group in zip(prefixes, completions):
        width = max(len(c) for c in group)
        padded = torch.tensor([c + [pad] * (width - len(c)) for c in group])
        out.append(PrefixGroup(torch.tensor([prefix]), padded, [len(c) for c in group]))
    return out


def _hidden_rows_cached(model: torch.nn.Module, groups: list[PrefixGroup], device: torch.device) -> torch.Tensor:
    """The rows predicting each completion token, by the prefix cache (see the module docstring)."""
    decoder = getattr(model, model.base_model_prefix)
    rows = []
    for group in groups:
        prefix, completions = group.prefix.to(device), group.completions.to(device)
        k, width, p = completions.shape[0], completions.shape[1], prefix.shape[1]
        first = decoder(input_ids=prefix, use_cache=True)
        cache = first.past_key_values
        cache.batch_repeat_interleave(k)  # [1, ...] -> [K, ...] keys and values of the prefix
        attention = torch.zeros(k, p + width, dtype=torch.long, device=device)
        attention[:, :p] = 1
        for i, n in enumerate(group.lengths):
            attention[i, p:p + n] = 1
        positions = torch.arange(p, p + width, device=device).expand(k, width)
        hidden = decoder(input_ids=completions, past_key_values=cache, attention_mask=attention,
                         position_ids=positions, use_cache=True).last_hidden_state  # [K, L, H]
        last_prefix = first.last_hidden_state[0, -1:]  # predicts every completion's first token
        for i, n in enumerate(group.lengths):
            rows += [last_prefix, hidden[i, :n - 1]]
    return torch.cat(rows)


def _hidden_rows(model: torch.nn.Module, side: SharedSide, device: torch.device) -> torch.Tensor:
    decoder = getattr(model, model.base_model_prefix)
    hidden = decoder(input_ids=side.ids.to(device), attention_mask=side.mask.to(device),
                     position_ids=side.positions.to(device), use_cache=False).last_hidden_state  # [G, T, H]
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, side.rows.to(device))  # [n, H]


def shared_distillation_loss(student: torch.nn.Module, teacher: torch.nn.Module, batch: SharedPrefixBatch, *,
                             divergence: str = "reverse", beta: float = 0.5, temperature: float = 1.0,
                             skip_tokens: int = 3, impl: str = "auto", path: str = "auto") -> LossOutput:
    """The same loss as loss.distillation_loss (per sequence, then over sequences), from the
    shared-prefix forwards. path: "cache", "mask", or "auto" (cache unless the student
    checkpoints its activations)."""
    if path not in ("auto", "cache", "mask"):
        raise ValueError(f"path must be auto, cache or mask, got {path!r}")
    device = next(student.parameters()).device
    if path == "cache" or (path == "auto" and not getattr(student, "is_gradient_checkpointing", False)):
        student_rows = _hidden_rows_cached(student, batch.student_groups, device)
    else:
        student_rows = _hidden_rows(student, batch.student, device)
    with torch.no_grad():
        teacher_rows = _hidden_rows(teacher, batch.teacher, device) if path == "mask" else \
            _hidden_rows_cached(teacher, batch.teacher_groups, device)
    weights = token_weights(batch, skip_tokens).to(device)
    return fused_loss(student, teacher, student_rows, teacher_rows, weights, divergence=divergence, beta=beta,
                      temperature=temperature, impl=impl)
