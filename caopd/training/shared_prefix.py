"""Stage 5, sharing prefixes: each prompt's prefix forwarded once for all its completions.

A group is one prompt's trained completions with one teacher context. Its row holds the prefix
once, then every completion:  [prefix | completion 1 | completion 2 | ...]. Position ids restart
at len(prefix) for each completion, and each completion attends to the prefix and to itself
(causally), never to another completion. The hidden states are then exactly those of the padded
path (one row per completion), while the prefix is encoded once instead of K times on each side.
The prefix's gradient is the sum over its completions, as autograd gives it. Completion token k is
predicted from the position before it: the prefix's last token for k = 0 (shared by the group),
else the completion's own previous token.

Three ways to run a group, the same hidden states (up to float rounding):

- ``cache``: the prefix forwarded once with ``use_cache``, its keys and values repeated for the K
  completions, which then run as a batch on top (attention K L (P + L)); several forwards a group,
  so not under FSDP, and no KV cache under gradient checkpointing.
- ``segments``: one forward of all rows, the attention computed by segments
  (caopd.training.segment_attention: PyTorch SDPA, flash-attn varlen or flex_attention): only the
  pairs that are needed, no [T, T] mask; one forward a side, so it runs with gradient checkpointing
  and under FSDP.
- ``mask``: one forward with a dense 4-D [G, 1, T, T] mask under SDPA, which then computes every
  (query, key) pair of the row; kept as a reference, chosen by nothing.

``choose_layout`` picks the student's and the teacher's ways, or the unshared layouts of
caopd.training.loss (padded, packed), and ``sharing_pays`` says when sharing saves nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from caopd.scoring.calibration import DistillationTarget
from caopd.training.loss import (
    DistillationBatch,
    LossOutput,
    chat_ids,
    completion_ids,
    confidence_span,
    fused_loss,
    pad_rows,
    span_mask,
    submit_to_teacher,
    token_weights,
)
from caopd.training.segment_attention import RowSegments, SharedLayout

# Decoders whose layers take position ids, a 2-D mask over cached + new keys and a DynamicCache
# (batch_repeat_interleave): the shared-prefix forwards are tested on qwen3; the others have the same
# decoder structure in transformers.
SHARED_PREFIX_ARCHITECTURES = ("qwen3", "qwen2", "llama", "mistral")


@dataclass(frozen=True)
class Layout:
    """How a micro-batch is forwarded: ``student`` and ``teacher`` are cache, segments or mask
    (shared), or padded or packed (unshared, then the same for both)."""

    student: str
    teacher: str

    @property
    def shared(self) -> bool:
        return self.student in ("cache", "segments", "mask")

    def __str__(self) -> str:
        if not self.shared:
            return self.student
        return f"shared-{self.student}" + (f" (teacher: {self.teacher})" if self.teacher != self.student else "")


def choose_layout(shared_prefix: bool, attn_implementation: str, model_type: str,
                  gradient_checkpointing: bool, fsdp: bool = False) -> tuple[Layout, str | None]:
    """The forward layout, and a line saying why where --shared-prefix asked for sharing and it
    cannot be done. The prefix cache where it can run (no checkpointing, no FSDP); else segments (one
    forward a side: under FSDP every process must run each sharded layer equally often). The
    teacher, without gradients, takes the cache unless under FSDP."""
    unshared = "packed" if attn_implementation == "flash_attention_2" else "padded"  # varlen: no pads
    if not shared_prefix:
        return Layout(unshared, unshared), None
    if model_type not in SHARED_PREFIX_ARCHITECTURES:
        return Layout(unshared, unshared), (f"--shared-prefix: not supported for model type {model_type!r} "
                                            f"(supported: {', '.join(SHARED_PREFIX_ARCHITECTURES)}); using the "
                                            f"{unshared} forwards")
    teacher = "segments" if fsdp else "cache"
    if not (gradient_checkpointing or fsdp):
        return Layout("cache", teacher), None
    return Layout("segments", teacher), None


@dataclass(frozen=True)
class LayerCost:
    """A decoder layer's cost in GEMM multiply-adds: a token's in its linear maps (q, k, v, o and the
    gated MLP), a (query, key) pair's in its attention (q.k and p.v over every query head), weighted by
    how much slower than a GEMM attention runs per multiply-add (softmax, masking): 3 on CPU, fitted to
    benchmarks/results/forward_sharing_checkpointing_cpu.md; 1.5 on GPUs (FlashAttention at about half
    a GEMM's rate; unmeasured here). ``call``: one call of the layer whatever its size (its dozen small
    ops, forward and backward), as many multiply-adds: on CPU 180 M, fitted to tiny-qwen3's demo step
    (16 prompts, the cache path's 2 forwards a prompt and side took 0.37 s against the padded rows'
    0.18 s, at 111 G multiply-adds/s measured on the same 2 cores); on GPUs 200 us of kernel launches
    at a GEMM's 200 T/s (unmeasured). Only a model of a few MiB notices it."""

    token: float
    pair: float
    call: float = 0.0

    @classmethod
    def of(cls, config, device: torch.device) -> LayerCost:
        heads, hidden = config.num_attention_heads, config.hidden_size
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        q, kv = heads * head_dim, (getattr(config, "num_key_value_heads", None) or heads) * head_dim
        cpu = device.type == "cpu"
        return cls(token=hidden * (2 * q + 2 * kv) + 3 * hidden * config.intermediate_size,
                   pair=2 * q * (3.0 if cpu else 1.5), call=180e6 if cpu else 40e9)


def sharing_pays(rows: list[RowSegments], cost: LayerCost, kernel: str = "sdpa", calls_per_row: int = 0) -> bool:
    """Whether the shared rows cost less than the micro-batch's padded rows (one a completion, all as
    wide as the widest), by a decoder layer's multiply-adds (``LayerCost``) over the pairs each kernel
    computes: the sdpa kernel (one call per row, a mask) computes each completion's whole
    [Lmax x (P + Lmax)] block and padded rows with padding their whole [W x W]; flash and flex skip
    masked blocks; ``calls_per_row``: layer calls a shared row takes (the cache path's 2: its prefix,
    then its completions), else one call for all rows, as padded. Sharing saves nothing with one
    completion a prompt, where prompts are much shorter than completions (then the padded rows hold
    little more than the shared ones), or for a tiny model with many prompts (calls, not arithmetic);
    checked against benchmarks/forward_sharing.py, and 5 % below padded is required (the shared
    forward's gathers)."""
    skips = kernel != "sdpa"
    widest = max(row.prefix + max(row.lengths) for row in rows)
    sequences = sum(len(row.lengths) for row in rows)
    uneven = any(row.prefix + n != widest for row in rows for n in row.lengths)
    padded = cost.call + cost.token * sequences * widest + cost.pair * sequences * widest ** 2 / (
        1 if uneven and not skips else 2)
    shared = cost.call * (calls_per_row * len(rows) or 1)
    for row in rows:
        p, longest = row.prefix, max(row.lengths)
        pairs = sum(n * (p + n / 2) for n in row.lengths) if skips else len(row.lengths) * longest * (p + longest)
        shared += cost.token * row.used + cost.pair * (p * p / 2 + pairs)
    return any(len(row.lengths) > 1 for row in rows) and shared < 0.95 * padded


@dataclass
class SharedSide:
    """One side (student or teacher) of a shared-prefix micro-batch, G rows of T tokens."""

    ids: torch.Tensor  # [G, T]
    positions: torch.Tensor  # [G, T]
    rows: torch.Tensor  # [n]: flat index into [G * T] of the hidden state predicting each completion token
    layout: SharedLayout  # the rows' segments (what the segments path and the mask are built from)

    @cached_property
    def mask(self) -> torch.Tensor:
        """[G, 1, T, T] bool: True where a query (row) may attend to a key (column); pads attend to
        themselves only (a fully masked row would give NaN) and nothing attends to them. Built only
        for the dense-mask path, by vectorised comparisons of the rows' segment ids."""
        return dense_mask(self.layout.segment_ids).unsqueeze(1)


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
    spans: list[list[int]] | None = None  # per group, its completions' confidence spans (loss.confidence_span)

    @property
    def length(self) -> list[int]:  # tokens of each completion, in target order (token_weights reads it)
        return [len(c) for group in self.completions for c in group]

    @property
    def span(self) -> list[int] | None:
        return None if self.spans is None else [s for group in self.spans for s in group]

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

    def unshared(self) -> DistillationBatch:
        """The same sequences as one right-padded row a completion (loss.make_batch's batch), from the
        tokens already here."""
        student, teacher, student_start, teacher_start = [], [], [], []
        for s_prefix, t_prefix, group in zip(self.student_prefixes, self.teacher_prefixes, self.completions):
            for completion in group:
                student.append(s_prefix + completion)
                teacher.append(t_prefix + completion)
                student_start.append(len(s_prefix))
                teacher_start.append(len(t_prefix))
        return DistillationBatch(*pad_rows(student, self.pad), *pad_rows(teacher, self.pad), student_start,
                                 teacher_start, self.length, self.span)


def dense_mask(segments: torch.Tensor) -> torch.Tensor:
    """[G, T, T] from [G, T] segment ids (0 the prefix, k completion k, -1 padding): the prefix causal,
    each completion the prefix and itself causally; a pad sees itself only."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril_()
    key_is_prefix = (segments == 0).unsqueeze(1)  # [G, 1, T]
    same = segments.unsqueeze(2) == segments.unsqueeze(1)  # [G, T, T]
    real = (segments >= 0).unsqueeze(1) & (segments >= 0).unsqueeze(2)
    eye = torch.eye(width, dtype=torch.bool, device=segments.device)
    return (causal & (key_is_prefix | same) & real) | (eye & (segments < 0).unsqueeze(2))


def completion_mask(prefix: int, lengths: list[int]) -> torch.Tensor:
    """[T, T] bool for one row: the prefix causal, each completion the prefix plus itself causally."""
    row = SharedLayout([RowSegments(prefix, tuple(lengths))], prefix + sum(lengths))
    return dense_mask(row.segment_ids)[0]


def _side(prefixes: list[list[int]], completions: list[list[list[int]]], pad: int) -> SharedSide:
    """The rows of one side: tokens, positions (each completion's continue its prefix's: P..P+L-1),
    and the flat index of the hidden state predicting each completion token (the prefix's last for
    a completion's first token, else the position before it), a tensor op per completion."""
    width = max(len(p) + sum(len(c) for c in cs) for p, cs in zip(prefixes, completions))
    layout = SharedLayout([RowSegments(len(p), tuple(len(c) for c in cs)) for p, cs in zip(prefixes, completions)],
                          width)
    tokens = [p + [t for c in cs for t in c] for p, cs in zip(prefixes, completions)]
    ids = torch.tensor([t + [pad] * (width - len(t)) for t in tokens])
    positions, predicting = [], []
    for g, row in enumerate(layout.rows):
        pieces, start = [torch.arange(row.prefix)], row.prefix
        for n in row.lengths:
            pieces.append(torch.arange(row.prefix, row.prefix + n))
            before = torch.arange(start - 1, start + n - 1)
            before[0] = row.prefix - 1
            predicting.append(g * width + before)
            start += n
        used = torch.cat(pieces)
        positions.append(torch.nn.functional.pad(used, (0, width - len(used))))
    return SharedSide(ids, torch.stack(positions), torch.cat(predicting), layout)


def make_shared_batch(tokenizer, targets: list[DistillationTarget], student_prompt_ids: list[list[int]],
                      max_prompt_tokens: int, max_completion_tokens: int,
                      chat_template_kwargs: dict | None = None, spans: bool = False) -> SharedPrefixBatch:
    """Group consecutive targets with the same student prompt and teacher context (a fallback
    context in correct_solution mode is a group of its own); the same tokens (and with ``spans``
    confidence spans) as make_batch."""
    groups: list[tuple[list[int], list[dict], list[list[int]]]] = []
    group_spans: list[list[int]] = []
    for target, prompt in zip(targets, student_prompt_ids, strict=True):
        completion = completion_ids(tokenizer, target, max_completion_tokens)
        span = confidence_span(tokenizer, target, completion) if spans else 0
        if groups and groups[-1][0] is prompt and groups[-1][1] is target.teacher_messages:
            groups[-1][2].append(completion)
            group_spans[-1].append(span)
        else:
            groups.append((prompt, target.teacher_messages, [completion]))
            group_spans.append([span])
    teacher_prefixes = {}
    for _, messages, _ in groups:
        if id(messages) not in teacher_prefixes:
            teacher_prefixes[id(messages)] = chat_ids(tokenizer, messages, chat_template_kwargs)[-max_prompt_tokens:]
    return SharedPrefixBatch([p[-max_prompt_tokens:] for p, _, _ in groups],
                             [teacher_prefixes[id(m)] for _, m, _ in groups], [cs for _, _, cs in groups],
                             tokenizer.pad_token_id, group_spans if spans else None)


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
    """The dense-mask path (a reference: every (query, key) pair of the row)."""
    decoder = getattr(model, model.base_model_prefix)
    hidden = decoder(input_ids=side.ids.to(device), attention_mask=side.mask.to(device),
                     position_ids=side.positions.to(device), use_cache=False).last_hidden_state  # [G, T, H]
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, side.rows.to(device))  # [n, H]


def _hidden_rows_segments(model: torch.nn.Module, side: SharedSide, device: torch.device, kernel: str) -> torch.Tensor:
    """The segments path: one forward of the rows, attention by segments (the model must use
    caopd.training.segment_attention's implementation: use_segment_attention)."""
    if not model.config._attn_implementation.startswith("caopd_segments"):
        raise RuntimeError("the segments path needs use_segment_attention(model) first")
    decoder = getattr(model, model.base_model_prefix)
    side.layout.kernel = kernel
    hidden = decoder(input_ids=side.ids.to(device), attention_mask=side.layout.marker(device),
                     position_ids=side.positions.to(device), use_cache=False,
                     shared_layout=side.layout).last_hidden_state  # [G, T, H]
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, side.rows.to(device))  # [n, H]


def _rows(model: torch.nn.Module, batch: SharedPrefixBatch, side: str, path: str, device: torch.device,
          kernel: str) -> torch.Tensor:
    if path == "cache":
        return _hidden_rows_cached(model, getattr(batch, f"{side}_groups"), device)
    if path == "segments":
        return _hidden_rows_segments(model, getattr(batch, side), device, kernel)
    if path == "mask":
        return _hidden_rows(model, getattr(batch, side), device)
    raise ValueError(f"path must be cache, segments or mask, got {path!r}")


def shared_distillation_loss(student: torch.nn.Module, teacher: torch.nn.Module, batch: SharedPrefixBatch, *,
                             divergence: str = "reverse", beta: float = 0.5, temperature: float = 1.0,
                             skip_tokens: int = 3, impl: str = "auto", path: str = "cache",
                             teacher_path: str | None = None, kernel: str | None = None,
                             confidence_divergence: str = "same", top_k: int = 0,
                             served_teacher=None) -> LossOutput:
    """The same loss as loss.distillation_loss (per sequence, then over sequences), from the
    shared-prefix forwards. path: the student's (cache, segments or mask); teacher_path: the
    teacher's (default: the cache, without gradients; the student's under FSDP); kernel: the
    segments' attention kernel (default: segment_attention.default_kernel). served_teacher: a
    TeacherServer scoring the completions (``teacher`` unused), its requests sent before the
    student's forward."""
    from caopd.training.segment_attention import default_kernel

    device = next(student.parameters()).device
    kernel = kernel or default_kernel(device)
    pending = None if served_teacher is None else submit_to_teacher(served_teacher, batch.unshared())
    student_rows = _rows(student, batch, "student", path, device, kernel)
    if pending is None:
        with torch.no_grad():
            teacher_side = _rows(teacher, batch, "teacher", teacher_path or "cache", device, kernel)
    else:
        teacher_side = served_teacher.result(pending, device)
        if teacher_side is None:  # the server failed (on any process): nothing to learn, the loop stops
            return LossOutput((student_rows * 0).sum(), 0)
    weights = token_weights(batch, skip_tokens).to(device)
    return fused_loss(student, teacher, student_rows, teacher_side, weights, divergence=divergence, beta=beta,
                      temperature=temperature, impl=impl, span=span_mask(batch.length, batch.span),
                      span_divergence=confidence_divergence, top_k=top_k)
