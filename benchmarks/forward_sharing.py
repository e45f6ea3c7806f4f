"""One CaOPD loss step, padded vs packed vs shared prefix: tokens through the models, seconds, activation memory.

The step is what the trainer does per micro-batch: the student forward and backward, the teacher
forward, the fused loss over the full 151,936 vocabulary. The model is Qwen3-shaped with random
weights: Qwen3-0.6B's widths (hidden 1024, intermediate 3072, 16 query / 8 KV heads of 128,
tied embeddings; from its published config.json) with fewer layers so that it fits this CPU.
Each setting runs in a fresh process (peak RSS is per process); a small warm-up step is excluded.
"peak extra" is the peak RSS above the step's start; "activation" is that less the parameters'
gradients (fp32, allocated by the step's backward, the same for every layout).

    python -m benchmarks.forward_sharing                  # both settings, 4 layers, CPU
    python -m benchmarks.forward_sharing --layers 28      # the whole 0.6B depth (GPU)
Writes benchmarks/results/forward_sharing_<device>.{json,md}.
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
checkpointing is on (transformers then turns the KV cache off), where it takes shared-mask."""
KINDS = ("padded", "packed", "shared-mask", "shared-cache")
SETTINGS = {"a (tool-use-like)": dict(prompt=1024, completion=256, k=8),
            "b (science-like)": dict(prompt=256, completion=1024, k=8)}


def qwen3_model(layers: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=151_936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                         max_position_embeddings=40_960, rope_theta=1_000_000.0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


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
    else:  # "shared-mask" or "shared-cache"
        result = shared_distillation_loss(student, teacher, batch, skip_tokens=3, impl="torch",
                                          path=kind.removeprefix("shared-"))
    result.loss.backward()


def worker(kind: str, setting: str, layers: int) -> dict:
    from benchmarks.kernel_kl import PeakRSS, rss_bytes

    student, teacher = qwen3_model(layers), qwen3_model(layers, seed=1).requires_grad_(False)
    warm_padded, warm_shared = batches(64, 16, 2)
    unshared = kind in ("padded", "packed")
    step(kind, student, teacher, warm_padded if unshared else warm_shared)
    padded, shared = batches(**SETTINGS[setting])
    batch = padded if unshared else shared
    if kind == "padded":
        tokens = batch.student_ids.numel() + batch.teacher_ids.numel()
    elif kind == "packed":
        tokens = int(batch.student_attention.sum() + batch.teacher_attention.sum())
    elif kind == "shared-mask":
        tokens = batch.student.ids.numel() + batch.teacher.ids.numel()
    else:
        tokens = sum(g.prefix.numel() + g.completions.numel() for g in batch.student_groups + batch.teacher_groups)
    before = rss_bytes()
    with PeakRSS() as peak:
        start = time.perf_counter()
        step(kind, student, teacher, batch)
        seconds = time.perf_counter() - start
    return {"kind": kind, "setting": setting, "tokens": tokens, "seconds": seconds,
            "peak_extra_gib": (peak.peak - before) / 2**30,
            "activation_gib": (peak.peak - before - 4 * sum(p.numel() for p in student.parameters())) / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--worker", nargs=2, metavar=("KIND", "SETTING"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.layers)))
        return
    rows = []
    for setting in SETTINGS:
        for kind in KINDS:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.forward_sharing", "--layers", str(args.layers),
                                   "--worker", kind, setting], capture_output=True, text=True,
                                  cwd=Path(__file__).resolve().parents[1])
            if proc.returncode:
                rows.append({"kind": kind, "setting": setting, "error": proc.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    from benchmarks.kernel_kl import device_name, git_sha

    device, commit = device_name("cuda" if torch.cuda.is_available() else "cpu"), git_sha()
    lines = ["| setting | layout | tokens through the models | seconds | peak extra GiB | activation GiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['kind']} | " + (f"error: {r['error']} | | | |" if "error" in r else
                                                               f"{r['tokens']} | {r['seconds']:.1f} | "
                                                               f"{r['peak_extra_gib']:.2f} | "
                                                               f"{r['activation_gib']:.2f} |"))
    for setting in SETTINGS:
        by_kind = {r["kind"]: r for r in rows if r["setting"] == setting and "error" not in r}
        pad = by_kind.get("padded")
        for kind in KINDS[1:]:
            if pad and kind in by_kind:
                sh = by_kind[kind]
                lines.append(f"\n{setting}: {kind}/padded tokens {sh['tokens'] / pad['tokens']:.2f}, time "
                             f"{sh['seconds'] / pad['seconds']:.2f}, "
                             f"activation memory {sh['activation_gib'] / pad['activation_gib']:.2f}")
    table = "\n".join(lines)
    stem = RESULTS / f"forward_sharing_{'cuda' if torch.cuda.is_available() else 'cpu'}"
    RESULTS.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"device": device, "commit": commit, "layers": args.layers,
                                                     "settings": SETTINGS, "rows": rows}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(f"# One CaOPD loss step: padded vs packed vs shared prefix\n\n{device}; commit "
                                       f"{commit}; Qwen3-0.6B widths, {args.layers} layers, random weights, "
                                       f"fp32.\n\n{table}\n\n{NOTES}\n")
    print(table)


if __name__ == "__main__":
    main()
