"""Supervised warm-up: teach a fresh small model what the method assumes a pretrained LLM can do.

Two kinds of sequences, both ending in a ``Confidence:`` line:
- the student's prompt -> the answer (the demonstration) with the confidence ``base_confidence``
  gives: the format, a prior way of stating confidence, and whatever accuracy the model reaches;
- a teacher context (the question, a demonstration ending in ``Confidence: c``, and half the time
  the calibration note with c) -> the demonstrated answer and ``Confidence: c``: following the
  demonstration and the note, the in-context ability both methods' teachers rely on. c is 1.00
  (what plain OPD's demonstrations show) 30% of the time, else uniform on [0, 1]: a small model
  that rarely saw "1.00" copies the decimals but not the leading digit.
Loss on the response tokens only; plain next-token cross-entropy.
"""
from __future__ import annotations

import random
from collections.abc import Callable

import torch
import torch.nn.functional as F

from caopd.inputs.data import Example
from caopd.inputs.prompts import demonstration, student_messages, teacher_messages
from caopd.scoring.confidence import format_confidence
from caopd.training.loss import chat_ids


def response(example: Example, dataset: str, confidence: float) -> str:
    return demonstration(example, dataset) + "\n" + format_confidence(confidence)


def warmup_sequences(examples: list[Example], dataset: str, tokenizer, rng: random.Random,
                     base_confidence: Callable[[Example, random.Random], float],
                     teacher_share: float) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) pairs; a ``teacher_share`` of them in a teacher context."""
    sequences = []
    for example in examples:
        if rng.random() < teacher_share:
            shown = 1.0 if rng.random() < 0.3 else round(rng.uniform(0.0, 1.0), 2)  # 1.00: OPD's demonstrations
            with_note = rng.random() < 0.5
            prompt = teacher_messages(example, demonstration(example, dataset), "demo", shown if with_note else None)
            if not with_note:  # a demonstration ending in its own confidence, no note
                prompt[-1]["content"] = prompt[-1]["content"].replace(format_confidence(1.0),
                                                                      format_confidence(shown), 1)
        else:
            prompt = student_messages(example)
            shown = base_confidence(example, rng)
        ids = tokenizer(response(example, dataset, shown), add_special_tokens=False).input_ids
        sequences.append((chat_ids(tokenizer, prompt), ids + [tokenizer.eos_token_id]))
    return sequences


def two_widths(lengths: list[int]) -> int:
    """Where to split a batch sorted by length into two padded sub-batches with the fewest padded
    tokens (len(lengths): one batch; the warm-up mixes short student prompts with long teacher
    contexts, and one split cuts a quarter of its padded tokens)."""
    n = len(lengths)
    if n < 2:
        return n

    def padded_tokens(k: int) -> int:
        return k * lengths[k - 1] + (n - k) * lengths[-1]

    best = min(range(1, n), key=padded_tokens)
    return best if padded_tokens(best) < 0.9 * n * lengths[-1] else n


def padded(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, labels: -100 but on the response, attention mask) of right-padded rows."""
    width = max(len(p) + len(r) for p, r in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for b, (prompt, reply) in enumerate(batch):
        row = prompt + reply
        ids[b, :len(row)] = torch.tensor(row)
        labels[b, len(prompt):len(row)] = torch.tensor(reply)
        attention[b, :len(row)] = 1
    return ids, labels, attention


def supervised_warmup(model: torch.nn.Module, sequences: list[tuple[list[int], list[int]]], *, steps: int,
                      batch_size: int, learning_rate: float, seed: int, pad_id: int,
                      on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW on the response tokens (the mean over the batch's response tokens), cosine decay;
    each batch forwarded as two sub-batches of similar lengths (``two_widths``); returns the loss
    of each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * 0.5 * (1 + torch.cos(
            torch.tensor(torch.pi * s / steps)).item()))
    order = random.Random(seed)
    device = next(model.parameters()).device
    losses = []
    model.train()
    for step in range(steps):
        batch = sorted(order.sample(sequences, min(batch_size, len(sequences))), key=lambda s: len(s[0]) + len(s[1]))
        split = two_widths([len(p) + len(r) for p, r in batch])
        tokens = sum(len(r) for _, r in batch)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for part in (batch[:split], batch[split:]):
            if not part:
                continue
            ids, labels, attention = padded(part, pad_id)
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(device),
                                   reduction="sum") / tokens
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(total)
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses
