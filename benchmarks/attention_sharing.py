"""One attention call over a shared row, forward and backward: K padded rows vs segments vs the dense mask.

The attention alone, no linear maps, at Qwen3-8B's heads (32 query, 8 KV heads of 128) and the
science-like shape: prompt 1024, completion 1024, K = 8, so one shared row of T = P + K L = 9,216
positions against K padded rows of P + L. Layouts:
- ``padded``: K rows, causal SDPA (its flash backend on GPUs), the prefix in every row;
- ``segments-<kernel>``: the shared row by caopd.training.segment_attention, kernel sdpa (one call
  per row), flex (flex_attention with a BlockMask, compiled) or flash (flash-attn varlen, if installed);
- ``mask``: the shared row with the dense [T, T] mask through SDPA (the old path, for reference).
Every layout's output and the gradients of the shared q, k, v are checked against the padded
rows' (the same pairs; the prefix's rows counted once), so a leaky layout fails here too.

    python -m benchmarks.attention_sharing            # CUDA, bf16 (make gpu-check)
    python -m benchmarks.attention_sharing --small    # any device, a small shape: the check only
Writes benchmarks/results/attention_sharing_<device>.{json,md} (not with --small).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

import torch

from benchmarks.kernel_kl import RESULTS, device_name, git_sha


def shared_qkv(prompt: int, completion: int, k: int, heads: int, kv_heads: int, dim: int, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = prompt + k * completion
    q = torch.randn(1, heads, t, dim, generator=g)
    kv = [torch.randn(1, kv_heads, t, dim, generator=g) for _ in range(2)]
    return [x.to(device, dtype).requires_grad_() for x in (q, *kv)]


def padded_index(prompt: int, completion: int, k: int, device) -> torch.Tensor:
    """[K, P + L]: the shared row's positions that make padded row i (the prefix, then completion i)."""
    prefix = torch.arange(prompt, device=device)
    return torch.stack([torch.cat([prefix, prompt + i * completion + torch.arange(completion, device=device)])
                        for i in range(k)])


def run_layout(layout: str, q, k, v, prompt: int, completion: int, kk: int) -> torch.Tensor:
    """The shared row's attention output [1, H, T, D] by ``layout``."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from caopd.training.segment_attention import ROWS, RowSegments, SharedLayout
    from caopd.training.shared_prefix import dense_mask

    scale = q.shape[-1] ** -0.5
    if layout == "padded":
        index = padded_index(prompt, completion, kk, q.device)
        rows = [x[0][:, index].transpose(0, 1) for x in (q, k, v)]  # [K, H, P + L, D]
        out = sdpa(*rows, is_causal=True, scale=scale, enable_gqa=True)
        prefix = out[0, :, :prompt]  # the prefix's rows counted once
        completions = out[:, :, prompt:].transpose(0, 1).reshape(q.shape[1], kk * completion, q.shape[-1])
        return torch.cat([prefix, completions], dim=1)[None]
    shared = SharedLayout([RowSegments(prompt, (completion,) * kk)], prompt + kk * completion,
                          kernel=layout.removeprefix("segments-"))
    if layout == "mask":
        mask = dense_mask(shared.segment_ids).unsqueeze(1).to(q.device)
        return sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return ROWS[shared.kernel](q, k, v, shared, scale)


def measure(layout: str, args, device, dtype) -> dict:
    q, k, v = shared_qkv(args.prompt, args.completion, args.k, args.heads, args.kv_heads, args.dim, dtype, device)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    backward = not (layout == "segments-flex" and device.type == "cpu")  # no flex backward on CPU

    def once():
        for x in (q, k, v):
            x.grad = None
        with torch.set_grad_enabled(backward):
            out = run_layout(layout, q, k, v, args.prompt, args.completion, args.k)
        if backward:
            out.backward(grad)
        return out

    for _ in range(args.warmup):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    start = time.perf_counter()
    for _ in range(args.repeat):
        out = once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.repeat
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if device.type == "cuda" else None
    return {"layout": layout, "seconds": seconds, "peak_extra_gib": peak, "out": out.detach().float(),
            "grads": [x.grad.float() if backward else None for x in (q, k, v)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="a small shape on any device: the check only")
    p.add_argument("--layouts", nargs="+", help="default: padded, segments-sdpa, segments-flex (and "
                   "segments-flash where flash-attn is installed on a GPU), mask")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.small and device.type != "cuda":
        sys.exit("attention_sharing: the full shape is for a GPU (T = 9,216 at 32 heads); use --small here")
    shape = dict(prompt=24, completion=10, k=3, heads=4, kv_heads=2, dim=16, warmup=1, repeat=1) if args.small \
        else dict(prompt=1024, completion=1024, k=8, heads=32, kv_heads=8, dim=128, warmup=2, repeat=5)
    vars(args).update(shape)
    dtype = torch.float32 if args.small or device.type == "cpu" else torch.bfloat16
    layouts = args.layouts or ["padded", "segments-sdpa", "segments-flex", "mask"]
    if not args.layouts and device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        layouts.insert(3, "segments-flash")
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2  # relative to the largest entry
    results, failed = [], False
    for layout in layouts:
        try:
            results.append(measure(layout, args, device, dtype))
        except Exception as e:  # report and go on: one missing kernel must not hide the others' numbers
            print(f"attention_sharing: {layout} failed: {type(e).__name__}: {str(e).splitlines()[0]}")
            failed = True
    reference = next(r for r in results if r["layout"] == "padded")
    rows = []
    for r in results:
        pairs = [(r["out"], reference["out"])] + [(a, b) for a, b in zip(r["grads"], reference["grads"])
                                                   if a is not None]
        error = max(float((a - b).abs().max() / b.abs().max()) for a, b in pairs)
        failed |= error > tolerance
        rows.append({"layout": r["layout"], "seconds": r["seconds"], "peak_extra_gib": r["peak_extra_gib"],
                     "vs_padded": r["seconds"] / reference["seconds"], "max_relative_error": error,
                     "backward": r["grads"][0] is not None})
        print(json.dumps(rows[-1]), flush=True)
    if not args.small:
        name = device_name("cuda")
        stem = RESULTS / f"attention_sharing_{'-'.join(name.lower().split())}"
        head = (f"# One attention call over a shared row, forward and backward\n\n{name}; commit {git_sha()}; "
                f"torch {torch.__version__}; bf16; prompt {args.prompt}, completion {args.completion}, K {args.k} "
                f"(T = {args.prompt + args.k * args.completion}); {args.heads} query / {args.kv_heads} KV heads of "
                f"{args.dim}.\n\n| layout | ms | / padded | peak extra GiB | max relative error |\n"
                "|---|---|---|---|---|\n")
        table = "".join(f"| {r['layout']} | {1000 * r['seconds']:.1f} | {r['vs_padded']:.2f} | "
                        f"{r['peak_extra_gib']:.2f} | {r['max_relative_error']:.1e} |\n" for r in rows)
        RESULTS.mkdir(exist_ok=True)
        stem.with_suffix(".md").write_text(head + table)
        stem.with_suffix(".json").write_text(json.dumps({"device": name, "commit": git_sha(), "shape": shape,
                                                         "rows": rows}, indent=1) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
