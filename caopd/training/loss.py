"""Stage 5: student and teacher forwards to final hidden states, then the fused linear KL.

The student sees [student prompt + completion] with grad, the teacher [teacher context + the same
completion] without; only completion positions count (the first ``skip_tokens`` of each excluded).
The loss is the per-token divergence averaged over each sequence's counted tokens, then over
sequences, computed by ``caopd_kernels.fused_linear_kl`` on final hidden states: the models'
[tokens x vocab] logits are never materialized.

Two layouts of the same sequences, the same hidden states: ``padded`` (one right-padded row per
sequence) and ``packed`` (each side's sequences concatenated into one row without padding, position
ids restarting at 0 per sequence, no attention mask: transformers reads the sequence boundaries
from the position ids, as FlashAttention's varlen kernels under ``flash_attention_2``, as a
block-diagonal mask under SDPA).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from caopd_kernels import fused_linear_kl, fused_linear_kl_topk, topk_logprobs

from caopd.scoring.calibration import DistillationTarget
from caopd.scoring.confidence import strip_confidence


def chat_ids(tokenizer, messages: list[dict], chat_template_kwargs: dict | None = None) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         **(chat_template_kwargs or {}))
    return tokenizer(text, add_special_tokens=False).input_ids


def completion_ids(tokenizer, target: DistillationTarget, max_tokens: int) -> list[int]:
    """The completion's tokens + EOS, at most ``max_tokens``; the confidence line is never cut
    (the body is truncated to make room for it)."""
    tail = tokenizer("\n" + target.confidence_line, add_special_tokens=False).input_ids if target.confidence_line \
        else []
    tail = tail + [tokenizer.eos_token_id]
    body = body_ids(tokenizer, target)
    return body[:max(0, max_tokens - len(tail))] + tail


def confidence_span(tokenizer, target: DistillationTarget, ids: list[int]) -> int:
    """How many of the completion's last tokens (``ids``, from ``completion_ids``) state its
    confidence, the end-of-sequence token included: CaOPD's appended line, or the statement the
    student's completion ends in as sampled (plain OPD); 0 without one."""
    if target.confidence_line:
        return min(len(ids), len(tokenizer("\n" + target.confidence_line, add_special_tokens=False).input_ids) + 1)
    body = strip_confidence(target.completion)
    if body == target.completion.rstrip():
        return 0
    return len(ids) - spelled_prefix(tokenizer, ids[:-1], body)


def body_ids(tokenizer, target: DistillationTarget) -> list[int]:
    """The body's tokens: the ids the engine sampled, as far as they spell the body; only text the
    target changed (a confidence statement removed from the end or the middle) is tokenized anew.
    A text does not always tokenize back to its sampled ids: the student trains on what it produced."""
    if target.sampled_ids is None:
        return tokenizer(target.completion, add_special_tokens=False).input_ids
    ids = list(target.sampled_ids)
    kept = spelled_prefix(tokenizer, ids, target.completion)
    rest = target.completion[len(tokenizer.decode(ids[:kept], skip_special_tokens=True)):]
    return ids[:kept] + (tokenizer(rest, add_special_tokens=False).input_ids if rest else [])


def spelled_prefix(tokenizer, ids: list[int], text: str) -> int:
    """The most leading ids whose decoding is a prefix of ``text``: the whole sequence when it spells
    ``text``, else found by bisection (O(n log n) decoding, for hostile text too)."""
    def spells(count: int) -> bool:
        return text.startswith(tokenizer.decode(ids[:count], skip_special_tokens=True))

    if spells(len(ids)):
        return len(ids)
    low, high = 0, len(ids)  # spells(low) holds (the empty prefix), spells(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if spells(middle) else (low, middle)
    return low


@dataclass
class DistillationBatch:
    """B right-padded sequence pairs. Completion b is student_ids[b, student_start[b]:+length[b]]
    and teacher_ids[b, teacher_start[b]:+length[b]] (the same tokens)."""

    student_ids: torch.Tensor  # [B, T_s]
    student_attention: torch.Tensor  # [B, T_s]
    teacher_ids: torch.Tensor  # [B, T_t]
    teacher_attention: torch.Tensor  # [B, T_t]
    student_start: list[int]
    teacher_start: list[int]
    length: list[int]
    span: list[int] | None = None  # each completion's last tokens stating its confidence (confidence_span)

    @property
    def completion_tokens(self) -> int:
        return sum(self.length)


def pad_rows(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, attention


def make_batch(tokenizer, targets: list[DistillationTarget], student_prompt_ids: list[list[int]],
               max_prompt_tokens: int, max_completion_tokens: int,
               chat_template_kwargs: dict | None = None, spans: bool = False) -> DistillationBatch:
    """Tokenize targets; prompts longer than ``max_prompt_tokens`` keep their last tokens; with
    ``spans``, each completion's confidence span (for a divergence of its own)."""
    student_rows, teacher_rows, student_start, teacher_start, length, span = [], [], [], [], [], []
    teacher_cache: dict[int, list[int]] = {}
    for target, prompt in zip(targets, student_prompt_ids, strict=True):
        key = id(target.teacher_messages)
        if key not in teacher_cache:
            teacher_cache[key] = chat_ids(tokenizer, target.teacher_messages, chat_template_kwargs)
        teacher_prompt = teacher_cache[key][-max_prompt_tokens:]
        prompt = prompt[-max_prompt_tokens:]
        completion = completion_ids(tokenizer, target, max_completion_tokens)
        student_rows.append(prompt + completion)
        teacher_rows.append(teacher_prompt + completion)
        student_start.append(len(prompt))
        teacher_start.append(len(teacher_prompt))
        length.append(len(completion))
        if spans:
            span.append(confidence_span(tokenizer, target, completion))
    student_ids, student_attention = pad_rows(student_rows, tokenizer.pad_token_id)
    teacher_ids, teacher_attention = pad_rows(teacher_rows, tokenizer.pad_token_id)
    return DistillationBatch(student_ids, student_attention, teacher_ids, teacher_attention, student_start,
                             teacher_start, length, span if spans else None)


def final_hidden_states(model: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """[B, T, H] outputs of the decoder's final norm: what the lm_head would multiply."""
    decoder = getattr(model, model.base_model_prefix)
    return decoder(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state


def packed_hidden_states(model: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """final_hidden_states of a right-padded batch, computed packed: the rows' real tokens in one
    row, position ids restarting per row; returned [B, T, H] again (zeros at pads)."""
    decoder = getattr(model, model.base_model_prefix)
    lengths = attention.sum(1)
    real = attention.bool()
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)[real]  # restarts at 0 per row
    hidden = decoder(input_ids=ids[real].unsqueeze(0), position_ids=positions.unsqueeze(0),
                     use_cache=False).last_hidden_state[0]  # [sum(lengths), H]
    if int(lengths.min()) == ids.shape[1]:
        return hidden.view(ids.shape[0], ids.shape[1], -1)
    out = hidden.new_zeros(ids.shape[0], ids.shape[1], hidden.shape[-1])
    return out.masked_scatter(real.unsqueeze(-1), hidden)


def token_weights(batch: DistillationBatch, skip_tokens: int) -> torch.Tensor:
    """Per completion token: the weight 1 / (counted tokens of its sequence) / (sequences with
    any counted token), 0 for the first ``skip_tokens``."""
    weights = []
    counted = [max(0, n - skip_tokens) for n in batch.length]
    sequences = sum(c > 0 for c in counted)
    for n, c in zip(batch.length, counted):
        weights += [0.0] * min(n, skip_tokens) + [1.0 / (c * sequences)] * c if c else [0.0] * n
    return torch.tensor(weights)


def span_mask(length: list[int], span: list[int] | None) -> torch.Tensor | None:
    """Per completion token: True on each completion's last ``span`` tokens (None without spans)."""
    if span is None:
        return None
    return torch.tensor([k >= n - s for n, s in zip(length, span) for k in range(n)], dtype=torch.bool)


def submit_to_teacher(served_teacher, batch: DistillationBatch) -> list:
    """A TeacherServer's requests for ``batch``'s completions (each after its teacher context), sent now."""
    return served_teacher.submit(
        [row[:s + n] for row, s, n in zip(batch.teacher_ids.tolist(), batch.teacher_start, batch.length)],
        batch.teacher_start, batch.length)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar with grad: the divergence averaged per sequence, then over sequences
    counted_tokens: int


def distillation_loss(student: torch.nn.Module, teacher: torch.nn.Module | None, batch: DistillationBatch, *,
                      divergence: str = "reverse", beta: float = 0.5, temperature: float = 1.0,
                      skip_tokens: int = 3, impl: str = "auto", layout: str = "padded",
                      confidence_divergence: str = "same", top_k: int = 0, served_teacher=None) -> LossOutput:
    """layout: "padded" or "packed" (see the module docstring); the same loss either way.
    confidence_divergence: the divergence on the tokens stating the confidence (the batch's
    ``span``), "same" as the rest's unless named. top_k: see fused_loss. served_teacher: a
    TeacherServer (``teacher`` unused): its top-k requests go out before the student's forward."""
    if layout not in ("padded", "packed"):
        raise ValueError(f"layout must be padded or packed, got {layout!r}")
    forward = packed_hidden_states if layout == "packed" else final_hidden_states
    device = next(student.parameters()).device
    pending = None if served_teacher is None else submit_to_teacher(served_teacher, batch)
    student_hidden = forward(student, batch.student_ids.to(device), batch.student_attention.to(device))
    # Position t predicts token t + 1: completion token k is predicted from position start + k - 1.
    student_rows = torch.cat([student_hidden[b, s - 1:s - 1 + n]
                              for b, (s, n) in enumerate(zip(batch.student_start, batch.length))])
    if pending is None:
        with torch.no_grad():
            teacher_hidden = forward(teacher, batch.teacher_ids.to(device), batch.teacher_attention.to(device))
        teacher_side = torch.cat([teacher_hidden[b, s - 1:s - 1 + n]
                                  for b, (s, n) in enumerate(zip(batch.teacher_start, batch.length))])
    else:
        teacher_side = served_teacher.result(pending, device)
        if teacher_side is None:  # the server failed (on any process): nothing to learn, the loop stops
            return LossOutput((student_rows * 0).sum(), 0)
    weights = token_weights(batch, skip_tokens).to(device)
    return fused_loss(student, teacher, student_rows, teacher_side, weights, divergence=divergence, beta=beta,
                      temperature=temperature, impl=impl, span=span_mask(batch.length, batch.span),
                      span_divergence=confidence_divergence, top_k=top_k)


def fused_loss(student: torch.nn.Module, teacher: torch.nn.Module | None, student_rows: torch.Tensor,
               teacher_side: torch.Tensor | tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor, *,
               divergence: str, beta: float, temperature: float, impl: str, span: torch.Tensor | None = None,
               span_divergence: str = "same", top_k: int = 0) -> LossOutput:
    """sum_i weights[i] * divergence of token i through both lm_heads, by fused_linear_kl; the
    tokens where ``span`` is True with ``span_divergence`` instead (unless "same"): two calls over
    the two sets of rows, so no token's logits are computed twice. ``teacher_side``: the teacher's
    final hidden rows, or its top-k (ids, log-probs) as a server gives them (``teacher`` unused).
    ``top_k`` > 0: the teacher's k most likely tokens and a tail bucket (fused_linear_kl_topk)."""
    if span is not None and span_divergence not in ("same", divergence) and bool(span.any()):
        span = span.to(student_rows.device)
        rest = ~span
        parts = [fused_loss(student, teacher, student_rows[rows],
                            tuple(t[rows] for t in teacher_side) if isinstance(teacher_side, tuple)
                            else teacher_side[rows], weights[rows],
                            divergence=kind, beta=beta, temperature=temperature, impl=impl, top_k=top_k)
                 for rows, kind in ((rest, divergence), (span, span_divergence)) if bool(rows.any())]
        return LossOutput(sum(p.loss for p in parts), sum(p.counted_tokens for p in parts))
    student_head = student.get_output_embeddings()
    student_weight, student_bias = student_head.weight, student_head.bias
    if student_rows.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        # fp32 master weights under autocast: the head's GEMMs in the autocast dtype, as a Linear
        # would run (the casts are differentiable, so the fp32 weight gets its gradient)
        half = torch.get_autocast_dtype("cuda")
        student_rows, student_weight = student_rows.to(half), student_weight.to(half)
        student_bias = None if student_bias is None else student_bias.to(half)
    if isinstance(teacher_side, tuple):  # a served teacher's top k (its temperature 1: checked at start)
        ids, logprobs = teacher_side
        loss = fused_linear_kl_topk(student_rows, student_weight, ids, logprobs, weights, divergence=divergence,
                                    beta=beta, temperature=temperature, reduction="sum", impl=impl,
                                    student_bias=student_bias)
        return LossOutput(loss, int((weights > 0).sum()))
    teacher_rows, teacher_head = teacher_side, teacher.get_output_embeddings()
    # a --teacher-model of the student's tokenizer may pad its head to another row count (Qwen2.5-7B's
    # 152,064 against 1.5B's 151,936): the token ids both heads have are the tokenizer's
    vocab = "equal" if teacher_head.weight.shape[0] == student_weight.shape[0] else "common"
    if top_k:
        rows = min(teacher_head.weight.shape[0], student_weight.shape[0])
        ids, logprobs = topk_logprobs(teacher_rows, teacher_head.weight[:rows], min(top_k, rows),
                                      bias=None if teacher_head.bias is None else teacher_head.bias[:rows],
                                      temperature=temperature)
        loss = fused_linear_kl_topk(student_rows, student_weight[:rows], ids, logprobs, weights, divergence=divergence,
                                    beta=beta, temperature=temperature, reduction="sum", impl=impl,
                                    student_bias=None if student_bias is None else student_bias[:rows])
        return LossOutput(loss, int((weights > 0).sum()))
    loss = fused_linear_kl(student_rows, student_weight, teacher_rows, teacher_head.weight, weights,
                           divergence=divergence, beta=beta, temperature=temperature, reduction="sum",
                           student_bias=student_bias, teacher_bias=teacher_head.bias, impl=impl, vocab=vocab)
    return LossOutput(loss, int((weights > 0).sum()))
