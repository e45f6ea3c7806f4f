"""No run is lost, no file in a run folder runs code, bad options are one line before any work.

Regression tests of issue 11 (items 1-5, 8-10, 13); each failed on the code before its fix. They
train tiny-qwen3 on the shipped example (no ../shared needed), a few seconds a run.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import pytest
import torch

import caopd.training.placement as placement
from caopd.cli import main
from caopd.config import TrainConfig
from caopd.errors import InputError
from caopd.training.checkpoint import complete_checkpoints, incomplete_reason, truncate_metrics
from caopd.training.trainer import train

TINY = ["--config", "tiny", "--num-generations", "2", "--prompts-per-step", "2", "--max-completion-length", "8",
        "--save-every", "1"]
ROOT = Path(__file__).resolve().parents[1]


def train_cli(out: Path, *extra: str) -> int:
    return main(["train", *TINY, "--output-dir", str(out), *extra])


def tiny_config(out: Path, **kw) -> TrainConfig:
    values = dict(model="tiny-qwen3", tokenizer="fast", output_dir=str(out), num_generations=2, prompts_per_step=2,
                  micro_batch_prompts=2, max_prompt_length=256, max_completion_length=8, max_steps=4, save_every=1,
                  bf16=False, loss_impl="torch", learning_rate=1e-3, seed=5)
    values.update(kw)
    return TrainConfig(**values)


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    assert err[-1].startswith("caopd train: error:"), err
    return err[-1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_cli(out, "--max-steps", "3", "--save-total-limit", "0") == 0
    return out


@pytest.mark.parametrize("extra, message", [
    ([], "holds an earlier run (3 checkpoint(s), metrics.jsonl, final/): --resume true continues it, "
         "--overwrite true replaces it"),
    (["--data", "typo.jsonl"], "--data typo.jsonl: no such file"),
    (["--model", "/bad"], "--model /bad: no such file or directory"),
    (["--learning-rate", "nan"], "'learning_rate' must be a finite number"),
    (["--overwrite", "true", "--data", "typo.jsonl"], "--data typo.jsonl: no such file"),
    (["--overwrite", "true", "--model", "./no/such/model"], "--model ./no/such/model: no such file"),
])
def test_a_fresh_run_never_deletes_an_earlier_one(finished_run, capsys, extra, message):
    """Item 1: each of these deleted the earlier run's checkpoints and log before failing."""
    before = fingerprint(finished_run)
    assert train_cli(finished_run, *extra) == 2
    assert message in one_line_error(capsys)
    assert fingerprint(finished_run) == before


def test_overwrite_clears_only_after_everything_loaded(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train_cli(out, "--max-steps", "2") == 0
    before = fingerprint(out)

    def model_that_fails(*args, **kwargs):
        raise InputError("--model: cannot be loaded (planted)")
    monkeypatch.setattr(placement, "load_model", model_that_fails)
    assert train_cli(out, "--max-steps", "1", "--overwrite") == 2
    assert "planted" in one_line_error(capsys) and fingerprint(out) == before
    monkeypatch.undo()
    assert train_cli(out, "--max-steps", "1", "--overwrite") == 0
    assert "removing the earlier run" in capsys.readouterr().err
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-000001"]


def test_resume_without_a_checkpoint_refuses(tmp_path, capsys):
    """Item 2: a typo in --output-dir with --resume silently started from step 0."""
    assert train_cli(tmp_path / "typo", "--resume") == 2
    assert f"--resume: {tmp_path / 'typo' / 'checkpoints'} holds no complete checkpoint" in one_line_error(capsys)
    assert not (tmp_path / "typo" / "metrics.jsonl").exists()


@pytest.mark.parametrize("extra, changed", [
    (["--data", "{example_copy}"], "data: "),
    (["--seed", "7"], "seed: 42 -> 7"),
    (["--prompts-per-step", "1"], "prompts_per_step: 2 -> 1"),
    (["--model", "{model_dir}"], "model: 'tiny-qwen3' -> "),
    (["--learning-rate", "0.5"], "learning_rate: 0.001 -> 0.5"),
    (["--dataset", "tooluse"], "dataset: 'science' -> 'tooluse'"),
])
def test_resume_refuses_a_changed_data_stream_or_model(finished_run, tmp_path, capsys, extra, changed):
    """Item 3: these were accepted silently (and a new learning rate silently ignored)."""
    example_copy = tmp_path / "copy.jsonl"
    example_copy.write_text((ROOT / "caopd" / "examples" / "arith_mc.jsonl").read_text())
    (tmp_path / "model").mkdir()
    extra = [x.format(example_copy=example_copy, model_dir=tmp_path / "model") for x in extra]
    before = fingerprint(finished_run)
    assert train_cli(finished_run, "--resume", *extra) == 2
    error = one_line_error(capsys)
    assert "the config differs from the run's in fields that change the data stream or the model" in error
    assert changed in error and fingerprint(finished_run) == before


def test_fields_that_may_change_on_resume_apply_and_are_named(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(out, "--max-steps", "2") == 0
    capsys.readouterr()
    assert train_cli(out, "--resume", "--max-steps", "3", "--loss-impl", "torch", "--save-every", "2") == 0
    err = capsys.readouterr().err
    assert "resuming " in err and "max_steps: 2 -> 3" in err and "save_every: 1 -> 2" in err
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def _kill_after(out: Path, steps: int, **kw) -> None:
    """A run stopped after ``steps`` steps, as a kill would leave it (metrics past the checkpoint)."""
    train(tiny_config(out, **kw), stop_after_steps=steps, quiet=True)


def test_resume_skips_a_damaged_checkpoint_and_truncates_the_log(tmp_path, capsys):
    """Items 4 and 5: a truncated latest checkpoint was a traceback; the log kept the dead run's rows."""
    straight = train(tiny_config(tmp_path / "straight"), quiet=True)
    out = tmp_path / "killed"
    _kill_after(out, 3, save_total_limit=0)
    last = out / "checkpoints" / "step-000003" / "model.safetensors"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a save cut off by a full disk
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in rows] == [1, 2, 3]
    resumed = train(tiny_config(out, resume=True), progress="resume")
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step-000003" in err and "model.safetensors has" in err
    assert "resuming from" in err and "step-000002 (step 2)" in err and "dropped 1 metrics row" in err
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    for name, value in straight["student"].state_dict().items():  # the fallback resumes exactly
        assert torch.equal(value, resumed["student"].state_dict()[name]), name


def test_resume_skips_a_checkpoint_whose_bytes_changed(tmp_path, capsys):
    """Issue 26 item 1: a tensor's bytes changed at the same size loaded silently (sizes only in the manifest)."""
    out = tmp_path / "run"
    _kill_after(out, 2)
    damaged = out / "checkpoints" / "step-000002" / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-8:] = bytes(8)  # the last tensor's last bytes: the file still loads
    damaged.write_bytes(bytes(data))
    train(tiny_config(out, resume=True, max_steps=3), quiet=False, progress="resume")
    err = capsys.readouterr().err
    assert "step-000002: model.safetensors does not match its checksum" in err and "(step 1)" in err


def test_resume_skips_an_older_checkpoint_whose_bytes_are_garbage(tmp_path, capsys):
    out = tmp_path / "run"
    _kill_after(out, 2)
    folder = out / "checkpoints" / "step-000002"
    manifest = json.loads((folder / "manifest.json").read_text())  # an older caopd's: sizes only
    manifest["files"] = {name: entry["size"] for name, entry in manifest["files"].items()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    damaged = folder / "state.safetensors"
    damaged.write_bytes(b"\xff" * damaged.stat().st_size)  # right size, manifest intact, unreadable
    train(tiny_config(out, resume=True, max_steps=3), quiet=False, progress="resume")
    err = capsys.readouterr().err
    assert "step-000002: it does not load" in err and "(step 1)" in err


def test_save_total_limit_keeps_the_newest_and_save_every_0_keeps_none(tmp_path):
    train(tiny_config(tmp_path / "two"), quiet=True)
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] != []
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    train(tiny_config(tmp_path / "all", save_total_limit=0), quiet=True)
    assert len(list((tmp_path / "all" / "checkpoints").iterdir())) == 4
    train(tiny_config(tmp_path / "none", max_steps=2, save_every=0), quiet=True)  # save_strategy 'no': final/ only
    assert not (tmp_path / "none" / "checkpoints").exists() or not list((tmp_path / "none" / "checkpoints").iterdir())
    assert (tmp_path / "none" / "final" / "model.safetensors").exists()


def test_truncate_metrics_keeps_rows_up_to_the_step(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    assert truncate_metrics(log, 2) == 2 and log.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert truncate_metrics(tmp_path / "absent.jsonl", 2) == 0


class _Planted:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_crafted_pickle_in_a_run_folder_never_runs(tmp_path, capsys):
    """Item 8: a crafted checkpoint.pt ran os.system on --resume (torch.load, weights_only=False)."""
    out = tmp_path / "run"
    _kill_after(out, 1)
    marker = tmp_path / "pwned"
    planted = _Planted()
    planted.marker = str(marker)
    crafted = out / "checkpoints" / "step-000009"
    crafted.mkdir()
    (crafted / "checkpoint.pt").write_bytes(pickle.dumps({"student": planted}))
    assert incomplete_reason(crafted).startswith("a checkpoint.pt of an older caopd")
    train(tiny_config(out, resume=True, max_steps=2), quiet=False, progress="resume")
    assert not marker.exists() and "skipping checkpoint" in capsys.readouterr().err
    assert {p.suffix for p in (out / "checkpoints" / "step-000002").iterdir()} == {".safetensors", ".json"}


def test_no_module_unpickles():
    """Nothing in the product loads a pickle: checkpoints are safetensors + JSON."""
    pattern = re.compile(r"torch\.load\(|pickle\.loads?\(|weights_only\s*=\s*False|numpy\.load\(|np\.load\(")
    sources = [p for folder in ("caopd", "kernels", "scripts", "benchmarks") for p in (ROOT / folder).rglob("*.py")]
    hits = [f"{p}:{n}" for p in sources for n, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert hits == []


@pytest.mark.parametrize("extra, message", [
    (["--model", "/nonexistent"], "--model /nonexistent: no such file or directory"),
    (["--model", "./relative/model"], "--model ./relative/model: no such file or directory"),
    (["--model", "runs/x/final"], "--model runs/x/final: no such file or directory"),
    (["--tokenizer", "/no/tokenizer"], "--tokenizer /no/tokenizer: no such file or directory"),
    (["--output-dir", "{file}"], "--output-dir {file}: is a file, not a folder"),
    (["--output-dir", "{file}/sub"], "--output-dir {file}/sub: cannot write there"),
])
def test_bad_paths_are_one_line_at_once(tmp_path, capsys, extra, message):
    """Item 10: a missing model path was a hub-id traceback (after 26 s for a relative one)."""
    file = tmp_path / "file.txt"
    file.write_text("x")
    extra = [x.format(file=file) for x in extra]
    args = extra if "--output-dir" in extra else [*extra, "--output-dir", str(tmp_path / "out")]
    assert main(["train", *TINY, *args]) == 2
    assert message.format(file=file) in one_line_error(capsys)


def test_max_grad_norm_zero_means_no_clipping(tmp_path):
    """0 turns clipping off (as in transformers); torch's clip to norm 0 would zero every gradient."""
    config = tiny_config(tmp_path / "run", max_grad_norm=0.0, max_steps=1, teacher_ema=0.0)
    result = train(config, quiet=True)
    assert result["history"][0]["grad_norm"] > 0
    assert not torch.equal(result["student"].state_dict()["model.norm.weight"],
                           result["teacher"].state_dict()["model.norm.weight"])  # the frozen teacher = the start


