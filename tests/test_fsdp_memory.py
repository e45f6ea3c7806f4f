"""Each process holds its share (issue 23): one run on 1 process and on 2 (FSDP2, gloo), measured.

A random Qwen3-shaped model large enough to dominate the interpreter (0.25B parameters: hidden
1024, 16 layers, intermediate 4096; a small vocabulary, so the decoder layers dominate as they do
in Qwen3-32B, where they are 95 % of the parameters) trains two CaOPD steps (the second holds
Adam's moments through its backward: the steady state). The trainer records
each process's peak resident memory per phase (``memory.json``: load, the step, the checkpoint and
final saves). Each of the 2 processes must peak at <= 0.65x the single process, in every phase,
and ``caopd memory --device cpu --gpus 2`` must be within 15 % of each process's measured peak.

Deliberate bugs these catch (each tried): the final save gathering every tensor before writing
(final save 0.72x), freed host memory kept resident (load 0.74x, as before release_freed_memory;
the planner's load estimate then misses too).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_distributed import caopd

SHAPE = {"model_type": "qwen3", "vocab_size": 1024, "hidden_size": 1024, "intermediate_size": 4096,
         "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 64,
         "tie_word_embeddings": False, "max_position_embeddings": 4096}
PHASES = ("load", "steps", "checkpoint_save", "final_save")
PROMPT = 16  # a prompt's last tokens: the weights, not the activations, are what the processes share out
COMPLETION = 1  # sampled tokens (CaOPD appends its confidence line): each FSDP decoding step gathers the model


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("fsdp_memory")
    (root / "config.json").write_text(json.dumps(SHAPE))
    args = ["--config", "tiny", "--model", f"random:{root / 'config.json'}", "--tokenizer", "fast",
            "--num-generations", "2", "--prompts-per-step", "2", "--micro-batch-prompts", "1",
            "--max-completion-length", str(COMPLETION), "--max-prompt-length", str(PROMPT), "--max-steps", "2",
            "--save-every", "2"]
    caopd([*args, "--output-dir", str(root / "one")], env={"OMP_NUM_THREADS": "2"})
    caopd([*args, "--output-dir", str(root / "two"), "--fsdp", "true"], processes=2)
    return {1: root / "one", 2: root / "two"}


def measured(run: Path) -> dict:
    return json.loads((run / "memory.json").read_text())


@pytest.mark.slow
def test_each_of_two_processes_holds_at_most_0_65_of_one_process(runs):
    one, two = measured(runs[1]), measured(runs[2])
    assert two["processes"] == 2 and one["processes"] == 1
    for phase in PHASES:
        single = one[phase][0]["host_gib"]
        for rank, reading in enumerate(two[phase]):
            assert reading["host_gib"] <= 0.65 * single, (phase, rank, reading["host_gib"], single)


@pytest.mark.slow
def test_the_planner_matches_each_measured_process(runs):
    from caopd.inputs.data import load_examples
    from caopd.inputs.prompts import student_messages
    from caopd.modeling.memory import GIB, Plan, estimate
    from caopd.modeling.models import load_tokenizer
    from caopd.training.loss import chat_ids

    steps = [json.loads(line) for line in (runs[2] / "metrics.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer("tiny-qwen3", str(runs[2] / "tokenizer"))
    examples = load_examples(Path(__file__).resolve().parents[1] / "caopd" / "examples" / "arith_mc.jsonl", "science")
    prompt = min(PROMPT, max(len(chat_ids(tokenizer, student_messages(examples[i]), {"enable_thinking": False}))
                             for row in steps for i in row["prompts"]))
    plan = Plan(str(runs[2].parent / "config.json"), device="cpu", gpus=2, fsdp=True, prompt_tokens=prompt,
                completion_tokens=COMPLETION, num_generations=2, prompts_per_step=2)
    two = measured(runs[2])
    for rank in range(2):
        peak = max(two[phase][rank]["host_gib"] for phase in PHASES)
        estimated = estimate(plan, main=rank == 0).peak / GIB
        assert estimated == pytest.approx(peak, rel=0.15), (rank, estimated, peak)
        load = estimate(plan, main=rank == 0).phase_peak("load") / GIB
        assert load == pytest.approx(two["load"][rank]["host_gib"], rel=0.15), (rank, load)
