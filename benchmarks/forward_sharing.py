"""One CaOPD loss step, padded vs packed vs shared prefix: tokens through the models, seconds, activation memory.

The step is what the trainer does per micro-batch: the student forward and backward, the teacher
forward, the fused loss over the full 151,936 vocabulary. With ``--checkpointing`` (gradient
checkpointing on, as the packaged GPU configs run) the shared layouts are the ones that run there:
segments (the trainer's choice: attention by segments, no [T, T] mask; the teacher on its prefix
cache) and the dense 4-D mask for reference; the prefix cache cannot run (no KV cache under
checkpointing), and flex_attention has no backward on CPU. The model is Qwen3-shaped with random
weights: Qwen3-0.6B's widths (hidden 1024, intermediate 3072, 16 query / 8 KV heads of 128,
tied embeddings; from its published config.json) with fewer layers so that it fits this CPU.
Each setting runs in a fresh process (peak RSS is per process); a small warm-up step is excluded.
"peak extra" is the peak RSS above the step's start; "activation" is that less the parameters'
gradients (fp32, allocated by the step's backward, the same for every layout).

    python -m benchmarks.forward_sharing                  # both settings, 4 layers, CPU
    python -m benchmarks.forward_sharing --checkpointing  # gradient checkpointing on
    python -m benchmarks.forward_sharing --layers 28      # the whole 0.6B depth (GPU)
Writes benchmarks/results/forward_sharing[_checkpointing]_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
NOTES = """Notes. "tokens" counts the positions both models process (padding included). packed puts
all sequences of a side in one row without padding; under SDPA transformers turns the restarting
position ids into a dense block-diagonal mask (attention over the whole row, masked pairs included;
with flash-attn installed, `flash_attention_2` runs it as varlen). With the equal completion lengths
here packing removes no tokens. shared-mask puts
a prompt's prefix and its K completions in one row with a 4-D mask through SDPA, which with a dense
mask still computes every (query, key) pair of the row, masked ones included: attention costs
(P + K L)^2. shared-cache forwards the prefix once and runs the K completions as a batch on its
repeated keys and values: K L (P + L), the least there is; the trainer takes it unless gradient
checkpointing is on (transformers then turns the KV cache off) or FSDP runs, where it takes
shared-segments: one row a prompt like shared-mask, with the attention computed by segments (the
prefix causal, each completion against [prefix | itself]): K L (P + L/2) + P^2/2 pairs, no mask."""
KINDS = ("padded", "packed", "shared-mask", "shared-cache")
CHECKPOINTED_KINDS = ("padded", "shared-segments", "shared-mask")
CHECKPOINTED_NOTES = """With gradient checkpointing on. The fused loss over the completion tokens is the same work
in every layout ("of which the loss alone": the loss timed by itself in the same process), so a
step's ratio cannot reach the tokens' ratio: where the loss is a fifth of the padded step, 0.30x
the tokens floors the step at about 0.2 + 0.3 x 0.8 = 0.44x. The models alone ("the step less the
loss") follow the tokens and the attention pairs. Segments need P^2/2 + K L (P + L/2) pairs, but
the sdpa kernel (one call per row and a mask; PyTorch's CPU kernel skips no masked block) computes
each completion's whole [L x (P + L)] block: 0.48x the padded rows' causal pairs at the tool-use
shape, and 1.6x at the science shape, so there the trainer keeps the
padded rows (shared_prefix.sharing_pays, whose CPU attention weight is fitted to this table);
flex_attention and flash-attn varlen skip the masked blocks on GPUs. The teacher runs on its prefix
cache (no gradients: no checkpointing)."""
SETTINGS = {"a (tool-use-like)": dict(prompt=1024, completion=256, k=8),
            "b (science-like)": dict(prompt=256, completion=1024, k=8)}


def qwen3_model(layers: int, seed: int = 0, checkpointing: bool = False):
    from transformers import AutoModelForCausalLM, Qwen3Config

    from caopd.training.segment_attention import use_segment_attention

    config = Qwen3Config(vocab_size=151_936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                         max_position_embeddings=40_960, rope_theta=1_000_000.0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    use_segment_attention(model)  # SDPA for every call but the segments path's
    if checkpointing:
        model.train()
        model.gradient_checkpointing_enable()
    return model


def batches(prompt: int, completion: int, k: int, seed: int = 0):
    """The same K completions of one prompt as a padded batch and as a shared-prefix batch."""
    from caopd.training.loss import DistillationBatch
    from caopd.training.shared_prefix import SharedPrefixBatch

    g = torch.Generator().manual_seed(seed)
    student_prefix = torch.randint(10, 150_000, (prompt,), generator=g).tolist()
    teacher_prefix = torch.randint(10, 150_000, (prompt,), generator=g).tolist()
    completions = [torch.randint(10, 150_000, (completion,), generator=g).tolist() for _ in range(k)]
    student_ids = torch.tensor([student_prefix + c for c in completions])
    teacher_ids = torch.tensor([teacher_prefix + c for c in completions])
    ones = torch.ones_like(student_ids)
    padded = DistillationBatch(student_ids, ones, teacher_ids, ones.clone(), [prompt] * k, [prompt] * k,
                               [completion] * k)
    shared = SharedPrefixBatch([student_prefix], [teacher_prefix], [completions], 0)
    return padded, shared


def step(kind: str, student, teacher, batch) -> None:
    from caopd.training.loss import distillation_loss
    from caopd.training.shared_prefix import shared_distillation_loss

    student.zero_grad(set_to_none=True)
    if kind in ("padded", "packed"):
        result = distillation_loss(student, teacher, batch, skip_tokens=3, impl="torch", layout=kind)
    else:  # "shared-mask", "shared-cache" or "shared-segments" (the teacher then on its prefix cache)
        path = kind.removeprefix("shared-")
        result = shared_distillation_loss(student, teacher, batch, skip_tokens=3, impl="torch", path=path,
                                          teacher_path="cache" if path == "segments" else path, kernel="sdpa")
    result.loss.backward()


def loss_seconds(student, teacher, tokens: int) -> float:
    """The fused loss alone over `tokens` completion tokens (the same work for every layout)."""
    from caopd_kernels import fused_linear_kl

    g = torch.Generator().manual_seed(0)
    hidden = student.config.hidden_size
    student_rows = torch.randn(tokens, hidden, generator=g).requires_grad_()
    teacher_rows = torch.randn(tokens, hidden, generator=g)
    start = time.perf_counter()
    fused_linear_kl(student_rows, student.get_output_embeddings().weight, teacher_rows,
                    teacher.get_output_embeddings().weight, impl="torch", reduction="sum").backward()
    return time.perf_counter() - start


def worker(kind: str, setting: str, layers: int, checkpointing: bool = False) -> dict:
    from benchmarks.kernel_kl import PeakRSS, rss_bytes
    from caopd.training.process_memory import release_freed_memory

    release_freed_memory()  # the allocator as the trainer sets it: freed tensors leave resident memory
    student = qwen3_model(layers, checkpointing=checkpointing)
    teacher = qwen3_model(layers, seed=1).requires_grad_(False)
    warm_padded, warm_shared = batches(64, 16, 2)
    unshared = kind in ("padded", "packed")
    step(kind, student, teacher, warm_padded if unshared else warm_shared)
    padded, shared = batches(**SETTINGS[setting])
    batch = padded if unshared else shared
    if kind == "padded":
        tokens = batch.student_ids.numel() + batch.teacher_ids.numel()
    elif kind == "packed":
        tokens = int(batch.student_attention.sum() + batch.teacher_attention.sum())
    elif kind in ("shared-mask", "shared-segments"):
        tokens = batch.student.ids.numel() + batch.teacher.ids.numel()
    else:
        tokens = sum(g.prefix.numel() + g.completions.numel() for g in batch.student_groups + batch.teacher_groups)
    before = rss_bytes()
    with PeakRSS() as peak:
        start = time.perf_counter()
        step(kind, student, teacher, batch)
        seconds = time.perf_counter() - start
    shape = SETTINGS[setting]
    loss = loss_seconds(student, teacher, shape["k"] * (shape["completion"] - 3))  # skip_tokens=3
    return {"kind": kind, "setting": setting, "tokens": tokens, "seconds": seconds, "loss_seconds": loss,
            "peak_extra_gib": (peak.peak - before) / 2**30,
            "activation_gib": (peak.peak - before - 4 * sum(p.numel() for p in student.parameters())) / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "SETTING"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.layers, args.checkpointing)))
        return
    rows, kinds = [], CHECKPOINTED_KINDS if args.checkpointing else KINDS
    for setting in SETTINGS:
        for kind in kinds:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.forward_sharing", "--layers", str(args.layers),
                                   *(["--checkpointing"] if args.checkpointing else []), "--worker", kind, setting],
                                  capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if proc.returncode:
                rows.append({"kind": kind, "setting": setting, "error": proc.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    from benchmarks.kernel_kl import device_name, git_sha

    device, commit = device_name("cuda" if torch.cuda.is_available() else "cpu"), git_sha()
    lines = ["| setting | layout | tokens through the models | seconds | of which the loss alone | peak extra GiB "
             "| activation GiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['kind']} | " + (f"error: {r['error']} | | | | |" if "error" in r else
                                                               f"{r['tokens']} | {r['seconds']:.1f} | "
                                                               f"{r['loss_seconds']:.1f} | "
                                                               f"{r['peak_extra_gib']:.2f} | "
                                                               f"{r['activation_gib']:.2f} |"))
    for setting in SETTINGS:
        by_kind = {r["kind"]: r for r in rows if r["setting"] == setting and "error" not in r}
        pad = by_kind.get("padded")
        for kind in kinds[1:]:
            if pad and kind in by_kind:
                sh = by_kind[kind]
                lines.append(f"\n{setting}: {kind}/padded tokens {sh['tokens'] / pad['tokens']:.2f}, time "
                             f"{sh['seconds'] / pad['seconds']:.2f} (the models alone, the step less the loss: "
                             f"{(sh['seconds'] - sh['loss_seconds']) / (pad['seconds'] - pad['loss_seconds']):.2f}), "
                             f"activation memory {sh['activation_gib'] / pad['activation_gib']:.2f}")
    table = "\n".join(lines)
    stem = RESULTS / (f"forward_sharing{'_checkpointing' if args.checkpointing else ''}_"
                      f"{'cuda' if torch.cuda.is_available() else 'cpu'}")
    RESULTS.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"device": device, "commit": commit, "layers": args.layers,
                                                     "settings": SETTINGS, "rows": rows}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(f"# One CaOPD loss step: padded vs packed vs shared prefix\n\n{device}; commit "
                                       f"{commit}; Qwen3-0.6B widths, {args.layers} layers, random weights, "
                                       f"fp32{', gradient checkpointing on' if args.checkpointing else ''}."
                                       f"\n\n{table}\n\n"
                                       f"{CHECKPOINTED_NOTES if args.checkpointing else NOTES}\n")
    print(table)


if __name__ == "__main__":
    main()
