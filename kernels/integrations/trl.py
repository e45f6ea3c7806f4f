"""TRL's SDFTTrainer and SDPOTrainer with ``fused_linear_kl`` in their loss slot.

    from caopd_kernels.integrations.trl import use_fused_linear_kl
    trainer = SDFTTrainer(model, args=SDFTConfig(...), train_dataset=...)   # any distillation_mode
    use_fused_linear_kl(trainer).train()

With ``distillation_mode="full_logits"`` the trainers compute both models' [B, T, V] logits and
the divergence over them. Here each model's forward stops before its lm_head (a pre-hook keeps the
lm_head's input and hands the lm_head an empty slice instead), and one ``fused_linear_kl`` call per
batch takes both hidden states and both lm_head weights. TRL's per-sequence mean becomes per-token
weights: token t of sequence b weighs mask[b, t] / max(1, sum_t mask[b, t]) / B, summed — the
loss TRL computes, with no [tokens x vocab] tensor.

Mapping of TRL's settings (tested against TRL 1.16's own path):
- ``distillation_alpha``: 0 -> divergence="forward" KL(teacher||student), 1 -> "reverse"
  KL(student||teacher), otherwise "jsd" with beta = alpha (the same mixture (1-a)·s + a·t).
- ``temperature``: both models' logits divided by it, as TRL does.
- the loss mask: SDFT's ``num_loss_tokens_to_skip``, SDPO's per-sequence ``self_distillation_mask``.
- ``distillation_is_clip`` with rollout log-probs: TRL multiplies each token's loss by a clipped,
  detached importance ratio; here it joins the token weights (the student's token log-probs for it
  come from lm_head chunks under no_grad, never the whole [tokens x vocab] matrix).
- the metric ``self_distillation/distillation_loss``: the token mean TRL logs (from the kernel's
  ``return_token_losses``).

``distillation_mode="sampled_token"`` (SDPO's default: reverse KL on the realized tokens) takes the
student's token log-probabilities from ``fused_linear_token_logprobs`` and the teacher's from lm_head
chunks under no_grad; TRL's per-token ``(log p_s - log p_t).detach() * log p_s`` and the same weights.
Settings are read when the loss runs (a mode or ``use_teacher_server`` set after wrapping is honoured or
refused, never ignored).

``distillation_mode="topk_logits"`` (SDFT's default) takes the student's top ``distillation_topk`` tokens
(``topk_logprobs``, no gradient through the choice) and the teacher's log-probabilities there, then
``fused_linear_kl_topk`` with TRL's tail bucket (``distillation_add_tail``) or renormalisation. The student's
tail mass is exact where TRL floors both tails at 1e-7: they differ only where the student's top k hold
all but 1e-7 of its mass, and then by at most ~1e-7 x log(1e-7 / tail) a token.

Refused with one line: SDPO's ``distillation_weight`` < 1 (its policy
loss needs the student's full logits anyway), the teacher server, FSDP or DeepSpeed ZeRO-3 (the
lm_head weight is sharded outside the forward), a lm_head that is not a plain ``nn.Linear`` (e.g.
a LoRA-wrapped one) and models that rescale logits after the lm_head (soft-capping, logit scales).
Neither Liger's nor caopd's model patches are involved: only the loss changes.
"""
from __future__ import annotations

import types
from contextlib import contextmanager

import torch

from ..fused_linear_kl import divergence_for_beta, fused_linear_kl, resolve_impl
from ..fused_linear_kl_topk import fused_linear_kl_topk
from ..fused_linear_token_logprobs import fused_linear_token_logprobs
from ..topk_logprobs import topk_logprobs

TESTED_TRL = "1.16"
# Attributes of TRL 1.16's SDFTTrainer / SDPOTrainer that this module relies on.
TRAINER_ATTRIBUTES = ("teacher_model", "temperature", "model_kwarg_keys", "accelerator",
                      "_get_teacher_context_for_self_distillation", "_log_self_distillation_metric")
LOGIT_RESCALING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
FUSED_MODES = ("full_logits", "sampled_token", "topk_logits")
IS_CLIP_LOG_RATIO = 20.0  # TRL clamps the log importance ratio to +-20 before exp


def divergence_for_alpha(alpha: float) -> tuple[str, float]:
    """TRL's ``distillation_alpha`` (Liger's beta, the same family) as fused_linear_kl's (divergence, beta)."""
    return divergence_for_beta(alpha, "distillation_alpha")


def use_fused_linear_kl(trainer, *, impl: str = "auto", memory_budget: int | None = None):
    """Route ``trainer``'s distillation loss through ``fused_linear_kl``; returns the trainer.

    ``trainer``: a constructed TRL SDFTTrainer or SDPOTrainer with distillation_mode "full_logits" (both
    models' distributions, fused_linear_kl), "sampled_token" (the realized tokens' log-probabilities,
    fused_linear_token_logprobs for the student) or "topk_logits" (fused_linear_kl_topk).
    impl / memory_budget: as in fused_linear_kl (None: its default budget). Call it once, before ``train()``."""
    try:
        from trl.experimental.sdft import SDFTTrainer
        from trl.experimental.sdpo import SDPOTrainer
    except ImportError:
        raise ImportError(f"caopd_kernels.integrations.trl needs TRL: pip install 'trl=={TESTED_TRL}.*'") from None
    if not isinstance(trainer, SDFTTrainer | SDPOTrainer):
        raise TypeError(f"use_fused_linear_kl takes an SDFTTrainer or SDPOTrainer, got {type(trainer).__name__}")
    args = trainer.args
    name = type(trainer).__name__
    missing = [a for a in TRAINER_ATTRIBUTES if not hasattr(trainer, a)]
    if missing:
        raise TypeError(f"{name} lacks {', '.join(missing)}: this integration is written for TRL {TESTED_TRL}")
    _check_mode_and_teacher(args, name, "")
    if getattr(args, "distillation_weight", 1.0) != 1.0:
        raise ValueError(f"{name}: distillation_weight={args.distillation_weight} mixes in the policy loss, which "
                         "needs the student's full logits; the fused loss covers distillation_weight=1.0")
    if trainer.is_fsdp_enabled or (trainer.is_deepspeed_enabled and _zero_stage(trainer) == 3):
        raise ValueError(f"{name}: FSDP and DeepSpeed ZeRO-3 shard the lm_head weight outside the forward; the "
                         "fused loss needs it whole (DDP and ZeRO-1/2 work)")
    device = next(trainer.model.parameters()).device
    resolve_impl(impl, device)  # a wrong impl or budget now, not at the first step
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget <= 0):
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
    divergence_for_alpha(float(args.distillation_alpha))
    for which, model in (("student", trainer.model), ("teacher", trainer.teacher_model)):
        _check_plain_head(trainer, model, which)
    trainer._caopd_fused_kl = dict(impl=impl, memory_budget=memory_budget)
    trainer.compute_loss = types.MethodType(_compute_loss, trainer)
    return trainer


def _check_mode_and_teacher(args, name: str, when: str) -> None:
    """One line unless the trainer's mode is one the fused loss covers and its teacher runs here."""
    if args.distillation_mode not in FUSED_MODES:
        raise ValueError(f"{name}: distillation_mode is {args.distillation_mode!r}{when}; the fused loss covers "
                         f"{', '.join(FUSED_MODES)}")
    if getattr(args, "use_teacher_server", False):
        raise ValueError(f"{name}: use_teacher_server=True{when} scores the teacher on the vLLM server; the fused "
                         "loss needs the teacher's hidden states")


def _zero_stage(trainer) -> int | None:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else plugin.zero_stage


def _check_plain_head(trainer, model, which: str) -> None:
    unwrapped = trainer.accelerator.unwrap_model(model)
    head = unwrapped.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"the {which}'s lm_head is {type(head).__name__}, not torch.nn.Linear (e.g. a LoRA "
                         "adapter on lm_head): the fused loss reads its weight directly")
    config = unwrapped.config.get_text_config() if hasattr(unwrapped.config, "get_text_config") else unwrapped.config
    for attribute in LOGIT_RESCALING:
        value = getattr(config, attribute, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"the {which}'s config sets {attribute}={value}: its logits are not lm_head(h), "
                             "which the fused loss computes")


def _compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """The trainers' compute_loss, with the distillation loss fused."""
    if return_outputs:
        raise ValueError(f"The {type(self).__name__} does not support returning outputs")
    args = self.args
    # read when the loss runs: a setting changed after use_fused_linear_kl is honoured, or refused
    _check_mode_and_teacher(args, type(self).__name__, " (set after use_fused_linear_kl)")
    divergence, beta = divergence_for_alpha(float(args.distillation_alpha))
    loss = fused_self_distillation_loss(self, model, inputs, divergence=divergence, beta=beta,
                                        temperature=float(self.temperature), mode=args.distillation_mode,
                                        **self._caopd_fused_kl)
    accumulation_scale = self.current_gradient_accumulation_steps if self.model.training else 1.0
    return loss / accumulation_scale


def fused_self_distillation_loss(trainer, model, inputs, *, divergence: str, beta: float, temperature: float,
                                 impl: str = "auto", memory_budget: int | None = None,
                                 mode: str = "full_logits") -> torch.Tensor:
    """TRL's per-sequence-mean self-distillation loss over one batch, in one fused call: fused_linear_kl
    (full_logits), _sampled_token_loss or _topk_loss."""
    completion_ids = inputs["completion_ids"]
    batch, length = completion_ids.shape
    loss_mask = _loss_mask(trainer, inputs).to(torch.float32)
    student_hidden, student_head = _hidden_before_head(
        trainer, model, torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1), length)
    with torch.no_grad(), trainer._get_teacher_context_for_self_distillation():
        teacher_hidden, teacher_head = _hidden_before_head(
            trainer, trainer.teacher_model, inputs["teacher_input_ids"], inputs["teacher_attention_mask"], length)

    student_hidden = student_hidden.reshape(batch * length, -1)
    teacher_hidden = teacher_hidden.reshape(batch * length, -1)
    token_factor = loss_mask.reshape(-1)  # TRL's per-token multiplier: the mask, times the clip ratio if any
    old_logps = inputs.get("old_per_token_logps")
    clip = getattr(trainer.args, "distillation_is_clip", None)
    if clip is not None and old_logps is not None:
        counted = token_factor > 0
        with torch.no_grad():
            student_logps = torch.zeros_like(token_factor)
            student_logps[counted] = _token_logprobs(
                student_hidden[counted], student_head, completion_ids.reshape(-1)[counted], temperature)
            log_ratio = (student_logps - old_logps.reshape(-1).to(torch.float32)).clamp(-IS_CLIP_LOG_RATIO,
                                                                                         IS_CLIP_LOG_RATIO)
            token_factor = token_factor * log_ratio.exp().clamp(max=clip)
    tokens_per_sequence = loss_mask.sum(-1, keepdim=True).clamp(min=1.0)
    weights = (token_factor.reshape(batch, length) / tokens_per_sequence / batch).reshape(-1)

    if mode == "sampled_token":
        loss, token_losses = _sampled_token_loss(student_hidden, student_head, teacher_hidden, teacher_head,
                                                 completion_ids.reshape(-1), weights, temperature, memory_budget)
    elif mode == "topk_logits":
        loss, token_losses = _topk_loss(trainer.args, student_hidden, student_head, teacher_hidden, teacher_head,
                                        weights, divergence, beta, temperature, memory_budget)
    else:
        loss, token_losses = fused_linear_kl(
            student_hidden, student_head.weight, teacher_hidden, teacher_head.weight, weights, divergence=divergence,
            beta=beta, temperature=temperature, student_bias=student_head.bias, teacher_bias=teacher_head.bias,
            reduction="sum", impl=impl, memory_budget=memory_budget, return_token_losses=True)

    token_mean = (token_losses * token_factor).sum() / loss_mask.sum().clamp(min=1.0)  # the metric TRL logs
    mode = "train" if model.training else "eval"
    trainer._log_self_distillation_metric(mode, trainer.accelerator.gather(token_mean.detach()).mean().item())
    return loss


def _sampled_token_loss(student_hidden, student_head, teacher_hidden, teacher_head, token_ids, weights, temperature,
                        memory_budget):
    """(sum_i w_i loss_i, loss_i [N] detached) of TRL's sampled-token loss, over the tokens with w_i > 0."""
    rows = (weights > 0).nonzero().squeeze(1)
    hidden = student_hidden[rows].to(student_head.weight.dtype)  # autocast's bf16 rows: the head's GEMM dtype
    student = fused_linear_token_logprobs(hidden, student_head.weight, token_ids[rows], bias=student_head.bias,
                                          temperature=temperature, memory_budget=memory_budget)
    with torch.no_grad():
        teacher = _token_logprobs(teacher_hidden[rows], teacher_head, token_ids[rows], temperature)
    per_token = (student.detach() - teacher) * student
    token_losses = torch.zeros(weights.shape[0], dtype=per_token.dtype, device=weights.device)
    token_losses[rows] = per_token.detach()
    return (per_token * weights[rows].to(per_token.dtype)).sum(), token_losses


def _topk_loss(args, student_hidden, student_head, teacher_hidden, teacher_head, weights, divergence, beta,
               temperature, memory_budget):
    """TRL's topk_logits over the tokens with w_i > 0: the student's top distillation_topk tokens (no
    gradient through the choice), the teacher's log-probabilities there, renormalised on them or with a
    tail bucket (distillation_add_tail), through fused_linear_kl_topk."""
    if args.distillation_topk is None:
        raise ValueError("distillation_mode='topk_logits' requires distillation_topk")
    rows = (weights > 0).nonzero().squeeze(1)
    hidden = student_hidden[rows].to(student_head.weight.dtype)
    k = int(args.distillation_topk)
    with torch.no_grad():
        ids, _ = topk_logprobs(hidden, student_head.weight, k, bias=student_head.bias, temperature=temperature,
                               memory_budget=memory_budget)
        _, teacher = topk_logprobs(teacher_hidden[rows].to(teacher_head.weight.dtype), teacher_head.weight, k,
                                   bias=teacher_head.bias, temperature=temperature, memory_budget=memory_budget,
                                   ids=ids)
    loss, per_token = fused_linear_kl_topk(
        hidden, student_head.weight, ids, teacher, weights[rows].to(torch.float32), divergence=divergence, beta=beta,
        tail="bucket" if args.distillation_add_tail else "none", temperature=temperature,
        student_bias=student_head.bias, reduction="sum", memory_budget=memory_budget, return_token_losses=True)
    token_losses = torch.zeros(weights.shape[0], dtype=per_token.dtype, device=weights.device)
    token_losses[rows] = per_token
    return loss, token_losses


def _loss_mask(trainer, inputs) -> torch.Tensor:
    """The tokens TRL's trainers count: SDFT skips the first num_loss_tokens_to_skip completion
    tokens; SDPO drops whole sequences by self_distillation_mask."""
    completion_mask = inputs["completion_mask"]
    skip = getattr(trainer, "num_loss_tokens_to_skip", 0) or 0
    if skip > 0:
        positions = torch.arange(completion_mask.size(1), device=completion_mask.device).unsqueeze(0)
        completion_mask = completion_mask * (positions >= skip).long()
    per_sequence = inputs.get("self_distillation_mask")
    if per_sequence is not None:
        completion_mask = completion_mask * per_sequence.unsqueeze(1)
    return completion_mask


@contextmanager
def _head_input_taken(head: torch.nn.Module, taken: list):
    """While active, ``head`` records its input in ``taken`` and computes on an empty slice of it."""
    def take(_module, args):
        taken.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(take)
    try:
        yield
    finally:
        handle.remove()


def _hidden_before_head(trainer, model, input_ids, attention_mask, length: int):
    """The final hidden states at the ``length`` positions that predict the completion tokens
    ([B, length, H], what TRL's lm_head would turn into logits) and the lm_head module."""
    head = trainer.accelerator.unwrap_model(model).get_output_embeddings()
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if "logits_to_keep" in trainer.model_kwarg_keys:
        kwargs["logits_to_keep"] = length + 1
    taken: list[torch.Tensor] = []
    with _head_input_taken(head, taken):
        model(**kwargs)
    if len(taken) != 1:
        raise RuntimeError(f"the lm_head ran {len(taken)} times in one forward; expected once")
    return taken[0][:, :-1][:, -length:], head


def _token_logprobs(hidden: torch.Tensor, head: torch.nn.Linear, token_ids: torch.Tensor, temperature: float,
                    chunk: int = 1024) -> torch.Tensor:
    """log softmax(head(h) / T)[token] for each row, ``chunk`` rows of logits at a time."""
    out = []
    for start in range(0, hidden.shape[0], chunk):
        rows = hidden[start:start + chunk]
        logits = torch.nn.functional.linear(rows.to(head.weight.dtype), head.weight, head.bias).float() / temperature
        picked = logits.gather(1, token_ids[start:start + chunk, None]).squeeze(1)
        out.append(picked - logits.logsumexp(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
