"""Compile every Triton kernel of caopd_kernels ahead of time for GPU targets, with no GPU present.

The interpreter (TRITON_INTERPRET=1, what CPU tests run) never lowers a kernel, so errors that
only a GPU build would show (unsupported ops, register pressure, spills) stay hidden there. This
lowers each constexpr variant to PTX and a cubin for sm_80 (A100), sm_90 (H100/H200) and sm_100
(B200) with Triton's own toolchain, then asks ptxas for registers and spills.

    env -u TRITON_INTERPRET python scripts/triton_aot_check.py [--output benchmarks/results/triton_aot.md]
Prints one JSON line per variant; exits 1 when a variant fails to compile or spills.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

ARCHS = (80, 90, 100)
SIGNATURE = {"Z": "*fp32", "U": "*fp32", "LOSS": "*fp32", "stride_z": "i32", "stride_u": "i32", "V": "i32",
             "beta": "fp32", "log_beta": "fp32", "log_1m_beta": "fp32",
             "DIVERGENCE": "constexpr", "COMPUTE_GRAD": "constexpr", "BLOCK_V": "constexpr"}
TOPK_SIGNATURES = {  # triton_topk's passes (the top-k loss's tail bucket)
    "_tail_lse_kernel": {"Z": "*fp32", "OUT": "*fp32", "stride_z": "i32", "V": "i32", "BLOCK_V": "constexpr"},
    "_tail_grad_kernel": {"Z": "*fp32", "LSE": "*fp32", "COEF": "*fp32", "stride_z": "i32", "V": "i32",
                          "BLOCK_V": "constexpr"},
}


def ptxas_report(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([tool.path, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull], capture_output=True,
                             text=True)
    finally:
        os.unlink(f.name)
    text = out.stdout + out.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return {"registers": int(registers.group(1)) if registers else None, "spill_bytes": sum(spills),
            "ptxas_ok": out.returncode == 0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", help="markdown table to write")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels it would compile", file=sys.stderr)
        return 2
    import triton
    from caopd_kernels import triton_topk
    from caopd_kernels.triton_kl import _DIVERGENCE_CODE, GPU_BLOCK_V, _kl_rows_kernel
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variants = [(_kl_rows_kernel, SIGNATURE, {"DIVERGENCE": code, "COMPUTE_GRAD": grad}, divergence, grad)
                for (divergence, code), grad in itertools.product(_DIVERGENCE_CODE.items(), (False, True))]
    variants += [(getattr(triton_topk, name), signature, {}, "top-k tail", name == "_tail_grad_kernel")
                 for name, signature in TOPK_SIGNATURES.items()]
    rows, failed = [], False
    for arch, (kernel, signature, constexprs, divergence, grad) in itertools.product(ARCHS, variants):
        row = {"kernel": kernel.__name__, "arch": f"sm_{arch}", "divergence": divergence, "compute_grad": grad,
               "block_v": GPU_BLOCK_V}
        try:
            source = ASTSource(fn=kernel, signature=signature, constexprs={**constexprs, "BLOCK_V": GPU_BLOCK_V})
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
            row.update(cubin_bytes=len(compiled.asm["cubin"]), **ptxas_report(compiled.asm["ptx"], arch))
            failed |= not row["ptxas_ok"] or row["spill_bytes"] > 0
        except Exception as e:  # a compile error is the finding: report it, keep going
            row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            failed = True
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.output:
        lines = [f"# Triton kernels compiled ahead of time (no GPU present), triton {triton.__version__}", "",
                 "| kernel | target | divergence | grad | BLOCK_V | cubin bytes | registers | spill bytes |",
                 "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['kernel']} | {r['arch']} | {r['divergence']} | {r['compute_grad']} | {r['block_v']} | "
                  + (f"error: {r['error']} | | |" if "error" in r else
                     f"{r['cubin_bytes']} | {r['registers']} | {r['spill_bytes']} |") for r in rows]
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
