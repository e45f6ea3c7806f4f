"""Training configuration: one dataclass, YAML files, typed ``--key value`` overrides, checks.

Every field carries its help text and group (``caopd train --help`` is generated from them, as
transformers' HfArgumentParser does) and is checked at construction: choices, ranges, and
finiteness of every float. A config name without a path (``tiny``) is a YAML file packaged in
``caopd/configs/``. A data path starting with ``caopd:`` is a file inside the installed package.

On ``--resume`` the fields in ``MAY_CHANGE_ON_RESUME`` may differ from the run's saved config
(how long it runs, how often it saves, how the same computation is executed); every other field
changes the data stream, the rollouts or the model, so a difference refuses the resume.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from caopd.errors import InputError

MAX_CONFIG_BYTES = 1 << 20
TEACHER_EMA_DEFAULT = 0.01
MAX_GENERATIONS = 1024  # rollouts a prompt
MAX_TOKENS = 1 << 20  # a prompt's or a completion's
GROUPS = ("model and data", "CaOPD", "sampling", "optimization", "run folder and checkpoints")
MAY_CHANGE_ON_RESUME = frozenset({
    "max_steps", "epochs", "save_every", "save_total_limit", "resume", "overwrite", "output_dir",
    "micro_batch_prompts", "gradient_checkpointing", "attn_implementation", "loss_impl", "shared_prefix",
    "vllm_placement", "vllm_device", "vllm_gpu_memory_utilization", "fsdp_cpu_offload", "liger_kernels", "merge_lora",
    "distributed_timeout_minutes", "distributed_backend", "rollout_server", "rollout_server_timeout", "force",
    "teacher_server",
    "logging_steps", "report_to"})


def option(default, help: str, group: str, choices: tuple | None = None):
    """A config field with its --help line, group and allowed values."""
    assert group in GROUPS, group
    metadata = {"help": help, "group": group, "choices": choices}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    model: str = option("tiny-qwen3", "tiny-qwen3 (built here, random weights), random:Qwen3-0.6B ... random:Qwen3-32B "
                        "or random:<config.json> (the real architecture, random weights), a local folder, or a hub "
                        "id (from_pretrained)", "model and data")
    force: bool = option(False, "build the model even where its weights alone exceed the memory available (checked "
                         "before building, from its config)", "model and data")
    tokenizer: str = option("auto", "auto (the model's own; fast for tiny-qwen3, qwen3 for random:), fast (trained "
                            "here), qwen3 "
                            "(the real Qwen3 files), or a folder or hub id", "model and data")
    dataset: str = option("science", "prompt format and verifier", "model and data", ("science", "tooluse"))
    data: str = option("caopd:examples/arith_mc.jsonl", "training data: a JSON Lines file, a saved Hugging Face "
                       "dataset folder, or caopd:<file> shipped in the package", "model and data")
    split: str | None = option(None, "split of a saved DatasetDict folder", "model and data")
    output_dir: str = option("runs/train", "run folder: checkpoints/, metrics.jsonl, final/", "model and data")
    chat_template_kwargs: dict = option({"enable_thinking": False}, "extra chat-template arguments, a YAML "
                                        "mapping", "model and data")

    empirical_calibration: bool = option(True, "CaOPD: the confidence target is P_acc = correct/K; false: plain "
                                         "OPD/SDFT (the teacher keeps Confidence: 1.00)", "CaOPD")
    confidence_prior: float = option(8.0, "CaOPD's target: (correct + N x the mean confidence the K rollouts "
                                     "state) / (K + N), the Beta posterior mean with the student's own stated "
                                     "confidence as a prior worth N rollouts, N growing from 0 at the first step "
                                     "to this at the last: a less noisy target with the same fixed point, the "
                                     "accuracy (0: the paper's P_acc = correct/K)", "CaOPD")
    confidence_divergence: str = option("same", "the divergence on the tokens stating the confidence (the line "
                                        "CaOPD appends, or the statement a sampled completion ends in): the "
                                        "forward KL fits the mean of CaOPD's noisy targets where the reverse KL "
                                        "fits their mode; same: --divergence's", "CaOPD",
                                        ("same", "reverse", "forward", "jsd"))
    teacher_context: str = option("demo", "the teacher's privileged context: a gold demonstration (SDFT) or a "
                                  "verified correct rollout (SDPO)", "CaOPD", ("demo", "correct_solution"))
    num_generations: int = option(8, "K: rollouts per prompt", "CaOPD")
    train_rollouts: int = option(0, "completions per prompt the loss trains on (0: all K; P_acc always uses K)",
                                 "CaOPD")
    divergence: str = option("reverse", "per-token loss: reverse KL(s||t), forward KL(t||s) or generalized JSD",
                             "CaOPD", ("reverse", "forward", "jsd"))
    beta: float = option(0.5, "JSD mixture weight, in (0, 1)", "CaOPD")
    temperature: float = option(1.0, "softmax temperature of the loss, > 0", "CaOPD")
    skip_loss_tokens: int = option(3, "first completion tokens left out of the loss", "CaOPD")
    teacher_ema: float = option(TEACHER_EMA_DEFAULT, "teacher <- (1 - a) teacher + a student after each step, in "
                                "[0, 1] (0: frozen teacher; a --teacher-model is always frozen)", "CaOPD")
    teacher_model: str = option("", "a frozen teacher other than the student, of the student's tokenizer: a "
                                "folder, hub id or random:<shape> (on-policy distillation from a larger model; it "
                                "sees the privileged context as the EMA teacher does); empty: the student's EMA",
                                "CaOPD")
    teacher_top_k: int = option(0, "distil on the teacher's k most likely tokens a position and one bucket for the "
                                "rest, as a served teacher gives them (vLLM's prompt_logprobs; forward KL there is "
                                "the peers' top-k KL); 0: the full vocabulary (20 with --teacher-server)", "CaOPD")
    teacher_server: str = option("", "a frozen teacher served by vLLM (caopd rollout-server --model TEACHER "
                                 "--max-logprobs K, or vllm serve): the servers' URLs, comma-separated; each "
                                 "micro-batch's completions are scored there (--teacher-top-k log-probs a "
                                 "position, temperature 1) while the student's forward runs; nothing of the "
                                 "teacher in the trainer's memory", "CaOPD")
    teacher_dtype: str = option("fp32", "the EMA teacher's weights: fp32, or bf16 (half the memory and, under "
                                "FSDP, half the gathers; the EMA by stochastic rounding)", "CaOPD", ("fp32", "bf16"))

    rollout_engine: str = option("auto", "auto (vLLM when it is installed and a GPU is present, else transformers), "
                                 "transformers (model.generate on the training weights), vllm (in the trainer's "
                                 "processes), or server (vLLM servers started by caopd rollout-server)", "sampling",
                                 ("auto", "transformers", "vllm", "server"))
    rollout_server: str = option("", "with --rollout-engine server: the servers' URLs, comma-separated "
                                 "(http://HOST:PORT); each step's prompts are spread over them", "sampling")
    rollout_server_timeout: float = option(600.0, "seconds a request to a rollout or teacher server may take, > 0",
                                           "sampling")
    vllm_tensor_parallel_size: int = option(1, "with --rollout-engine vllm under torchrun: processes that share one "
                                            "vLLM engine, each holding a slice of it", "sampling")
    vllm_placement: str = option("colocate", "GPU: colocate (sleep mode, shares the training GPU) or separate",
                                 "sampling", ("colocate", "separate"))
    vllm_device: int = option(-1, "with vllm_placement separate: the GPU index vLLM generates on", "sampling")
    vllm_gpu_memory_utilization: float = option(0.0, "vLLM's share of GPU memory, in [0, 1] (0: 0.3 colocated, "
                                                "0.9 separate; on CPU 1 GiB of KV cache)", "sampling")
    async_rollouts: bool = option(False, "sample the next steps' rollouts while the current step trains",
                                  "sampling")
    max_staleness: int = option(1, "with async rollouts: a batch may come from weights this many steps old",
                                "sampling")
    sampling_temperature: float = option(1.0, "rollout sampling temperature, >= 0", "sampling")
    top_p: float = option(1.0, "rollout nucleus sampling, in (0, 1]", "sampling")
    max_prompt_length: int = option(1024, "prompt tokens kept (left-truncated)", "sampling")
    max_completion_length: int = option(1024, "tokens sampled per rollout", "sampling")

    learning_rate: float = option(2e-5, "peak learning rate (warm-up, then cosine), > 0", "optimization")
    weight_decay: float = option(0.0, "AdamW weight decay, >= 0", "optimization")
    warmup_ratio: float = option(0.1, "share of the steps spent warming up, in [0, 1]", "optimization")
    prompts_per_step: int = option(32, "prompts per optimizer step (each with K rollouts)", "optimization")
    micro_batch_prompts: int = option(1, "prompts per forward/backward (gradient accumulation)", "optimization")
    max_grad_norm: float = option(1.0, "gradient-norm clipping, >= 0 (0: no clipping)", "optimization")
    epochs: int = option(1, "passes over the data (when max_steps is 0)", "optimization")
    max_steps: int = option(0, "optimizer steps (0: as many as the epochs give)", "optimization")
    bf16: bool = option(True, "bf16 compute where the device supports it (CUDA)", "optimization")
    master_weights: str = option("fp32", "with bf16 on CUDA: the trained weights and Adam moments in fp32 (autocast "
                                 "bf16 compute), or bf16 with stochastic rounding where fp32 does not fit",
                                 "optimization", ("fp32", "bf16"))
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory",
                                          "optimization")
    attn_implementation: str = option("sdpa", "attention kernels (sdpa: PyTorch's FlashAttention on GPU)",
                                      "optimization", ("sdpa", "flash_attention_2", "eager"))
    shared_prefix: bool = option(True, "forward each prompt's prefix once for its K completions on each side "
                                 "(the same loss and gradients as one padded row per completion)", "optimization")
    lora_r: int = option(0, "train rank-R LoRA adapters (peft) over a frozen base; the teacher is the EMA of the "
                         "adapters over the same base (0: full fine-tuning)", "optimization")
    lora_alpha: float = option(0.0, "LoRA scale numerator, >= 0 (0: 2 x lora_r)", "optimization")
    lora_target_modules: str = option("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                      "comma-separated module names that get adapters", "optimization")
    merge_lora: bool = option(False, "also save the merged weights (final/merged, a plain model) beside the "
                              "adapters", "run folder and checkpoints")
    liger_kernels: bool = option(False, "Liger-Kernel's fused RMSNorm, SwiGLU and RoPE for Qwen3 (CUDA; pip install "
                                 "liger-kernel): fewer saved activations; its loss patches off", "optimization")
    fsdp: bool = option(False, "shard the student and the EMA teacher with FSDP2 across the processes of a torchrun / "
                        "accelerate launch (needed for more than one process)", "optimization")
    fsdp_cpu_offload: bool = option(False, "with --fsdp: keep the parameter shards, gradients and optimizer states in "
                                    "CPU memory between uses", "optimization")
    distributed_backend: str = option("auto", "with several processes: auto (nccl on GPUs, gloo for host tensors "
                                      "when offloading; gloo on CPUs), or gloo everywhere (lets several processes "
                                      "share one GPU: a functional check)", "optimization", ("auto", "gloo"))
    distributed_timeout_minutes: float = option(30.0, "with several processes: how long a collective may wait "
                                                "(a slow save on one process) before the run stops, > 0",
                                                "optimization")
    loss_impl: str = option("auto", "fused loss implementation (auto: triton on CUDA, torch elsewhere)",
                            "optimization", ("auto", "triton", "torch"))
    seed: int = option(42, "seed of the data order, the rollouts and tiny-qwen3's weights", "optimization")

    report_to: str = option("none", "also send each step's metrics to experiment trackers, through accelerate's: "
                            "tensorboard, wandb or trackio (comma-separated; each must be installed), or none",
                            "run folder and checkpoints")
    logging_steps: int = option(1, "print a line every N steps (step, loss, P_acc, accuracy, confidence, tokens/s, "
                                "seconds a step); 0: none (metrics.jsonl has every step)", "run folder and checkpoints")
    save_every: int = option(100, "write a checkpoint every this many steps (and at the last); 0: none, only final/ "
                             "(as save_strategy='no'; a stop on a failed server still writes one)",
                             "run folder and checkpoints")
    save_total_limit: int = option(2, "keep the newest this many checkpoints, deleting older ones (0: keep all)",
                                   "run folder and checkpoints")
    resume: bool = option(False, "continue the run in output_dir from its newest complete checkpoint",
                          "run folder and checkpoints")
    overwrite: bool = option(False, "replace an earlier run in output_dir (its checkpoints, metrics.jsonl, "
                             "final/), once the config, data, tokenizer and model have loaded",
                             "run folder and checkpoints")

    def __post_init__(self):
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = field_type(hints[f.name])
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if not (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
                    or (value is None and kind is str and f.default is None)):
                raise InputError(f"config field {f.name!r} must be {kind.__name__}, got {value!r}")
            if f.metadata["choices"] and value not in f.metadata["choices"]:
                raise InputError(f"config field {f.name!r}: {value!r} is not one of {f.metadata['choices']}")
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"config field {f.name!r} must be a finite number, got {value}")
        positive = ["num_generations", "prompts_per_step", "micro_batch_prompts", "max_prompt_length",
                    "max_completion_length", "epochs", "vllm_tensor_parallel_size"]
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"config field {name!r} must be >= 1, got {getattr(self, name)}")
        for name, most in (("num_generations", MAX_GENERATIONS), ("max_prompt_length", MAX_TOKENS),
                           ("max_completion_length", MAX_TOKENS)):
            if getattr(self, name) > most:
                raise InputError(f"config field {name!r} must be <= {most}, got {getattr(self, name)}")
        for name in ("confidence_prior", "skip_loss_tokens", "teacher_top_k", "max_steps", "max_staleness",
                     "logging_steps", "save_every", "save_total_limit", "weight_decay", "max_grad_norm",
                     "sampling_temperature", "lora_r", "lora_alpha"):
            if getattr(self, name) < 0:
                raise InputError(f"config field {name!r} must be >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", "temperature", "distributed_timeout_minutes", "rollout_server_timeout"):
            if getattr(self, name) <= 0:
                raise InputError(f"config field {name!r} must be > 0, got {getattr(self, name)}")
        ranges = {"teacher_ema": (0.0, 1.0), "warmup_ratio": (0.0, 1.0), "vllm_gpu_memory_utilization": (0.0, 1.0)}
        for name, (low, high) in ranges.items():
            if not low <= getattr(self, name) <= high:
                raise InputError(f"config field {name!r} must be in [{low}, {high}], got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"config field 'top_p' must be in (0, 1], got {self.top_p}")
        if "jsd" in (self.divergence, self.confidence_divergence) and not 0 < self.beta < 1:
            raise InputError(f"config field 'beta' must be in (0, 1) for divergence jsd, got {self.beta}")
        if not 0 <= self.train_rollouts <= self.num_generations:
            raise InputError(f"config field 'train_rollouts' must be in [0, num_generations], "
                             f"got {self.train_rollouts}")
        if self.rollout_engine == "server" and not self.rollout_server.strip():
            raise InputError("--rollout-engine server needs --rollout-server http://HOST:PORT (started by caopd "
                             "rollout-server)")
        if self.teacher_model and self.teacher_ema not in (0.0, TEACHER_EMA_DEFAULT):
            raise InputError(f"--teacher-ema {self.teacher_ema}: a --teacher-model teacher is frozen (the EMA follows "
                             "the student's own weights); leave --teacher-ema out")
        if self.teacher_server.strip():
            if self.teacher_model:
                raise InputError("--teacher-model and --teacher-server exclude each other: the teacher is loaded "
                                 "here, or served")
            if self.teacher_ema not in (0.0, TEACHER_EMA_DEFAULT):
                raise InputError(f"--teacher-ema {self.teacher_ema}: a --teacher-server teacher is frozen; leave "
                                 "--teacher-ema out")
            if self.temperature != 1.0:
                raise InputError(f"--temperature {self.temperature} with --teacher-server: a vLLM server gives the "
                                 "teacher's log-probs at temperature 1; leave --temperature out")
            if not self.teacher_top_k:
                self.teacher_top_k = 20  # Tinker's SDFT: 20 tokens match the full-vocabulary KL in practice
        if self.resume and self.overwrite:
            raise InputError("--resume and --overwrite exclude each other: continue the run, or replace it")

    def data_path(self) -> Path:
        from caopd.paths import data_path

        return data_path(self.data)


def field_type(kind) -> type:
    """The type a field's text is read as (the optional string split reads as str)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return str
    return typing.get_origin(kind) or kind


def _coerce(name: str, kind, text: str):
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise InputError(f"{flag}: expected true or false, got {text!r}")
    if field_type(kind) is dict:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = None
        if not isinstance(value, dict):
            raise InputError(f"{flag}: expected a mapping like '{{enable_thinking: false}}'")
        return value
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # the optional strings (split)
        return None if text.lower() in ("none", "null") else text
    try:
        return kind(text)
    except ValueError:
        raise InputError(f"{flag}: expected {kind.__name__}, got {text!r}") from None


def closest_field(name: str) -> str | None:
    """The config field whose name is nearest to ``name`` (dashes read as underscores), if any is close."""
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    match = difflib.get_close_matches(name.replace("-", "_"), known, n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_option(flag: str) -> InputError:
    nearest = closest_field(flag.lstrip("-"))
    hint = f" (did you mean --{nearest.replace('_', '-')}?)" if nearest else " (caopd train --help lists them)"
    return InputError(f"unknown option {flag!r}{hint}")


def read_config_file(config: str) -> tuple[Path, dict]:
    """(path, values) of a YAML config file or packaged config name."""
    path = Path(config)
    if not path.suffix and not path.exists():
        path = Path(str(resources.files("caopd") / "configs" / f"{config}.yaml"))
    if not path.is_file():
        packaged = sorted(p.stem for p in (resources.files("caopd") / "configs").iterdir()
                          if p.name.endswith(".yaml"))
        raise InputError(f"{config}: no such config file (packaged configs: {', '.join(packaged)})")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InputError(f"{path}: {path.stat().st_size} bytes; a config file is at most {MAX_CONFIG_BYTES} bytes")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: malformed YAML ({' '.join(str(e).split())[:300]})") from None
    except RecursionError:
        raise InputError(f"{path}: malformed YAML (nested too deeply)") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(values, dict):
        raise InputError(f"{path}: expected a mapping of config fields")
    return path, values


def load_config(config: str | None, overrides: list[str], base: dict | None = None) -> TrainConfig:
    """The config file (or packaged name; None: the fields' defaults) with ``--key value`` overrides
    applied; ``base``: values under both (a resumed run's saved config)."""
    values: dict = dict(base or {})
    path = "the resumed run's config"
    if config:
        path, file_values = read_config_file(config)
        values.update(file_values)
    hints = typing.get_type_hints(TrainConfig)
    for key in values:
        if key not in hints:
            nearest = closest_field(str(key))
            raise InputError(f"{path}: unknown config field {key!r}" + (f" (did you mean {nearest!r}?)" if nearest
                                                                         else ""))
        if isinstance(values[key], str) and field_type(hints[key]) not in (str, dict):
            values[key] = _coerce(key, hints[key], values[key])  # YAML reads 1e-3 (no dot) as a string
    if len(overrides) % 2:
        raise InputError(f"overrides come in '--key value' pairs, got {overrides}")
    for flag, text in zip(overrides[::2], overrides[1::2]):
        name = flag.removeprefix("--").replace("-", "_")
        if not flag.startswith("--") or name not in hints:
            raise unknown_option(flag)
        values[name] = _coerce(name, hints[name], text)
    return TrainConfig(**values)


def non_default_sources(config: TrainConfig, file_keys, flag_keys, resumed_keys) -> dict[str, list[str]]:
    """Each field whose value is not its default, by where the value came from (a flag over the config
    file over the resumed run's config; the launcher: set by accelerate's environment)."""
    defaults = TrainConfig()
    sources: dict[str, list[str]] = {}
    for f in dataclasses.fields(TrainConfig):
        if getattr(config, f.name) == getattr(defaults, f.name):
            continue
        source = ("flags" if f.name in flag_keys else "the config file" if f.name in file_keys
                  else "the resumed run" if f.name in resumed_keys else "the launcher")
        sources.setdefault(source, []).append(f.name)
    return sources


def sources_line(name: str | None, sources: dict[str, list[str]]) -> str:
    """The first line of a run: the config and the source of each non-default value."""
    parts = [f"from {source}: {', '.join(names)}" for source, names in sources.items()]
    head = f"config {name}" if name else "no --config (the defaults of caopd train --help)"
    return f"caopd train: {head}; " + ("; ".join(parts) if parts else "every field at its default") + \
        " (all values in <output-dir>/config.yaml)"
