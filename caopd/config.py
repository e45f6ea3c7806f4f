"""Training configuration: one dataclass, YAML files, typed ``--key value`` overrides, checks.

A config name without a path (``tiny``) is a YAML file packaged in ``caopd/configs/``. A data
path starting with ``caopd:`` is a file inside the installed package (the shipped example).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from caopd.errors import InputError


@dataclass
class TrainConfig:
    # model and data
    model: str = "tiny-qwen3"  # local path, hub id (from_pretrained) or tiny-qwen3
    tokenizer: str = "auto"  # auto | fast | qwen3 | a path or hub id
    dataset: str = "science"
    data: str = "caopd:examples/arith_mc.jsonl"
    split: str | None = None
    output_dir: str = "runs/train"
    chat_template_kwargs: dict = field(default_factory=lambda: {"enable_thinking": False})
    # CaOPD
    empirical_calibration: bool = True  # False: plain OPD/SDFT (teacher keeps Confidence: 1.00)
    teacher_context: str = "demo"  # demo | correct_solution
    num_generations: int = 8
    train_rollouts: int = 0  # completions per prompt the loss trains on (0: all K; P_acc always uses K)
    divergence: str = "reverse"  # reverse | forward | jsd
    beta: float = 0.5
    temperature: float = 1.0  # of the loss
    skip_loss_tokens: int = 3
    teacher_ema: float = 0.01  # 0: frozen teacher
    # sampling
    rollout_engine: str = "transformers"  # transformers (model.generate) | vllm
    vllm_placement: str = "colocate"  # GPU: colocate (sleep mode, shares the training GPU) | separate
    vllm_device: int = -1  # with placement separate: the GPU index vLLM generates on
    vllm_gpu_memory_utilization: float = 0.0  # 0: 0.3 colocated, 0.9 separate (on CPU: 1 GiB of KV cache)
    async_rollouts: bool = False  # sample the next steps' rollouts while the current step trains
    max_staleness: int = 1  # with async rollouts: a batch may come from weights this many steps old
    sampling_temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_length: int = 1024
    max_completion_length: int = 1024
    # optimization
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    prompts_per_step: int = 32
    micro_batch_prompts: int = 1
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int = 0  # 0: as many as the epochs give
    bf16: bool = True  # where the device supports it
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"  # sdpa (PyTorch's FlashAttention on GPU) | flash_attention_2 | eager
    loss_impl: str = "auto"  # auto | triton | torch
    seed: int = 42
    # checkpoints
    save_every: int = 100
    resume: bool = False

    def __post_init__(self):
        choices = {"divergence": ("reverse", "forward", "jsd"), "teacher_context": ("demo", "correct_solution"),
                   "dataset": ("science", "tooluse"), "loss_impl": ("auto", "triton", "torch"),
                   "attn_implementation": ("sdpa", "flash_attention_2", "eager"),
                   "rollout_engine": ("transformers", "vllm"), "vllm_placement": ("colocate", "separate")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"config field {name!r}: {getattr(self, name)!r} is not one of {allowed}")
        positive = ["num_generations", "prompts_per_step", "micro_batch_prompts", "max_prompt_length",
                    "max_completion_length", "epochs", "save_every"]
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"config field {name!r} must be >= 1, got {getattr(self, name)}")
        ranges = {"teacher_ema": (0.0, 1.0), "warmup_ratio": (0.0, 1.0), "top_p": (0.0, 1.0),
                  "vllm_gpu_memory_utilization": (0.0, 1.0)}
        for name, (low, high) in ranges.items():
            if not low <= getattr(self, name) <= high:
                raise InputError(f"config field {name!r} must be in [{low}, {high}], got {getattr(self, name)}")
        if self.divergence == "jsd" and not 0 < self.beta < 1:
            raise InputError(f"config field 'beta' must be in (0, 1) for divergence jsd, got {self.beta}")
        if self.learning_rate <= 0 or self.temperature <= 0 or self.sampling_temperature < 0:
            raise InputError("learning_rate and temperature must be > 0, sampling_temperature >= 0")
        if not 0 <= self.train_rollouts <= self.num_generations:
            raise InputError(f"config field 'train_rollouts' must be in [0, num_generations], "
                             f"got {self.train_rollouts}")
        if self.skip_loss_tokens < 0 or self.max_steps < 0 or self.max_staleness < 0:
            raise InputError("skip_loss_tokens, max_steps and max_staleness must be >= 0")

    def data_path(self) -> Path:
        if self.data.startswith("caopd:"):
            return Path(str(resources.files("caopd") / self.data.removeprefix("caopd:")))
        return Path(self.data)


def _coerce(name: str, kind, text: str):
    origin = typing.get_origin(kind)
    if kind is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise InputError(f"--{name.replace('_', '-')}: expected true or false, got {text!r}")
    if kind is dict or origin is dict:
        value = yaml.safe_load(text)
        if not isinstance(value, dict):
            raise InputError(f"--{name.replace('_', '-')}: expected a mapping like '{{enable_thinking: false}}'")
        return value
    if origin in (typing.Union, types.UnionType):  # the optional strings (split)
        return None if text.lower() in ("none", "null") else text
    try:
        return kind(text)
    except ValueError:
        raise InputError(f"--{name.replace('_', '-')}: expected {kind.__name__}, got {text!r}") from None


def load_config(config: str | None, overrides: list[str]) -> TrainConfig:
    """The config file (or packaged name) with ``--key value`` overrides applied."""
    values: dict = {}
    if config:
        path = Path(config)
        if not path.suffix and not path.exists():
            path = Path(str(resources.files("caopd") / "configs" / f"{config}.yaml"))
        if not path.is_file():
            raise InputError(f"{config}: no such config file (packaged configs: "
                             f"{', '.join(sorted(p.stem for p in (resources.files('caopd') / 'configs').iterdir()))})")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise InputError(f"{path}: malformed YAML ({e})") from None
        if not isinstance(values, dict):
            raise InputError(f"{path}: expected a mapping of config fields")
    hints = typing.get_type_hints(TrainConfig)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in values:
        if key not in known:
            raise InputError(f"{config}: unknown config field {key!r}")
    if len(overrides) % 2:
        raise InputError(f"overrides come in '--key value' pairs, got {overrides}")
    for flag, text in zip(overrides[::2], overrides[1::2]):
        name = flag.removeprefix("--").replace("-", "_")
        if not flag.startswith("--") or name not in known:
            raise InputError(f"unknown option {flag!r}")
        values[name] = _coerce(name, hints[name], text)
    return TrainConfig(**values)
