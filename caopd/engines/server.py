"""ServerEngine: rollouts from vLLM servers (``caopd rollout-server``), on GPUs the trainer does not use.

Built on vLLM's own RL interface rather than a protocol of caopd's: the server is vLLM's OpenAI API
server with its development routes on (``/pause``, ``/resume``, ``/collective_rpc``,
``/reset_prefix_cache``, the weight-transfer routes of ``vllm.entrypoints.rl.online``). TRL's
``vllm-serve`` client and verl drive the same routes.

Generation: each step's prompts go as token ids to ``/v1/completions`` (``n = K``, each prompt's own
seed: its index in the step, ``return_token_ids``), spread over the servers and sent concurrently;
the completions are decoded here from the sampled ids, as the in-process engines decode theirs, so
the three engines return the same completions for the same seeds and weights.

Weights after each step, whole tensors one at a time (under FSDP every process gathers; the main
process sends):
- ``nccl`` (GPUs; the server started with ``--weight-transfer-config '{"backend": "nccl"}'``, as
  ``caopd rollout-server`` does on GPUs): vLLM's trainer-side NCCL weight-transfer engine
  broadcasts each tensor (packed in buckets) to the server's workers while ``/update_weights``
  receives them.
- ``folder`` (machines without NCCL, or servers on another node sharing a file system): the
  tensors are written a tensor at a time as a ``from_pretrained`` folder under ``staging`` and the
  servers reload from it (``/collective_rpc reload_weights`` with ``weights_path``): JSON and
  safetensors, nothing pickled.
The servers are paused around an update and their prefix caches reset (blocks cached from the old
weights would otherwise be reused).

Asynchronous rollouts: ``stage`` writes the folder on the trainer's thread (where the gathers must
run) and returns a handle the rollout worker loads between two generations.

Failures: an unreachable server at start is one line; a request that fails or times out is tried
again (3 attempts, backing off), then ``RolloutServerError``, which the trainer turns into a stop
with a checkpoint to resume from.
"""
from __future__ import annotations

import http.client
import json
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from caopd.engines.base import Completion, SamplingParams, prompt_seed, sampled_ids
from caopd.errors import InputError


class RolloutServerError(RuntimeError):
    """A rollout server failed a request after its retries; ``reason``: the last failure's."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


@dataclass(frozen=True)
class StagedWeights:
    """Weights written for the servers to reload (asynchronous rollouts load them between generations)."""

    folder: Path
    version: int


def server_command(model: str, *, host: str = "127.0.0.1", port: int = 8000, tensor_parallel_size: int = 1,
                   max_model_len: int = 4096, dtype: str = "auto", gpu_memory_utilization: float = 0.9,
                   cpu_kv_cache_gib: float = 1.0, seed: int = 0, tokenizer: str | None = None,
                   max_logprobs: int = 20) -> tuple[list, dict]:
    """(argv, environment) of vLLM's OpenAI API server as ``caopd rollout-server`` runs it: its
    development and RL routes on (VLLM_SERVER_DEV_MODE=1), prefix caching, and on GPUs NCCL weight
    transfer; on CPUs a KV cache of ``cpu_kv_cache_gib``, eager. ``max_logprobs``: the most log-probs a
    position a request may ask for (a served teacher's ``--teacher-top-k``)."""
    import os
    import sys

    from caopd.engines.vllm_engine import INSTALL_HINT, vllm_available

    if not vllm_available():
        raise InputError(INSTALL_HINT.replace("the vLLM engine", "caopd rollout-server"))
    if tensor_parallel_size < 1 or not 0 < port < 65536 or max_model_len < 1 or max_logprobs < 1:
        raise InputError("--tensor-parallel-size, --max-model-len and --max-logprobs must be >= 1 and --port in "
                         "1..65535")
    if not 0 < gpu_memory_utilization <= 1 or cpu_kv_cache_gib <= 0:
        raise InputError("--gpu-memory-utilization must be in (0, 1] and --cpu-kv-cache-gib > 0")
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
        raise InputError(f"--model {model}: no such model folder")
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", host,
            "--port", str(port), "--tensor-parallel-size", str(tensor_parallel_size), "--max-model-len",
            str(max_model_len), "--dtype", dtype, "--seed", str(seed), "--enable-prefix-caching", "--max-logprobs",
            str(max_logprobs)]
    if tokenizer:
        argv += ["--tokenizer", tokenizer]
    if torch.cuda.is_available():
        argv += ["--gpu-memory-utilization", str(gpu_memory_utilization),
                 "--weight-transfer-config", json.dumps({"backend": "nccl"})]
    else:  # whole prefills: a split one rewinds a seeded request's generator, which vLLM's CPU backend cannot;
        # eager, as the in-process engine on CPUs (vllm_engine: compiling costs more than it saves here)
        argv += ["--kv-cache-memory-bytes", str(int(cpu_kv_cache_gib * 2**30)), "--no-enable-chunked-prefill",
                 "--max-num-batched-tokens", str(max(max_model_len, 4096)), "--enforce-eager"]
    return argv, {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}


def server_urls(text: str, flag: str = "--rollout-server") -> list[str]:
    urls = [u.strip().rstrip("/") for u in text.split(",") if u.strip()]
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise InputError(f"{flag} {url}: expected http://HOST:PORT")
    return urls


def request_json(url: str, path: str, body: dict | None = None, method: str = "POST", *, timeout: float,
                 attempts: int = 3, backoff: float = 1.0, error: type[RolloutServerError] = RolloutServerError,
                 what: str = "rollout server"):
    """``body`` as JSON to ``url + path``; the reply's JSON (None when empty). A request that fails or
    times out is tried again (``attempts`` in all, backing off); then ``error``. A 4xx reply is not
    retried: the request itself is wrong."""
    data = None if body is None else json.dumps(body).encode()
    last = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        request = urllib.request.Request(f"{url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read()
            return json.loads(text) if text else None
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            if e.code < 500:
                raise error(f"{what} {url}{path}: HTTP {e.code}: {detail}", f"HTTP {e.code}: {detail}") from None
            last = f"HTTP {e.code}: {detail}"
        except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException, ValueError) as e:
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
    raise error(f"{what} {url}{path} failed {attempts} time(s) ({last})", last)


class ServerEngine:
    def __init__(self, urls: list[str], tokenizer, *, staging: Path, ranks=None, timeout: float = 600.0,
                 attempts: int = 3, backoff: float = 1.0, transport: str = "auto", weight_specs=None):
        from caopd.training.distributed import Ranks

        self.urls, self.tokenizer, self.staging = urls, tokenizer, Path(staging)
        self.ranks = ranks or Ranks()
        self.timeout, self.attempts, self.backoff = timeout, attempts, backoff
        self.models = {url: self._served_model(url) for url in urls}
        self.stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
        if transport == "auto":
            transport = "nccl" if torch.cuda.is_available() and all(map(self._has_nccl, urls)) else "folder"
        self.transport = transport
        self._nccl = []  # one trainer-side transfer engine per server, made at the first push
        self.version = 0
        self.weight_updates = 0

    def _request(self, url: str, path: str, body: dict | None = None, method: str = "POST", attempts=None):
        return request_json(url, path, body, method, timeout=self.timeout, attempts=attempts or self.attempts,
                            backoff=self.backoff)

    def _served_model(self, url: str) -> str:
        try:
            models = self._request(url, "/v1/models", method="GET", attempts=1)
        except RolloutServerError as e:
            raise InputError(f"--rollout-server {url} is unreachable ({e.reason}): "
                             "start it with caopd rollout-server --model M --port P") from None
        return models["data"][0]["id"]

    def _has_nccl(self, url: str) -> bool:
        try:
            info = self._request(url, "/server_info", method="GET", attempts=1) or {}
        except RolloutServerError:
            return False
        config = info.get("vllm_config") or {}
        transfer = config.get("weight_transfer_config") if isinstance(config, dict) else None
        return "nccl" in str(transfer)

    # generation
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[list[Completion]]:
        def one(i: int) -> list[Completion]:
            url = self.urls[(sampling.first_prompt + i) % len(self.urls)]  # the step's prompts spread over servers
            body = {"model": self.models[url], "prompt": prompts[i], "n": n, "temperature": sampling.temperature,
                    "top_p": sampling.top_p, "max_tokens": sampling.max_tokens,
                    "seed": prompt_seed(sampling.seed, sampling.first_prompt + i, n), "return_token_ids": True}
            choices = sorted(self._request(url, "/v1/completions", body)["choices"], key=lambda c: c["index"])
            ids = [c["token_ids"] for c in choices]
            texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            return [Completion(text, sampled_ids(t, self.stop)) for text, t in zip(texts, ids)]

        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(len(prompts), 32)) as pool:
            return list(pool.map(one, range(len(prompts))))

    # weights
    def stage(self, weights) -> StagedWeights:
        """Write ``weights`` (a WeightStream: every process gathers, the main one writes) for the
        servers to reload; returns the handle ``update_weights`` loads."""
        from caopd.training.distributed import barrier
        from caopd.training.streamed_safetensors import TensorSpec, write_model_folder

        self.version += 1
        folder = self.staging / f"weights-{self.version:06d}"
        specs = [TensorSpec(name, tuple(shape), dtype) for name, shape, dtype in weights.specs]
        write_model_folder(folder, specs, (t for _, t in weights), write=self.ranks.is_main,
                           finish=lambda tmp: weights.config.save_pretrained(tmp))
        barrier(self.ranks)
        return StagedWeights(folder, self.version)

    def update_weights(self, weights) -> None:
        """Load ``weights`` into every server: staged ones, or a WeightStream (pushed now). Every process
        returns once the servers hold them, or raises RolloutServerError together."""
        from caopd.training.distributed import all_gather

        failure = None
        try:
            if self.transport == "nccl" and not isinstance(weights, StagedWeights):
                self._push_nccl(weights)
            else:
                self._reload(weights if isinstance(weights, StagedWeights) else self.stage(weights))
        except RolloutServerError as e:
            failure = str(e)
        failures = [f for f in all_gather(failure, self.ranks) if f]
        if failures:
            raise RolloutServerError(failures[0])
        self.weight_updates += 1

    def _reload(self, staged: StagedWeights) -> None:
        if not self.ranks.is_main:
            return
        for url in self.urls:
            self._request(url, "/pause?mode=wait")
            self._request(url, "/collective_rpc", {"method": "reload_weights",
                                                   "kwargs": {"weights_path": str(staged.folder)}})
            self._request(url, "/reset_prefix_cache")
            self._request(url, "/resume")
        for older in self.staging.glob("weights-*"):  # this engine's own files older than the loaded ones
            version = older.name.removeprefix("weights-").removesuffix(".tmp")
            if version.isdigit() and int(version) < staged.version:  # a newer one may be staged meanwhile
                shutil.rmtree(older, ignore_errors=True)

    def _push_nccl(self, weights) -> None:
        """vLLM's trainer-side NCCL weight-transfer engine, one per server (GPU only; unrun here)."""
        if not self._nccl:
            self._nccl = [self._nccl_engine(url, weights) for url in self.urls]
        for engine in self._nccl:
            engine.source.stream = weights
            engine.send_weights()
            if self.ranks.is_main:
                self._request(engine.url, "/reset_prefix_cache")

    def _nccl_engine(self, url: str, weights):
        import socket

        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        class Stream(WeightSource):
            stream = weights

            def metadata(self):
                return [ParamMeta(name, dtype, tuple(shape)) for name, shape, dtype in self.stream.specs]

            def __iter__(self):
                return iter(self.stream)

        world = int(self._request(url, "/get_world_size?include_dp=true", method="GET")["world_size"])
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        info = NCCLTrainerInitInfo(master_address=socket.gethostbyname(socket.gethostname()), master_port=port,
                                   world_size=world + 1, rank=self.ranks.rank)
        engine = NCCLTrainerWeightTransferEngine.trainer_init(info, client=HTTPVLLMWeightSyncClient(url, self.timeout),
                                                              source=Stream())
        engine.url = url
        return engine

    def close(self) -> None:
        for engine in self._nccl:
            engine.shutdown()
        self._nccl = []
