"""--report-to: the step metrics to experiment trackers, through accelerate's tracker classes.

``none`` is the default: nothing leaves the machine unless asked. Each named tracker must be
installed (one line naming the pip package otherwise); the main process opens them with the run's
config, logs each step's numeric metrics and closes them at the end.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from caopd.errors import InputError

# name: (accelerate's class, the module it needs, its pip package)
TRACKERS = {"tensorboard": ("TensorBoardTracker", "tensorboard", "tensorboard"),
            "wandb": ("WandBTracker", "wandb", "wandb"),
            "trackio": ("TrackioTracker", "trackio", "trackio")}
CHOICES = ("none", *TRACKERS)


def tracker_names(report_to: str) -> list[str]:
    """The trackers of a --report-to value (comma-separated, or none), each checked to be installed."""
    names = [] if report_to == "none" else [n.strip() for n in report_to.split(",") if n.strip()]
    for name in names:
        if name not in TRACKERS:
            raise InputError(f"--report-to {name}: not one of {', '.join(CHOICES)}")
        _, module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise InputError(f"--report-to {name} needs {package}: pip install {package}")
    return names


def open_trackers(names: list[str], out: Path, config: dict) -> list:
    """Started trackers for the run in ``out`` (TensorBoard logs under out/runs/), the config stored."""
    import accelerate.tracking

    trackers = []
    for name in names:
        cls = getattr(accelerate.tracking, TRACKERS[name][0])
        tracker = cls(out.name, logging_dir=str(out / "runs")) if name == "tensorboard" else cls(out.name)
        tracker.start()
        tracker.store_init_configuration({k: v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
                                          for k, v in config.items()})
        trackers.append(tracker)
    return trackers


def log_step(trackers: list, record: dict) -> None:
    """A metrics.jsonl row's numbers, at its step."""
    values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
              and k != "step"}
    for tracker in trackers:
        tracker.log(values, step=record["step"])


def close(trackers: list) -> None:
    for tracker in trackers:
        tracker.finish()
