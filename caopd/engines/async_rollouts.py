"""AsyncRollouts: sample the rollouts of the next steps while the current step trains.

A background thread works through the steps in order. Before sampling step s it waits until the
trainer has published policy version >= s - max_staleness (version v = the weights after v
optimizer steps), loads the newest published weights into its engine, and samples step s's
request (prompts and seed come from ``request(s)``, so the data order never depends on timing).
Each batch records the version it was sampled from. With max_staleness = 0 every batch comes from
the weights the synchronous loop would use: the results are the same bit for bit.

The engine must not share parameters with the model being trained (weights change under it):
give it its own copy; published weights are snapshots. An exception in the worker is raised by
the trainer's next ``get``; ``close`` (also on Ctrl-C, via the trainer's finally) stops the thread.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from caopd.engines.base import RolloutEngine, SamplingParams


@dataclass(frozen=True)
class RolloutRequest:
    prompts: list[list[int]]
    n: int
    sampling: SamplingParams


@dataclass(frozen=True)
class RolloutBatch:
    step: int
    completions: list[list[str]]
    policy_version: int  # the weights after this many optimizer steps produced the batch


class _WorkerError:
    def __init__(self, error: BaseException):
        self.error = error


class AsyncRollouts:
    def __init__(self, engine: RolloutEngine, request: Callable[[int], RolloutRequest], first_step: int,
                 total_steps: int, max_staleness: int = 1, initial_version: int | None = None):
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.engine, self.request, self.max_staleness = engine, request, max_staleness
        self.first_step, self.total_steps = first_step, total_steps
        self._ready: queue.Queue = queue.Queue(maxsize=max_staleness + 1)
        self._changed = threading.Condition()
        self._version = first_step if initial_version is None else initial_version
        self._pending: dict[str, torch.Tensor] | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="caopd-rollouts", daemon=True)
        self._thread.start()

    def publish(self, weights: dict[str, torch.Tensor], version: int) -> None:
        """The trainer's weights after ``version`` optimizer steps (a snapshot the worker may keep)."""
        with self._changed:
            self._pending, self._version = weights, version
            self._changed.notify_all()

    def get(self, step: int, timeout: float | None = None) -> RolloutBatch:
        item = self._ready.get(timeout=timeout)
        if isinstance(item, _WorkerError):
            raise item.error
        if item.step != step:
            raise RuntimeError(f"rollouts out of order: expected step {step}, got {item.step}")
        return item

    def close(self) -> None:
        with self._changed:
            self._stop = True
            self._changed.notify_all()
        while self._thread.is_alive():
            try:  # unblock a worker waiting to put
                self._ready.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _put(self, item) -> bool:
        while True:
            with self._changed:
                if self._stop:
                    return False
            try:
                self._ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            for step in range(self.first_step, self.total_steps):
                with self._changed:
                    self._changed.wait_for(lambda s=step: self._stop or self._version >= s - self.max_staleness)
                    if self._stop:
                        return
                    weights, version, self._pending = self._pending, self._version, None
                if weights is not None:
                    self.engine.update_weights(weights)
                req = self.request(step)
                completions = self.engine.generate(req.prompts, req.n, req.sampling)
                if not self._put(RolloutBatch(step, completions, version)):
                    return
        except BaseException as error:  # surfaces in the trainer's next get()
            self._put(_WorkerError(error))
