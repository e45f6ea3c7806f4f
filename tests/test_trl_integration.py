"""caopd_kernels.integrations.trl against the real TRL (issue 18, item 4).

Each case trains the same tiny Qwen3 (random weights, saved locally, the real Qwen3 tokenizer and
its 151,936-row lm_head) twice with the same seed: TRL's own distillation_mode="full_logits" path
and the fused one. Every step's loss, the logged token-mean metric and the parameters after two
SGD steps must agree. Deliberate bugs these catch: a token mean instead of TRL's per-sequence
mean, alpha mapped to the wrong divergence or mixture, the skipped tokens counted, the
temperature left out, hidden states shifted by one position, the clip ratio ignored, SDPO's
per-sequence mask dropped.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration needs trl (pip install -e .[trl]; make test installs it)")

from caopd_kernels.integrations.trl import divergence_for_alpha, use_fused_linear_kl  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl.experimental.sdft import SDFTConfig, SDFTTrainer  # noqa: E402
from trl.experimental.sdpo import SDPOConfig, SDPOTrainer  # noqa: E402

from caopd.modeling.models import qwen3_tokenizer_dir, tiny_qwen3_config  # noqa: E402

PROMPTS = ["Solve 2+2.", "Name the capital of France.", "What is 3*7?", "Spell 'cat' backwards."]
CONTEXTS = ["Example answer: 4.", "Example answer: Paris.", "Example answer: 21.", "Example answer: tac."]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """TRL's trainers set accelerate's process-wide state (bf16 mixed precision in one test); later
    tests in the same process that build their own Accelerator need it cleared."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen3 with the real vocabulary, saved like a downloaded checkpoint. Its lm_head is
    scaled up so that its distributions are peaked (near-uniform ones make forward and reverse KL
    agree to second order), and one token id in six ends a completion, so that completions differ
    in length (a token mean and TRL's per-sequence mean then differ)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-qwen3-real-vocab")
    tokenizer = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()), local_files_only=True)
    config = tiny_qwen3_config(151_936, hidden_size=32, layers=1, heads=2, kv_heads=1, head_dim=16,
                               intermediate_size=64)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                            *range(5, 151_643, 6)]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


class Recorded:
    """The losses compute_loss returned and the metrics logged, step by step."""

    def __init__(self, trainer):
        self.losses, self.metrics, self.modes = [], [], []
        compute_loss, log_metric = trainer.compute_loss, trainer._log_self_distillation_metric

        def recording_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            self.losses.append(float(loss.detach()))
            return loss

        def recording_metric(mode, value):
            self.metrics.append(float(value))
            self.modes.append(mode)
            return log_metric(mode, value)

        trainer.compute_loss = recording_loss
        trainer._log_self_distillation_metric = recording_metric


def train(trainer_cls, config_cls, model_dir, tmp_path, fused: bool, steps: int = 2, peft_config=None, **settings):
    common = dict(output_dir=str(tmp_path / ("fused" if fused else "plain")), per_device_train_batch_size=4,
                  num_generations=2, max_completion_length=10, max_steps=steps, learning_rate=0.5, optim="sgd",
                  logging_steps=1, report_to="none", save_strategy="no", bf16=False, seed=3,
                  distillation_mode="full_logits")
    args = config_cls(**{**common, **settings})
    dataset = Dataset.from_dict({"prompt": PROMPTS, "privileged_context": CONTEXTS})
    extra = {"reward_funcs": first_of_each_group_succeeds} if trainer_cls is SDPOTrainer else {}
    if peft_config is not None:
        extra["peft_config"] = peft_config
    trainer = trainer_cls(model=model_dir, args=args, train_dataset=dataset, **extra)
    if fused:
        use_fused_linear_kl(trainer, impl="torch")
    recorded = Recorded(trainer)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    end = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return recorded, start, end


def first_of_each_group_succeeds(prompts, **_):
    """SDPO's reward: one success per group, so the other rollout gets a teacher reprompt and the
    successful one (dont_reprompt_on_self_success) gets self_distillation_mask 0."""
    return [1.0 if i % 2 == 0 else 0.0 for i in range(len(prompts))]


def assert_same_training(plain, fused):
    (plain_rec, start, plain_end), (fused_rec, fused_start, fused_end) = plain, fused
    assert len(plain_rec.losses) == len(fused_rec.losses) >= 2
    for step, (a, b) in enumerate(zip(plain_rec.losses, fused_rec.losses)):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-7), f"step {step}: TRL {a}, fused {b}"
    assert fused_rec.metrics == pytest.approx(plain_rec.metrics, rel=1e-4, abs=1e-7)
    assert fused_rec.modes == plain_rec.modes
    assert all(torch.equal(start[n], fused_start[n]) for n in start)
    moved = max(float((plain_end[n] - start[n]).abs().max()) for n in start)
    assert moved > 1e-4, "the parameters barely moved: the comparison below would prove nothing"
    for name in start:
        assert torch.allclose(fused_end[name], plain_end[name], rtol=1e-4, atol=1e-4 * moved), name


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_sdft_steps_equal_trls_full_logits_path(model_dir, tmp_path, alpha):
    settings = dict(distillation_alpha=alpha, num_loss_tokens_to_skip=2, temperature=0.8)
    plain = train(SDFTTrainer, SDFTConfig, model_dir, tmp_path, fused=False, **settings)
    fused = train(SDFTTrainer, SDFTConfig, model_dir, tmp_path, fused=True, **settings)
    assert_same_training(plain, fused)


def test_sdpo_sampled_token_steps_equal_trls(model_dir, tmp_path):
    """distillation_mode="sampled_token" (SDPO's default; reverse KL on the realized tokens): the student's
    log-probabilities by fused_linear_token_logprobs, the same losses, metric and parameters as TRL's (SDFT's
    token mask is the full_logits tests'; SDFT ran equal too, by hand, not kept for the suite's time)."""
    settings = dict(distillation_mode="sampled_token", distillation_alpha=1.0, temperature=0.8)
    plain = train(SDPOTrainer, SDPOConfig, model_dir, tmp_path, fused=False, **settings)
    fused = train(SDPOTrainer, SDPOConfig, model_dir, tmp_path, fused=True, **settings)
    assert_same_training(plain, fused)


def test_sdft_topk_logits_steps_equal_trls(model_dir, tmp_path):
    """distillation_mode="topk_logits" (SDFT's default): the student's top 5 tokens, the teacher scored there,
    with TRL's tail bucket, through fused_linear_kl_topk: the same losses, metric and parameters as TRL's."""
    settings = dict(distillation_mode="topk_logits", distillation_topk=5, distillation_add_tail=True,
                    distillation_alpha=0.5, num_loss_tokens_to_skip=2, temperature=0.8)
    plain = train(SDFTTrainer, SDFTConfig, model_dir, tmp_path, fused=False, **settings)
    fused = train(SDFTTrainer, SDFTConfig, model_dir, tmp_path, fused=True, **settings)
    assert_same_training(plain, fused)


def test_sdft_importance_clipping_with_rollout_logprobs(model_dir, tmp_path):
    """gradient_accumulation_steps not a multiple of steps_per_generation: TRL keeps the rollout
    log-probs and multiplies each token's loss by the clipped ratio (distillation_is_clip)."""
    settings = dict(distillation_alpha=0.5, gradient_accumulation_steps=3, steps_per_generation=2,
                    per_device_train_batch_size=2, distillation_is_clip=1.0001)
    plain = train(SDFTTrainer, SDFTConfig, model_dir, tmp_path, fused=False, **settings)
    fused = train(SDFTTrainer, SDFTConfig, model_dir, tmp_path, fused=True, **settings)
    assert_same_training(plain, fused)


def test_sdpo_steps_equal_trls_full_logits_path(model_dir, tmp_path):
    settings = dict(distillation_alpha=0.5, distillation_is_clip=None, success_reward_threshold=0.5,
                    teacher_model_kind="live")
    plain = train(SDPOTrainer, SDPOConfig, model_dir, tmp_path, fused=False, **settings)
    fused = train(SDPOTrainer, SDPOConfig, model_dir, tmp_path, fused=True, **settings)
    assert_same_training(plain, fused)


def test_sdft_with_lora_adapters_and_the_base_as_teacher(model_dir, tmp_path):
    """PEFT: the student is a PeftModel (LoRA on q and v), the teacher the same model with its
    adapters disabled (TRL's teacher context): the lm_head is found through the wrapper."""
    peft = pytest.importorskip("peft", reason="needs peft (make test installs it)")
    settings = dict(distillation_alpha=1.0, num_loss_tokens_to_skip=1, teacher_model_kind="base")
    lora = dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    plain = train(SDFTTrainer, SDFTConfig, model_dir, tmp_path, fused=False, peft_config=peft.LoraConfig(**lora),
                  **settings)
    fused = train(SDFTTrainer, SDFTConfig, model_dir, tmp_path, fused=True, peft_config=peft.LoraConfig(**lora),
                  **settings)
    assert_same_training(plain, fused)


def test_evaluate_under_no_grad_equals_trls_eval_loss(model_dir, tmp_path):
    """trainer.evaluate() runs compute_loss under no_grad in eval mode: the fused path computes no
    gradients there and reports TRL's eval loss and metric."""
    results = []
    for fused in (False, True):
        args = SDFTConfig(output_dir=str(tmp_path / str(fused)), per_device_eval_batch_size=4, num_generations=2,
                          num_generations_eval=2, max_completion_length=10, report_to="none", bf16=False, seed=3,
                          distillation_mode="full_logits", distillation_alpha=0.5)
        dataset = Dataset.from_dict({"prompt": PROMPTS, "privileged_context": CONTEXTS})
        trainer = SDFTTrainer(model=model_dir, args=args, train_dataset=dataset, eval_dataset=dataset)
        if fused:
            use_fused_linear_kl(trainer, impl="torch")
        recorded = Recorded(trainer)
        results.append((trainer.evaluate()["eval_loss"], recorded.metrics, recorded.modes))
    (plain_loss, plain_metrics, plain_modes), (fused_loss, fused_metrics, fused_modes) = results
    assert plain_loss > 0 and len(plain_metrics) >= 1
    assert fused_modes == plain_modes == ["eval"] * len(plain_metrics)
    assert fused_loss == pytest.approx(plain_loss, rel=1e-4)
    assert fused_metrics == pytest.approx(plain_metrics, rel=1e-4)


def test_alpha_maps_to_trls_divergence():
    assert divergence_for_alpha(0.0) == ("forward", 0.5)
    assert divergence_for_alpha(1.0) == ("reverse", 0.5)
    assert divergence_for_alpha(0.3) == ("jsd", 0.3)
    with pytest.raises(ValueError, match=r"distillation_alpha must be in \[0, 1\]"):
        divergence_for_alpha(1.5)


@pytest.mark.parametrize("trainer_cls, config_cls, settings, message", [
    (SDFTTrainer, SDFTConfig, dict(distillation_mode="topk_logits", distillation_topk=5), None),
    (SDPOTrainer, SDPOConfig, dict(distillation_weight=0.5), "distillation_weight=0.5 mixes in the policy loss"),
])
def test_unsupported_settings_are_one_line_errors(model_dir, tmp_path, trainer_cls, config_cls, settings, message):
    common = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2, max_steps=1,
                  report_to="none", bf16=False, distillation_mode="full_logits")
    extra = {"reward_funcs": first_of_each_group_succeeds} if trainer_cls is SDPOTrainer else {}
    trainer = trainer_cls(model=model_dir, args=config_cls(**{**common, **settings}),
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS, "privileged_context": CONTEXTS}),
                          **extra)
    if message:
        with pytest.raises(ValueError, match=message):
            use_fused_linear_kl(trainer)
    with pytest.raises(TypeError, match="takes an SDFTTrainer or SDPOTrainer"):
        use_fused_linear_kl(object())
    if trainer_cls is SDFTTrainer:  # issue 26, item 12: these failed only at the first step
        trainer.args.distillation_mode = "full_logits"
        with pytest.raises(ValueError, match="impl must be one of"):
            use_fused_linear_kl(trainer, impl="bogus")
        with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes, got -1"):
            use_fused_linear_kl(trainer, memory_budget=-1)
        use_fused_linear_kl(trainer)  # issue 30: a setting changed after wrapping is refused when the loss runs
        trainer.args.use_teacher_server = True
        with pytest.raises(ValueError, match=r"use_teacher_server=True \(set after use_fused_linear_kl\)"):
            trainer.compute_loss(trainer.model, {})
        trainer.args.use_teacher_server = False
        trainer.args.distillation_mode = "a later mode"
        with pytest.raises(ValueError, match=r"distillation_mode is 'a later mode' \(set after use_fused_linear_kl\)"):
            trainer.compute_loss(trainer.model, {})


def test_sdft_under_bf16_autocast_stays_within_bf16_error_of_trls_path(model_dir, tmp_path):
    """TRL's default is bf16=True (autocast), where TRL's lm_head computes bf16 logits and the
    kernel computes in the wider of the hidden state's and the weight's dtypes (fp32 weights here).
    The first step (same rollouts) agrees with TRL's to bf16 precision."""
    settings = dict(distillation_alpha=0.5, bf16=True, use_cpu=not torch.cuda.is_available(), max_steps=1)
    plain = train(SDFTTrainer, SDFTConfig, model_dir, tmp_path, fused=False, **settings)
    fused = train(SDFTTrainer, SDFTConfig, model_dir, tmp_path, fused=True, **settings)
    assert fused[0].losses[0] == pytest.approx(plain[0].losses[0], rel=1e-2)
