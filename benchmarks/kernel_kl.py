"""Benchmark fused_linear_kl forward+backward against the naive reference, Liger and the bare GEMMs.

Each (implementation, N) runs in its own process; a warm-up call at a small N is excluded from
the timing. Memory: on CPU the peak RSS sampled every 2 ms during the timed call, minus the RSS
just before it ("peak extra", which includes the gradients the call returns: "grad" column);
on GPU torch.cuda.max_memory_allocated minus the memory allocated before the call.

    python benchmarks/kernel_kl.py                       # CPU: H=1024, fp32, N in 1024..16384
    python benchmarks/kernel_kl.py --device cuda --dtype bfloat16 --hidden 4096
    python benchmarks/kernel_kl.py --impls torch liger --ns 2048 4096 8192 --baseline 36fcd05
    python benchmarks/kernel_kl.py --impls torch liger_compiled --ns 4096 --repeats 3   # noisy machine: medians
Writes benchmarks/results/kernel_kl_<device>.{json,md,png}. ``--baseline REV`` also runs the torch
implementation as it was at commit REV (its ``kernels/`` extracted as ``caopd_kernels`` ahead of
the installed one), in the same run, as rows ``torch@REV``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
IMPLS = ["gemm_floor", "torch", "triton", "reference", "liger", "liger_compiled", "topk"]
COLORS = {"gemm_floor": "black", "torch": "#1f77b4", "triton": "#9467bd", "reference": "#ff7f0e", "liger": "#d62728",
          "liger_compiled": "#8c564b", "topk": "#2ca02c"}
TOP_K = 20  # the "topk" row: fused_linear_kl_topk against a teacher's top 20 (forward KL, tail bucket)
GIB = 1 << 30


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS in a thread; .peak is the high-water mark while active."""

    def __init__(self, interval=0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def make_inputs(n, hidden, vocab, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    student_hidden = torch.randn(n, hidden, generator=g).to(device, dtype).requires_grad_()
    student_weight = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device, dtype).requires_grad_()
    teacher_hidden = torch.randn(n, hidden, generator=g).to(device, dtype)
    teacher_weight = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device, dtype)
    return student_hidden, student_weight, teacher_hidden, teacher_weight


def topk_teacher(n: int, vocab: int, k: int, device, seed: int = 0):
    """k distinct ids a row (a strided comb, shifted per row) and log-probabilities that capture half the mass."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = (torch.arange(k) * (vocab // k) + torch.randint(0, vocab, (n, 1), generator=g)) % vocab
    logprobs = torch.log_softmax(torch.randn(n, k, generator=g), dim=-1) + torch.log(torch.tensor(0.5))
    return ids.to(device), logprobs.to(device)


def gemm_floor(student_hidden, student_weight, teacher_hidden, teacher_weight, chunk=1024):
    """The four GEMMs the loss cannot avoid (two logits, dH, dW), chunked like the loss: the floor."""
    grad_weight = torch.zeros_like(student_weight, dtype=torch.float32)
    grad_hidden = torch.empty_like(student_hidden)
    with torch.no_grad():
        for s in range(0, student_hidden.shape[0], chunk):
            h = student_hidden[s:s + chunk]
            z = h @ student_weight.T
            u = teacher_hidden[s:s + chunk] @ teacher_weight.T
            grad_hidden[s:s + chunk] = u @ student_weight
            grad_weight.addmm_(z.float().T, h.float())
    return grad_hidden, grad_weight


def step(impl, inputs):
    from caopd_kernels import fused_linear_kl

    if impl == "gemm_floor":
        return gemm_floor(*inputs)
    if impl == "topk":  # the student against a served teacher's top-k: no teacher GEMM
        from caopd_kernels import fused_linear_kl_topk

        n, vocab = inputs[0].shape[0], inputs[1].shape[0]
        ids, logprobs = topk_teacher(n, vocab, TOP_K, inputs[0].device)
        loss = fused_linear_kl_topk(inputs[0], inputs[1], ids, logprobs)
        loss.backward()
        return loss
    if impl.startswith("liger"):  # liger: its default on the device (compiled on CUDA); liger_compiled: always
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        labels = torch.zeros(inputs[0].shape[0], dtype=torch.long, device=inputs[0].device)
        loss_fn = LigerFusedLinearJSDLoss(beta=1.0, weight_hard_loss=0.0, weight_soft_loss=1.0,
                                          compiled=inputs[0].is_cuda or impl == "liger_compiled")
        loss = loss_fn(*inputs, labels)
    else:
        loss = fused_linear_kl(*inputs, impl=impl)
    loss.backward()
    return loss


def worker(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    # warm-up, excluded: a compiled implementation at the timed N (its chunks' shapes compile once)
    warm_n = args.n if args.impl == "liger_compiled" else min(args.n, 128)
    step(args.impl, make_inputs(warm_n, args.hidden, args.vocab, dtype, device, seed=1))
    inputs = make_inputs(args.n, args.hidden, args.vocab, dtype, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        step(args.impl, inputs)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak_extra = torch.cuda.max_memory_allocated() - before
    else:
        with PeakRSS() as peak:
            before = rss_bytes()
            start = time.perf_counter()
            step(args.impl, inputs)
            seconds = time.perf_counter() - start
        peak_extra = peak.peak - before
    grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in inputs[:2] if t.grad is not None)
    flops = (6 if args.impl == "topk" else 8) * args.n * args.hidden * args.vocab  # top-k: no teacher GEMM
    import caopd_kernels

    return {"impl": args.label or args.impl, "n": args.n, "kernels": str(Path(caopd_kernels.__file__).parent),
            "seconds": seconds, "peak_extra_gib": peak_extra / GIB,
            "grad_gib": grad_bytes / GIB, "tflops": flops / seconds / 1e12}


def naive_gib(n, vocab):
    """What the naive reference needs: about eight [N, V] fp32 matrices live at its peak."""
    return 8 * n * vocab * 4 / GIB


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def baseline_kernels(rev: str) -> Path:
    """A folder holding ``kernels/`` as it was at commit ``rev``, as the package ``caopd_kernels``."""
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "archive", rev, "kernels"], capture_output=True, check=True, cwd=repo).stdout
    root = Path(tempfile.mkdtemp(prefix=f"kernels-{rev}-"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    (root / "kernels").rename(root / "caopd_kernels")
    return root


def run_all(args) -> list[dict]:
    from tqdm import tqdm

    impls = [i for i in args.impls if not (i == "triton" and args.device == "cpu")]
    rows = []
    jobs = [(impl, n) for n in args.ns for impl in impls]
    if args.baseline:
        old = baseline_kernels(args.baseline)
        jobs += [(f"torch@{args.baseline}", n) for n in args.ns]
    skipped = {}
    for impl, n in jobs:
        if impl == "reference" and naive_gib(n, args.vocab) > args.memory_limit_gib:
            skipped[impl, n] = f"needs ~{naive_gib(n, args.vocab):.0f} GiB"
        if impl.startswith("liger"):
            try:
                import liger_kernel  # noqa: F401
            except ImportError:
                skipped[impl, n] = "liger-kernel not installed"
    rows += [{"impl": impl, "n": n, "skipped": why} for (impl, n), why in skipped.items()]
    # rounds: every job once per round, so slow spells of a shared machine fall on all of them alike
    rounds = [job for _ in range(args.repeats) for job in jobs if job not in skipped]
    for impl, n in tqdm(rounds, desc="kernel_kl", unit="run"):
        env = dict(os.environ)
        if "@" in impl:  # the baseline's kernels ahead of the installed ones
            env["PYTHONPATH"] = os.pathsep.join([str(old), *filter(None, [env.get("PYTHONPATH")])])
        cmd = [sys.executable, __file__, "--worker", "--impl", impl.split("@")[0], "--label", impl, "--n", str(n),
               "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--dtype", args.dtype, "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            rows.append({"impl": impl, "n": n, "skipped": f"failed (exit {proc.returncode}): "
                         f"{(proc.stderr.strip().splitlines() or ['?'])[-1][:120]}"})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        tqdm.write(json.dumps(rows[-1]))
    return median_rows(rows) if args.repeats > 1 else rows


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per (impl, N): the median run's time and memory (each run's kept under "runs")."""
    out = []
    for key in dict.fromkeys((r["impl"], r["n"]) for r in rows):
        runs = [r for r in rows if (r["impl"], r["n"]) == key]
        done = [r for r in runs if "seconds" in r]
        if not done:
            out.append(runs[0])
            continue
        middle = sorted(done, key=lambda r: r["seconds"])[(len(done) - 1) // 2]
        peak = sorted(r["peak_extra_gib"] for r in done)[(len(done) - 1) // 2]
        out.append({**middle, "peak_extra_gib": peak, "tflops": middle["tflops"],
                    "runs": [[r.get("seconds"), r.get("peak_extra_gib")] for r in runs]})
    return out


def ratios(rows) -> dict:
    by = {(r["impl"], r["n"]): r for r in rows if "seconds" in r}
    out = {}
    for n in sorted({r["n"] for r in rows}):
        ours = by.get(("torch", n)) or by.get(("triton", n))
        if not ours:
            continue
        baselines = sorted({r["impl"] for r in rows if "@" in r["impl"]})
        if ("topk", n) in by:
            out[f"time topk/dense @N={n}"] = by[("topk", n)]["seconds"] / ours["seconds"]
            out[f"memory topk/dense @N={n}"] = by[("topk", n)]["peak_extra_gib"] / ours["peak_extra_gib"]
        for other in ["gemm_floor", "reference", "liger", "liger_compiled", *baselines]:
            if (other, n) in by:
                out[f"time ours/{other} @N={n}"] = ours["seconds"] / by[(other, n)]["seconds"]
                out[f"memory ours/{other} @N={n}"] = ours["peak_extra_gib"] / max(by[(other, n)]["peak_extra_gib"],
                                                                                   1e-9)
    return out


def write_report(args, rows, stem: Path, meta: dict | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from caopd.evaluation.tables import format_table

    meta = meta or {"device": device_name(args.device), "git": git_sha(), "hidden": args.hidden,
                    "vocab": args.vocab, "dtype": args.dtype, "date": time.strftime("%Y-%m-%d")}
    summary = ratios(rows)
    repeats = max((len(r.get("runs", [])) for r in rows), default=1)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "ratios": summary}, indent=2) + "\n")
    table = format_table(
        ["impl", "N", "seconds", "TFLOP/s", "peak extra GiB", "of which grads GiB"],
        [[r["impl"], r["n"], r.get("seconds", r.get("skipped")), r.get("tflops", "-"),
          r.get("peak_extra_gib", "-"), r.get("grad_gib", "-")] for r in rows], markdown=True)
    ratio_table = format_table(["ratio", "value"], [[k, v] for k, v in summary.items()], markdown=True)
    stem.with_suffix(".md").write_text(
        f"# fused_linear_kl forward+backward\n\n{meta['device']}; H={args.hidden}, V={args.vocab}, {args.dtype}; "
        f"git {meta['git']}, {meta['date']}. Warm-up excluded; one process per run"
        f"{'' if repeats < 2 else f'; each row the median of {repeats} runs, taken in rounds'}.\n\n"
        f"{table}\n\n{ratio_table}\n")
    print(table + "\n\n" + ratio_table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in [*IMPLS, *sorted({r["impl"] for r in rows if "@" in r["impl"]})]:
        done = [r for r in rows if r["impl"] == impl and "seconds" in r]
        if done:
            ns = [r["n"] for r in done]
            style = "--" if impl == "gemm_floor" or "@" in impl else "-"
            color = COLORS.get(impl, "#7f7f7f")
            ax_t.plot(ns, [r["seconds"] for r in done], "o" + style, color=color, label=impl)
            if impl != "gemm_floor":
                ax_m.plot(ns, [r["peak_extra_gib"] for r in done], "o" + style, color=color, label=impl)
    for ax, label in ((ax_t, "seconds (fwd+bwd)"), (ax_m, "peak extra memory (GiB)")):
        ax.set(xscale="log", xlabel="tokens N", ylabel=label)
        ax.set_xticks(args.ns, [str(n) for n in args.ns])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"fused_linear_kl, {meta['device'][:60]}; H={args.hidden}, V={args.vocab}, {args.dtype}", fontsize=9)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="torch", choices=IMPLS)
    p.add_argument("--label", default=None, help=argparse.SUPPRESS)
    p.add_argument("--baseline", metavar="REV", help="also run the torch implementation of commit REV")
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--ns", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=1, help="runs of each row, in rounds; the table keeps the median")
    p.add_argument("--memory-limit-gib", type=float, default=16.0, help="skip the naive reference above this")
    p.add_argument("--out", default=None, help="results stem (default benchmarks/results/kernel_kl_<device>)")
    p.add_argument("--replot", metavar="JSON", help="rewrite the table and plot of a results JSON (no runs)")
    args = p.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        meta = saved["meta"]
        args.hidden, args.vocab, args.dtype = meta["hidden"], meta["vocab"], meta["dtype"]
        args.ns = sorted({r["n"] for r in saved["rows"]})
        notes = Path(args.replot).with_suffix(".md").read_text().partition("\nNotes.")[2]
        write_report(args, saved["rows"], Path(args.replot).with_suffix(""), meta)
        if notes:
            with Path(args.replot).with_suffix(".md").open("a") as f:
                f.write("\nNotes." + notes)
        return
    if args.worker:
        print(json.dumps(worker(args)))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = Path(args.out) if args.out else RESULTS / f"kernel_kl_{args.device}"
    write_report(args, run_all(args), stem)


if __name__ == "__main__":
    main()
