"""TRL's SDFTTrainer step by step in each distillation_mode: its own loss against caopd's fused loss
(caopd_kernels.integrations.trl); for full_logits also Liger's fused linear JSD in the same slot, and
use_liger_kernel=True.

Modes (TRL's settings otherwise its defaults): full_logits (alpha 0.5, JSD), sampled_token (alpha 1,
reverse KL on the realized tokens: SDPO's default), topk_logits (SDFT's default: the student's top 100,
alpha 0.5, no tail bucket).

The model is Qwen3-shaped with random weights: Qwen3-0.6B's widths (hidden 1024, 16 query / 8 KV
heads of 128, tied embeddings, vocabulary 151,936) with fewer layers so that it fits this CPU,
saved to a temporary folder with the real Qwen3 tokenizer and loaded by TRL from there. A random
model almost never samples the end token, so every completion has max_completion_length tokens.

Variants (each in a fresh process; peak RSS is per process):
  trl          TRL's own full_logits path: both models' [B, T, V] logits, log-softmax, divergence.
  caopd        use_fused_linear_kl(trainer): one fused_linear_kl call per batch.
  liger-jsd    the same slot with Liger-Kernel's LigerFusedLinearJSDLoss, called once per sequence
               (Liger averages over all tokens of a call, TRL per sequence) — what a codebase using
               Liger's JSD does; TRL 1.16 itself has no such path.
  trl-liger    use_liger_kernel=True: transformers patches the model with Liger's Triton kernels
               (RMSNorm, SwiGLU, RoPE); the loss stays TRL's own. Triton needs a GPU.

"loss step" is the time in training_step less its generation (_prepare_inputs): the forwards,
the loss and the backward. "peak extra" is the peak RSS above the RSS before train(), sampled
every 2 ms (CPU), or torch.cuda.max_memory_allocated above the memory before train() (GPU).

    python -m benchmarks.trl_step                         # CPU: 2 layers, B 4, completion 512, 3 modes
    python -m benchmarks.trl_step --layers 28 --batch 8 --completion 1024   # a GPU, the whole 0.6B
Writes benchmarks/results/trl_step_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("trl", "caopd", "liger-jsd", "trl-liger")
MODES = ("full_logits", "sampled_token", "topk_logits")
MODE_SETTINGS = {"full_logits": dict(distillation_alpha=0.5), "sampled_token": dict(distillation_alpha=1.0),
                 "topk_logits": dict(distillation_alpha=0.5, distillation_topk=100, distillation_add_tail=False)}
FULL_LOGITS_ONLY = ("liger-jsd", "trl-liger")  # Liger's JSD takes both models' hidden states and heads
PROMPTS = ["Solve 2+2 and explain each step.", "Name the capital of France and one fact about it.",
           "What is 3*7? Show the multiplication.", "Spell 'cat' backwards, letter by letter."]
CONTEXTS = ["Example answer: 4.", "Example answer: Paris.", "Example answer: 21.", "Example answer: tac."]
NOTES = """Notes. trl: TRL's own loss in the mode; caopd: `use_fused_linear_kl(trainer)`; liger-jsd: Liger's
LigerFusedLinearJSDLoss in the same slot, one call per sequence (TRL 1.16 has no such path: its
`use_liger_kernel=True` only patches the model's layers); trl-liger: `use_liger_kernel=True`, whose
Triton kernels need a GPU. "loss step" = training_step less generation: both forwards, the loss,
the backward. "peak extra" = peak RSS above the RSS before train() (CPU; it includes the
gradients and AdamW's states, the same for every variant) or the CUDA allocator's peak above the
memory before train() (GPU). The same seed gives the same rollouts, so the losses must agree."""


def save_model(path: Path, layers: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    from caopd.modeling.models import qwen3_tokenizer_dir

    config = Qwen3Config(vocab_size=151_936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                         max_position_embeddings=40_960, rope_theta=1_000_000.0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()), local_files_only=True).save_pretrained(path)


def liger_per_sequence(completion: int):
    """fused_linear_kl's signature, computed by Liger's LigerFusedLinearJSDLoss one sequence at a time."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    def loss_fn(student_hidden, student_weight, teacher_hidden, teacher_weight, weights, *, divergence, beta,
                temperature, student_bias=None, teacher_bias=None, reduction, impl, memory_budget,
                return_token_losses):
        liger_beta = {"forward": 0.0, "reverse": 1.0}.get(divergence, beta)
        jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=liger_beta,
                                      temperature=temperature, compiled=student_hidden.is_cuda)
        sequences = student_hidden.shape[0] // completion
        total = student_hidden.new_zeros((), dtype=torch.float32)
        for b in range(sequences):
            rows = slice(b * completion, (b + 1) * completion)
            counted = weights[rows] > 0
            if counted.any():
                labels = torch.zeros(int(counted.sum()), dtype=torch.long, device=student_hidden.device)
                total = total + jsd(student_hidden[rows][counted], student_weight, teacher_hidden[rows][counted],
                                    teacher_weight, labels) / sequences
        return total, torch.zeros_like(weights)  # the token-mean metric is not computed here

    return loss_fn


def worker(variant: str, model_dir: str, batch: int, completion: int, steps: int, mode: str) -> dict:
    from caopd_kernels.integrations import trl as integration
    from datasets import Dataset
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from benchmarks.kernel_kl import PeakRSS, rss_bytes

    cuda = torch.cuda.is_available()
    args = SDFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, num_generations=2,
                      max_completion_length=completion, max_steps=steps, learning_rate=1e-5, logging_steps=1,
                      report_to="none", save_strategy="no", bf16=cuda, use_cpu=not cuda, seed=0,
                      distillation_mode=mode, use_liger_kernel=variant == "trl-liger", disable_tqdm=True,
                      **MODE_SETTINGS[mode])
    dataset = Dataset.from_dict({"prompt": PROMPTS * batch, "privileged_context": CONTEXTS * batch})
    trainer = SDFTTrainer(model=model_dir, args=args, train_dataset=dataset)
    if variant in ("caopd", "liger-jsd"):
        integration.use_fused_linear_kl(trainer)
    if variant == "liger-jsd":
        integration.fused_linear_kl = liger_per_sequence(completion)
    times = {"step": [], "generation": []}

    def timed(name, fn):
        def run(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            return out
        return run

    trainer.training_step = timed("step", trainer.training_step)
    trainer._prepare_inputs = timed("generation", trainer._prepare_inputs)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
    with PeakRSS() as peak:
        trainer.train()
    peak_bytes = torch.cuda.max_memory_allocated() if cuda else peak.peak
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    loss_steps = [s - g for s, g in zip(times["step"], times["generation"])][1:]  # the first step warms up
    whole_steps = times["step"][1:]
    return {"mode": mode, "variant": variant, "loss_step_s": statistics.median(loss_steps),
            "step_s": statistics.median(whole_steps), "peak_extra_gib": (peak_bytes - before) / 2**30,
            "losses": losses, "tokens_per_step": batch * completion}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="sequences per step (2 completions per prompt)")
    p.add_argument("--completion", type=int, default=512, help="max_completion_length (every completion is this long)")
    p.add_argument("--steps", type=int, default=3, help="steps per variant; the first is a warm-up")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help=f"{', '.join(FULL_LOGITS_ONLY)} run in full_logits only")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--worker", nargs=3, metavar=("VARIANT", "MODEL_DIR", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        variant, model_dir, mode = args.worker
        print(json.dumps(worker(variant, model_dir, args.batch, args.completion, args.steps, mode)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as model_dir:
        save_model(Path(model_dir), args.layers)
        for mode in args.modes:
            for variant in args.variants:
                if mode != "full_logits" and variant in FULL_LOGITS_ONLY:
                    continue
                proc = subprocess.run([sys.executable, "-m", "benchmarks.trl_step", "--batch", str(args.batch),
                                       "--completion", str(args.completion), "--steps", str(args.steps),
                                       "--worker", variant, model_dir, mode], capture_output=True, text=True,
                                      cwd=Path(__file__).resolve().parents[1])
                if proc.returncode:
                    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
                    rows.append({"mode": mode, "variant": variant,
                                 "error": lines[-1][:300] if lines else f"exit {proc.returncode}"})
                else:
                    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    write_results(rows, args)


def write_results(rows: list[dict], args) -> None:
    from benchmarks.kernel_kl import device_name, git_sha

    device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    device, commit = device_name(device_kind), git_sha()
    lines = ["| mode | variant | loss step s | whole step s (with generation) | peak extra GiB | losses per step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mode = r.get("mode", "full_logits")
        if "error" in r:
            lines.append(f"| {mode} | {r['variant']} | error: {r['error']} | | | |")
        else:
            losses = ", ".join(f"{x:.4f}" for x in r["losses"])
            lines.append(f"| {mode} | {r['variant']} | {r['loss_step_s']:.2f} | {r['step_s']:.2f} | "
                         f"{r['peak_extra_gib']:.2f} | {losses} |")
    ok = {(r.get("mode", "full_logits"), r["variant"]): r for r in rows if "error" not in r}
    lines.append("")
    for (mode, variant), ours in ok.items():
        base = ok.get((mode, "trl"))
        if variant != "trl" and base is not None:
            lines.append(f"{mode}: {variant}/trl loss step time {ours['loss_step_s'] / base['loss_step_s']:.2f}, "
                         f"peak extra memory {ours['peak_extra_gib'] / base['peak_extra_gib']:.2f}  ")
    table = "\n".join(lines)
    stem = RESULTS / f"trl_step_{device_kind}"
    RESULTS.mkdir(exist_ok=True)
    settings = dict(layers=args.layers, batch=args.batch, completion=args.completion, steps=args.steps,
                    mode_settings={m: MODE_SETTINGS[m] for m in args.modes})
    stem.with_suffix(".json").write_text(json.dumps({"device": device, "commit": commit, **settings, "rows": rows},
                                                    indent=1) + "\n")
    stem.with_suffix(".md").write_text(
        f"# TRL SDFTTrainer steps in each distillation_mode: TRL's loss vs caopd's fused loss\n\n{device}; "
        f"commit {commit}; Qwen3-0.6B widths, {args.layers} layers, vocabulary 151,936, random weights; "
        f"{args.batch} sequences of {args.completion} completion tokens a step; full_logits alpha 0.5 (JSD), "
        "sampled_token alpha 1 (reverse KL), topk_logits alpha 0.5 and the student's top 100 without a tail; "
        f"{'bf16 autocast' if device_kind == 'cuda' else 'fp32'}; median of steps 2..{args.steps}.\n\n{table}\n\n"
        f"{NOTES}\n")
    print(table)


if __name__ == "__main__":
    main()
