"""TeacherServer: the teacher's top-k next-token log-probs from vLLM servers (``--teacher-server``).

A teacher too large for the trainer's GPUs runs in a vLLM server of its own (``caopd rollout-server
--model TEACHER --max-logprobs K``, or a stock ``vllm serve TEACHER --max-logprobs K``), as TRL's
SDFT teacher server and prime-rl's teacher inference server do. For each micro-batch, each server
gets one ``/v1/completions`` request: its prompts the teacher contexts followed by the completions'
sampled tokens, as token ids, with ``max_tokens`` 1 and ``prompt_logprobs`` k. vLLM answers, for
each prompt position t, the log-probs of the k most likely tokens given the tokens before t (and
the prompt's own token t, whatever its rank); the completion's positions are what a local teacher's
hidden rows give through ``caopd_kernels.topk_logprobs``. The loss is then
``caopd_kernels.fused_linear_kl_topk`` (forward KL over the k tokens and a tail bucket).

The requests are sent on threads when a micro-batch is submitted, before the student's forward, so
the teacher scores while the student computes. Log-probs are the server's raw ones: temperature 1.

Failures: at start, one line each for an unreachable server, a tokenizer other than the student's,
and a server that gives fewer than k log-probs a position (its ``--max-logprobs``). During a run a
request is tried 3 times; then every process learns of the failure together (``failure``), the
micro-batch's loss is zero, and the loop stops with a checkpoint to resume from (raising inside the
loss would leave FSDP's root gathered and the other processes waiting in a collective).
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from caopd.engines.server import RolloutServerError, request_json
from caopd.errors import InputError

# a probe of the tokenizer: the chat markers, a confidence line, digits, accents, CJK and an emoji
TOKENIZER_PROBE = "<|im_start|>user\nWhich is right? (A) 0.25 Confidence: 0.85 café 東京 🙂<|im_end|>\n"
LOGPROB_SLACK = 1e-3  # how far above 0 a log-probability may round (the kernel's own slack)


class TeacherServerError(RolloutServerError):
    """A teacher server failed a request after its retries, or answered what cannot be a top-k list."""


def topk_at(position_logprobs: list, start: int, length: int, k: int, vocab: int, where: str
            ) -> tuple[list[list[int]], list[list[float]]]:
    """(ids, log-probs) of the k most likely tokens at each of positions start .. start + length - 1
    of one prompt's ``prompt_logprobs`` (vLLM: a dict per position, token id -> {"logprob", "rank",
    ...}, possibly with the prompt's own token beyond the top k)."""
    ids, logprobs = [], []
    for t in range(start, start + length):
        entry = position_logprobs[t]
        try:  # (log-prob, id) of the top k: those ranked within k (the prompt's own token may be ranked below)
            scored = sorted(((float(v["logprob"]), int(token)) for token, v in entry.items()
                             if int(v.get("rank", 1)) <= k), reverse=True)[:k]
        except (AttributeError, TypeError, ValueError, KeyError):
            raise TeacherServerError(f"{where}: position {t} is not a map of token id -> {{logprob, rank}}") from None
        if len(scored) < k:
            raise TeacherServerError(f"{where} gave {len(scored)} log-probs at position {t}, fewer than "
                                     f"--teacher-top-k {k}")
        for logprob, token in scored:
            if not 0 <= token < vocab:
                raise TeacherServerError(f"{where}: token id {token} at position {t} is outside the student's "
                                         f"{vocab} rows: is the served model's tokenizer the student's?")
            if not math.isfinite(logprob) or logprob > LOGPROB_SLACK:
                raise TeacherServerError(f"{where}: log-prob {logprob} at position {t} is not a log-probability")
        ids.append([token for _, token in scored])
        logprobs.append([logprob for logprob, _ in scored])
    return ids, logprobs


class TeacherServer:
    """vLLM servers scoring completions for the loss; ``vocab``: how many token ids a top-k list may
    name (the student's tokenizer's)."""

    def __init__(self, urls: list[str], tokenizer, *, top_k: int, vocab: int, max_tokens: int | None = None,
                 ranks=None, timeout: float = 600.0, attempts: int = 3, backoff: float = 1.0):
        from caopd.training.distributed import Ranks

        self.urls, self.top_k, self.vocab, self.ranks = urls, top_k, vocab, ranks or Ranks()
        self.timeout, self.attempts, self.backoff = timeout, attempts, backoff
        self.models = {url: self._check(url, tokenizer, max_tokens) for url in urls}
        self.failure: str | None = None  # the first request that failed on any process, after its retries
        self.pool = ThreadPoolExecutor(max_workers=2 * len(urls), thread_name_prefix="teacher-server")

    def _request(self, url: str, path: str, body: dict | None = None, method: str = "POST", attempts=None):
        return request_json(url, path, body, method, timeout=self.timeout, attempts=attempts or self.attempts,
                            backoff=self.backoff, error=TeacherServerError, what="teacher server")

    def _check(self, url: str, tokenizer, max_tokens: int | None) -> str:
        """The served model's name, after one-line checks: reachable, the student's tokenizer, room for
        the longest sequence, k log-probs a position."""
        flag = f"--teacher-server {url}"
        try:
            models = self._request(url, "/v1/models", method="GET", attempts=1)
        except TeacherServerError as e:
            raise InputError(f"{flag} is unreachable ({e.reason}): start it with caopd rollout-server "
                             f"--model TEACHER --max-logprobs {self.top_k}") from None
        try:
            served = models["data"][0]
            model = served["id"]
            probe = tokenizer(TOKENIZER_PROBE, add_special_tokens=False).input_ids
            theirs = self._request(url, "/tokenize", {"model": model, "prompt": TOKENIZER_PROBE,
                                                      "add_special_tokens": False}, attempts=1)["tokens"]
        except (TeacherServerError, KeyError, IndexError, TypeError):
            raise InputError(f"{flag} does not answer as a vLLM server (/v1/models, /tokenize)") from None
        if theirs != probe:
            raise InputError(f"{flag}: {model}'s tokenizer is not the student's ({TOKENIZER_PROBE!r} is {len(theirs)} "
                             f"tokens there, {len(probe)} here): serve a teacher of the student's tokenizer")
        longest = served.get("max_model_len")
        if max_tokens and isinstance(longest, int) and longest < max_tokens:
            raise InputError(f"{flag}: {model} takes {longest} tokens a request, the run's sequences up to "
                             f"{max_tokens}: restart it with --max-model-len {max_tokens}")
        try:
            choice = self._request(url, "/v1/completions", {"model": model, "prompt": probe, "max_tokens": 1,
                                                            "prompt_logprobs": self.top_k}, attempts=1)["choices"][0]
            topk_at(choice["prompt_logprobs"], 1, len(probe) - 1, self.top_k, 2**62, flag)
        except (TeacherServerError, KeyError, IndexError, TypeError) as e:
            raise InputError(f"{flag}: no {self.top_k} log-probs a position ({e}): start the server with "
                             f"--max-logprobs {self.top_k} or lower --teacher-top-k") from None
        return model

    def submit(self, prompts: list[list[int]], starts: list[int], lengths: list[int]) -> list[Future]:
        """Score the completions ``prompts[b][starts[b]:starts[b] + lengths[b]]`` (each prompt the
        teacher context and its completion), for ``result``. The sequences are split into one
        contiguous request a server, sent now."""
        parts = [(url, range(len(prompts) * i // len(self.urls), len(prompts) * (i + 1) // len(self.urls)))
                 for i, url in enumerate(self.urls)]
        return [self.pool.submit(self._score, url, [prompts[b] for b in rows], [starts[b] for b in rows],
                                 [lengths[b] for b in rows]) for url, rows in parts if len(rows)]

    def _score(self, url: str, prompts, starts, lengths) -> tuple[list, list]:
        body = {"model": self.models[url], "prompt": prompts, "max_tokens": 1, "prompt_logprobs": self.top_k}
        reply = self._request(url, "/v1/completions", body)
        try:
            choices = sorted(reply["choices"], key=lambda c: c["index"])
            scored = [c["prompt_logprobs"] for c in choices]
        except (KeyError, TypeError):
            raise TeacherServerError(f"teacher server {url}: no prompt_logprobs in its reply") from None
        if len(scored) != len(prompts) or any(not isinstance(s, list) or len(s) != len(p)
                                              for s, p in zip(scored, prompts)):
            raise TeacherServerError(f"teacher server {url}: prompt_logprobs do not match the {len(prompts)} "
                                     "prompts sent")
        ids, logprobs = [], []
        for position_logprobs, start, length in zip(scored, starts, lengths):
            i, lp = topk_at(position_logprobs, start, length, self.top_k, self.vocab, f"teacher server {url}")
            ids += i
            logprobs += lp
        return ids, logprobs

    def result(self, pending: list[Future], device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(ids [N, k] int64, log-probs [N, k] float32) on ``device`` of the submitted completions' N
        tokens, in their order. Every process calls it together: when any process's request failed,
        all return None and ``failure`` says why (the loss then finishes its forward and backward with
        nothing to learn, so that FSDP's collectives stay matched, and the loop stops)."""
        from caopd.training.distributed import all_gather

        failure, ids, logprobs = None, [], []
        try:
            for request in pending:
                i, lp = request.result()
                ids += i
                logprobs += lp
        except TeacherServerError as e:
            failure = str(e)
        failures = [f for f in all_gather(failure, self.ranks) if f]
        if failures:
            self.failure = self.failure or failures[0]
            return None
        return (torch.tensor(ids, dtype=torch.int64, device=device).view(-1, self.top_k),
                torch.tensor(logprobs, dtype=torch.float32, device=device).view(-1, self.top_k))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
