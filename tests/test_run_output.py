"""What a run tells its user (issue 27, items 1 and 3): the defaults `--help` prints are the ones used
without --config; the first line names the config and where each non-default value came from; a
resume without --config continues with the run's own config; the resolved config in config.yaml;
a line every --logging-steps; Ctrl-C is one line and exit code 130; a tokenizer that does not fit the
model's embedding is refused.

Deliberate bugs these catch: a hidden default config (tiny) under no --config, sources attributed to
the wrong place, a resume without --config judged against the defaults (refused), config.yaml
written before the launcher's settings, a step line every step whatever N, a traceback on Ctrl-C.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

import caopd.training.trainer as trainer_module
from caopd.cli import main
from caopd.config import TrainConfig


def sources(first_line: str) -> dict[str, set[str]]:
    """{"flags": {...}, "the config file": {...}, ...} from a run's first line."""
    body = first_line.split(" (all values in")[0]
    parts = [part.removeprefix("from ") for part in body.split("; ")[1:] if part.startswith("from ")]
    return {source: set(names.split(", ")) for source, names in (part.split(": ", 1) for part in parts)}


SHORT = ["--num-generations", "2", "--prompts-per-step", "2", "--max-completion-length", "8", "--save-every", "1"]


def test_no_config_runs_the_defaults_help_prints_and_says_where_values_came_from(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SHORT, "--max-steps", "1", "--output-dir", str(out)]) == 0
    stdout = capsys.readouterr().out
    first = stdout.splitlines()[0]
    assert first.startswith("caopd train: no --config (the defaults of caopd train --help); from flags: ")
    flagged = {"num_generations", "prompts_per_step", "max_completion_length", "save_every", "max_steps",
               "output_dir"}
    assert sources(first) == {"flags": flagged}
    used = yaml.safe_load((out / "config.yaml").read_text())
    defaults = dataclasses.asdict(TrainConfig())  # what --help prints as each field's default (test_config)
    assert defaults["rollout_engine"] == "auto" and used.pop("rollout_engine") == "transformers"  # what auto chose
    assert {k: v for k, v in used.items() if k not in flagged} == {k: v for k, v in defaults.items()
                                                                   if k not in flagged | {"rollout_engine"}}
    assert "step 1/1  loss " in stdout and "  P_acc " in stdout and " s/step" in stdout

    # a resume without --config continues with the run's own config (tokenizer fast is not the default)
    assert main(["train", "--config", "tiny", "--output-dir", str(tmp_path / "tiny"), *SHORT, "--max-steps", "2",
                 "--logging-steps", "2"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[0].startswith("caopd train: config tiny; from the config file: ")
    given = sources(stdout.splitlines()[0])
    assert given["flags"] == {"num_generations", "prompts_per_step", "max_completion_length", "save_every",
                              "max_steps", "output_dir", "logging_steps"}
    assert {"tokenizer", "learning_rate"} <= given["the config file"]
    assert "step 1/2" not in stdout and "step 2/2  loss" in stdout  # every 2nd step
    assert main(["train", "--resume", "--output-dir", str(tmp_path / "tiny"), "--max-steps", "3"]) == 0
    given = sources(capsys.readouterr().out.splitlines()[0])
    assert given["flags"] == {"output_dir", "max_steps", "resume"}
    assert {"tokenizer", "learning_rate", "num_generations", "logging_steps"} <= given["the resumed run"]
    assert [json.loads(x)["step"] for x in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_ctrl_c_is_one_line_and_exit_code_130(tmp_path, capsys, monkeypatch):
    calls = []
    real = trainer_module.verify_rollouts

    def interrupted_in_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # step 1 verifies 2 prompts
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "verify_rollouts", interrupted_in_step_2)
    assert main(["train", "--config", "tiny", *SHORT, "--output-dir", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "caopd train: interrupted: stopped at step 1; the last checkpoint is step 1; continue with " \
                  "--resume true"


@pytest.mark.parametrize("vocab, message", [(151_936, "most rows would never be trained"), (64, "ids past its end")])
def test_a_tokenizer_that_does_not_fit_the_embedding_is_refused(tmp_path, capsys, vocab, message):
    config = {"model_type": "qwen3", "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["train", "--model", f"random:{tmp_path / 'config.json'}", "--tokenizer", "fast",
                 "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"rows ({message}): use the model's own tokenizer" in err and "\n" not in err


def test_report_to_sends_each_step_to_the_trackers(tmp_path, capsys, monkeypatch):
    """Issue 27 item 3: --report-to through accelerate's trackers; none by default; one line when missing."""
    import accelerate.tracking

    import caopd.training.report_to as report_to

    calls = []

    class Recorder:
        def __init__(self, run_name, logging_dir=None):
            calls.append(("init", run_name, logging_dir))

        def start(self):
            calls.append(("start",))

        def store_init_configuration(self, values):
            calls.append(("config", values["num_generations"]))

        def log(self, values, step):
            calls.append(("log", step, values["loss"]))

        def finish(self):
            calls.append(("finish",))

    assert main(["train", "--config", "tiny", *SHORT, "--max-steps", "1", "--report-to", "tensorboard",
                 "--output-dir", str(tmp_path / "missing")]) == 2  # not installed here
    assert "--report-to tensorboard needs tensorboard: pip install tensorboard" in capsys.readouterr().err
    monkeypatch.setattr(accelerate.tracking, "Recorder", Recorder, raising=False)
    monkeypatch.setitem(report_to.TRACKERS, "tensorboard", ("Recorder", "json", "tensorboard"))
    out = tmp_path / "run"
    assert main(["train", "--config", "tiny", *SHORT, "--max-steps", "2", "--report-to", "tensorboard",
                 "--output-dir", str(out)]) == 0
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert calls == [("init", "run", str(out / "runs")), ("start",), ("config", 2), ("log", 1, losses[0]),
                     ("log", 2, losses[1]), ("finish",)]
    calls.clear()
    assert main(["train", "--config", "tiny", *SHORT, "--max-steps", "1", "--output-dir", str(tmp_path / "none")]) == 0
    assert calls == []  # none by default
