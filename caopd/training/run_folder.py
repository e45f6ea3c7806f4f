"""The run folder's rules, as Hugging Face Trainer users know them: a fresh run never lands on an
earlier one, ``--resume`` continues one and nothing else, ``--overwrite`` replaces one.

All checks here run before any work; the one destructive step, ``clear_earlier_run``, is called
by the trainer only with ``--overwrite`` and only after the config, data, tokenizer and model
have loaded, so a typo never costs a run.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from caopd.config import MAY_CHANGE_ON_RESUME, TrainConfig
from caopd.errors import InputError
from caopd.paths import check_local_source, check_output_dir
from caopd.training.checkpoint import checkpoints, complete_checkpoints, saved_config

RUN_ARTIFACTS = ("checkpoints", "metrics.jsonl", "final")  # what makes a folder hold a run
DERIVED = ("tokenizer", "rollout_model", "rollout_weights", "config.yaml")  # rewritten by every fresh run


def earlier_run(out: Path) -> list[Path]:
    """The artifacts of an earlier run in ``out`` (an empty checkpoints/ folder does not count)."""
    found = [out / name for name in RUN_ARTIFACTS if (out / name).exists()]
    return [p for p in found if p.name != "checkpoints" or any(p.glob("step-*"))]


def describe(artifacts: list[Path]) -> str:
    parts = []
    for path in artifacts:
        if path.name == "checkpoints":
            parts.append(f"{len(checkpoints(path))} checkpoint(s)")
        else:
            parts.append(path.name + ("/" if path.is_dir() else ""))
    return ", ".join(parts)


def _same_source(saved, current) -> bool:
    """Equal, or two spellings of one existing local path (relative and absolute, say)."""
    if saved == current:
        return True
    if isinstance(saved, str) and isinstance(current, str) and Path(saved).exists() and Path(current).exists():
        return Path(saved).resolve() == Path(current).resolve()
    return False


def config_changes(saved: dict, config: TrainConfig) -> tuple[list[str], list[str]]:
    """(refused, applied): 'field: old -> new' for each field that differs from the saved config."""
    refused, applied = [], []
    for name, new in vars(config).items():
        if name in ("resume", "overwrite") or name not in saved or _same_source(saved[name], new):
            continue
        (applied if name in MAY_CHANGE_ON_RESUME else refused).append(f"{name}: {saved[name]!r} -> {new!r}")
    return refused, applied


def resumable_config(output_dir: str) -> dict:
    """The config saved with the newest complete checkpoint of a run folder ({} when there is none: the
    resume then stops with its own line), as the base of a resume without --config."""
    import dataclasses

    done = complete_checkpoints(Path(output_dir) / "checkpoints")
    try:
        saved = saved_config(done[-1]) if done else {}
    except (OSError, ValueError, KeyError):
        return {}
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"resume", "overwrite"}
    return {name: value for name, value in saved.items() if name in known}


def check_run_folder(config: TrainConfig, log=print) -> list[Path]:
    """One-line errors, before any work, for every way the run folder or an input path is wrong.
    Returns the earlier run's artifacts that ``--overwrite`` will replace (empty otherwise)."""
    for flag, value in (("--model", config.model), ("--tokenizer", config.tokenizer)):
        check_local_source(value, flag)
    if not config.data_path().exists():
        raise InputError(f"--data {config.data}: no such file or directory")
    out = check_output_dir(config.output_dir)
    earlier = earlier_run(out)
    if config.resume:
        done = complete_checkpoints(out / "checkpoints")
        if not done:
            raise InputError(f"--resume: {out / 'checkpoints'} holds no complete checkpoint (looked for "
                             f"step-NNNNNN folders with a manifest.json; found {len(checkpoints(out / 'checkpoints'))}"
                             " incomplete)")
        try:
            saved = saved_config(done[-1])
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"--resume: {done[-1]}: no readable config in trainer_state.json ({e})") from None
        refused, applied = config_changes(saved, config)
        if refused:
            raise InputError(f"--resume: the config differs from the run's in fields that change the data stream or "
                             f"the model: {'; '.join(refused)} (only {', '.join(sorted(MAY_CHANGE_ON_RESUME))} "
                             "may change; start a new run in another --output-dir)")
        if applied:
            log(f"resuming {out} with changed {'; '.join(applied)}")
        return []
    if earlier and not config.overwrite:
        raise InputError(f"{out} holds an earlier run ({describe(earlier)}): --resume true continues it, "
                         "--overwrite true replaces it, or choose another --output-dir")
    return earlier


def clear_earlier_run(out: Path, artifacts: list[Path], log=print) -> None:
    """Delete an earlier run's artifacts (with --overwrite, after everything loaded)."""
    if not artifacts:
        return
    log(f"--overwrite: removing the earlier run in {out} ({describe(artifacts)})")
    for path in [*artifacts, *(out / name for name in DERIVED)]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
