"""`pip install ./kernels` gives caopd_kernels alone (issue 18, item 5): installed from the kernels
folder into an empty target, then the kernel tests run against that copy in a process where
importing transformers, accelerate, vLLM, peft, TRL or caopd itself fails, so a kernel that reached for
any of them would fail here.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TESTS = ["tests/test_kernels_fused_linear_kl.py", "tests/test_kernel_mixed_inputs.py",
                "tests/test_kernel_gemm_dtypes.py", "tests/test_kernel_topk.py"]
# the torch paths and one Triton test (the rest of the Triton tests ran on the source tree already)
SELECTED = "not folder_imports and (not triton or fused_triton_with_small_blocks)"
RUN = """
import importlib.abc, sys
class Forbidden(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"transformers", "accelerate", "vllm", "peft", "caopd", "liger_kernel", "trl"}:
            raise ModuleNotFoundError(f"{name} is not part of caopd_kernels' environment")
sys.meta_path.insert(0, Forbidden())
import caopd_kernels, pytest
assert caopd_kernels.__file__.startswith(sys.argv[1]), caopd_kernels.__file__
from caopd_kernels.integrations.trl import use_fused_linear_kl  # imports TRL only when called
try:
    use_fused_linear_kl(None)
    raise SystemExit("use_fused_linear_kl ran without TRL")
except ImportError as e:
    assert "pip install 'trl==1.16.*'" in str(e), e
sys.exit(pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-k", sys.argv[2], *sys.argv[3:]]))
"""


def test_the_kernels_install_and_pass_their_tests_alone(tmp_path):
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                              "--target", str(target), str(ROOT / "kernels")], capture_output=True, text=True,
                             timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    installed, source = target / "caopd_kernels", ROOT / "kernels"
    assert sorted(str(p.relative_to(installed)) for p in installed.rglob("*.py")) == sorted(
        str(p.relative_to(source)) for pattern in ("*.py", "integrations/*.py") for p in source.glob(pattern))
    env = {**os.environ, "PYTHONPATH": str(target), "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", RUN, str(target), SELECTED, *KERNEL_TESTS], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "error" not in done.stdout.lower().split("passed")[-1]
