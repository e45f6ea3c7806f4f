"""``caopd demo``: the paper's finding, replicated on a laptop CPU in minutes.

Per seed: generate the secret-digit task (``task``), build ``tiny-qwen3`` and a tokenizer
trained on the task's text, warm it up (``warmup``: answer format, and the in-context skills the
teacher needs), then train plain OPD and CaOPD from that same start with the real trainer
(``trainer.train``: same engine, loss and steps; the only difference is ``empirical_calibration``),
and evaluate base, OPD and CaOPD on the held-out and out-of-distribution splits with the metrics
of ``caopd eval``. Writes ``report.json``, ``report.md`` and ``demo.png`` (reliability diagrams of
the three models, and accuracy / stated confidence over the training steps).
"""
from __future__ import annotations

import json
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from caopd.config import TrainConfig
from caopd.demo.task import build_splits, candidate_count, write_jsonl
from caopd.demo.warmup import supervised_warmup, warmup_sequences
from caopd.engines.hf import TransformersEngine
from caopd.errors import InputError
from caopd.evaluation.benchmark_eval import GenerationSettings, generate_and_score
from caopd.evaluation.evaluate import EvalReport
from caopd.evaluation.tables import format_table
from caopd.inputs.data import Example, load_examples
from caopd.inputs.prompts import demonstration, teacher_messages
from caopd.modeling.models import TINY_MODEL, fast_tokenizer, load_model
from caopd.paths import check_output_dir
from caopd.training.run_folder import earlier_run
from caopd.training.trainer import train

DATASET = "science"
MODELS = ("base", "OPD", "CaOPD")
EVAL_SPLITS = ("heldout", "ood")


@dataclass(frozen=True)
class DemoSettings:
    warmup_examples: int = 6000
    train_examples: int = 2400  # 150 steps x 16 prompts: each question distilled on once
    heldout_examples: int = 400
    ood_examples: int = 240
    warmup_steps: int = 300
    warmup_batch: int = 40
    warmup_lr: float = 3e-3
    base_overconfidence: float = 0.35  # the base model states 1/m + this (± 0.1): ordered but overconfident
    teacher_share: float = 0.6  # at 0.35 the teacher copied the shown confidence with p 0.84-0.98, at 0.6 0.96-0.99
    model_sizes: tuple = (("hidden_size", 64), ("layers", 2), ("heads", 4), ("kv_heads", 2),
                          ("intermediate_size", 192))
    train_steps: int = 150
    num_generations: int = 8
    prompts_per_step: int = 16
    train_rollouts: int = 2
    learning_rate: float = 2e-3  # 150 steps: at 1e-3 CaOPD's stated confidence had not settled (ECE 0.12)
    # both methods: the forward KL fits the mean of CaOPD's noisy targets, the reverse KL their mode
    # (underconfident on hard questions); OPD's target, 1.00, has no spread, so either KL gives it
    divergence: str = "forward"
    confidence_prior: float = 8.0  # CaOPD's target, the Beta posterior with the stated confidence (0: the paper's)
    confidence_divergence: str = "same"
    teacher_ema: float = 0.0
    teacher_top_k: int = 0  # the teacher's top-k log-probabilities and a tail bucket (0: the full vocabulary)
    eval_samples: int = 4

    @classmethod
    def quick(cls) -> DemoSettings:
        """About 55 s a seed on 2 CPU cores (54 s measured). 150 warm-up steps (60 left the base model without the
        answer format, and OPD and CaOPD then stated alike): with them OPD already states ~0.85
        and CaOPD ~0.15 after 8 steps, the paper's direction, which the test suite checks."""
        return cls(warmup_examples=1500, train_examples=400, heldout_examples=120, ood_examples=60, warmup_steps=150,
                   train_steps=8, prompts_per_step=8, eval_samples=2)


def train_config(settings: DemoSettings, base_dir: Path, train_path: Path, out: Path, calibrate: bool,
                 seed: int, overwrite: bool = False) -> TrainConfig:
    """The trainer's config for one method: everything equal but ``empirical_calibration``."""
    return TrainConfig(model=str(base_dir), tokenizer=str(base_dir), dataset=DATASET, data=str(train_path),
                       output_dir=str(out), empirical_calibration=calibrate, num_generations=settings.num_generations,
                       train_rollouts=settings.train_rollouts, prompts_per_step=settings.prompts_per_step,
                       micro_batch_prompts=settings.prompts_per_step, max_prompt_length=256,
                       max_completion_length=24, max_steps=settings.train_steps, learning_rate=settings.learning_rate,
                       warmup_ratio=0.1, teacher_ema=settings.teacher_ema, divergence=settings.divergence,
                       confidence_prior=settings.confidence_prior,
                       confidence_divergence=settings.confidence_divergence, teacher_top_k=settings.teacher_top_k,
                       skip_loss_tokens=0, bf16=False,
                       save_every=10_000, seed=seed, loss_impl="torch", overwrite=overwrite)


def evaluate_model(model, tokenizer, examples: list[Example], samples: int, seed: int,
                   completions_path: Path) -> tuple[EvalReport, dict]:
    """``caopd eval --model``'s generate-and-score (benchmark_eval) at the rollouts' temperature 1,
    ``samples`` completions a question saved in ``caopd eval``'s input format (a missing confidence
    counts as 0); also the accuracy and mean stated confidence per candidate count."""
    # 50 questions a decoding loop: 2.2x faster than all 400 at once on 2 CPU cores (a loop runs until its
    # longest row ends, and fewer rows end sooner)
    settings = GenerationSettings(samples=samples, temperature=1.0, max_tokens=24, seed=seed, batch_size=50)
    Path(completions_path).unlink(missing_ok=True)  # a fresh sample of this model, never a resumed one
    report, scored = generate_and_score(TransformersEngine(model, tokenizer), tokenizer, examples, DATASET, settings,
                                        completions_path, missing_confidence="zero", progress=None)
    candidates = {e.id: candidate_count(e.prompt[-1]["content"]) for e in examples}
    by_count: dict[int, list] = {}
    for s in scored:
        by_count.setdefault(candidates[s.id], []).append(s)
    breakdown = {m: {"accuracy": statistics.fmean(s.correct for s in rows),
                     "mean_confidence": statistics.fmean(s.confidence or 0.0 for s in rows), "n": len(rows)}
                 for m, rows in sorted(by_count.items())}
    return report, breakdown


def base_confidence(example: Example, rng: random.Random, overconfidence: float) -> float:
    """What the warmed-up model states, like a pretrained LLM's: lower on harder questions (1/m +
    ``overconfidence`` ± 0.1, in steps of 0.05), but well above what it achieves."""
    stated = 1 / candidate_count(example.prompt[-1]["content"]) + overconfidence + rng.uniform(-0.1, 0.1)
    return min(1.0, max(0.0, round(stated / 0.05) * 0.05))


def make_data(seed: int, settings: DemoSettings, out: Path) -> tuple[dict[str, Path], dict[str, list[Example]]]:
    sizes = {"warmup": settings.warmup_examples, "train": settings.train_examples,
             "heldout": settings.heldout_examples, "ood": settings.ood_examples}
    paths = {name: write_jsonl(rows, out / "data" / f"{name}.jsonl")
             for name, rows in build_splits(seed, sizes).items()}
    return paths, {name: load_examples(path, DATASET) for name, path in paths.items()}


def warm_up(seed: int, settings: DemoSettings, examples: list[Example], base_dir: Path):
    """tiny-qwen3 and a tokenizer trained on the task's text, after the supervised warm-up; saved
    to ``base_dir`` (the trainer loads it from there like any checkpoint)."""
    corpus = [m["content"] for e in examples[:400] for m in teacher_messages(e, demonstration(e, DATASET), "demo", 0.5)]
    tokenizer = fast_tokenizer(corpus)
    model = load_model(TINY_MODEL, tokenizer, seed=seed, **dict(settings.model_sizes))
    sequences = warmup_sequences(examples, DATASET, tokenizer, random.Random(seed),
                                 partial(base_confidence, overconfidence=settings.base_overconfidence),
                                 settings.teacher_share)
    with tqdm(total=settings.warmup_steps, desc=f"seed {seed}: warm-up") as bar:
        def tick(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        losses = supervised_warmup(model, sequences, steps=settings.warmup_steps, batch_size=settings.warmup_batch,
                                   learning_rate=settings.warmup_lr, seed=seed, pad_id=tokenizer.pad_token_id,
                                   on_step=tick)
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    return model, tokenizer, losses


def run_seed(seed: int, settings: DemoSettings, out: Path, overwrite: bool = False) -> dict:
    paths, examples = make_data(seed, settings, out)
    base, tokenizer, warmup_losses = warm_up(seed, settings, examples["warmup"], out / "base")
    trained, histories = {"base": base}, {}
    for method, calibrate in (("OPD", False), ("CaOPD", True)):
        run = train(train_config(settings, out / "base", paths["train"], out / method, calibrate, seed, overwrite),
                    progress=f"seed {seed}: {method}")
        trained[method], histories[method] = run["student"], run["history"]
    evaluation = {}
    for name, model in trained.items():
        for split in EVAL_SPLITS:
            report, breakdown = evaluate_model(model, tokenizer, examples[split], settings.eval_samples,
                                               seed * 7919 + 1, out / "completions" / f"{name}-{split}.jsonl")
            evaluation.setdefault(name, {})[split] = {"metrics": asdict(report.metrics),
                                                      "format_adherence": report.format_adherence,
                                                      "by_candidates": breakdown}
    return {"seed": seed, "warmup_final_loss": statistics.fmean(warmup_losses[-20:]), "evaluation": evaluation,
            "trajectory": {m: [{"step": r["step"], "rollout_accuracy": r["rollout_accuracy"],
                                "mean_confidence": r["mean_confidence"], "mean_p_acc": r["mean_p_acc"]}
                               for r in h] for m, h in histories.items()}}


TARGETS = "OPD OCG >= +0.20; CaOPD |OCG| <= 0.05 and ECE <= 0.08; |acc CaOPD - acc OPD| <= 0.02; SPR CaOPD > OPD"


def check_targets(evaluation: dict, split: str = "heldout") -> dict[str, bool]:
    opd, caopd = evaluation["OPD"][split]["metrics"], evaluation["CaOPD"][split]["metrics"]
    return {"OPD OCG >= 0.20": opd["ocg"] >= 0.20, "CaOPD abs(OCG) <= 0.05": abs(caopd["ocg"]) <= 0.05,
            "CaOPD ECE <= 0.08": caopd["ece"] <= 0.08,
            "accuracy within 2 points": abs(caopd["accuracy"] - opd["accuracy"]) <= 0.02,
            "CaOPD SPR > OPD SPR": caopd["spr"] > opd["spr"]}


METRICS = (("accuracy", "acc"), ("ece", "ECE"), ("brier", "Brier"), ("spr", "SPR"), ("ocg", "OCG"),
           ("mean_confidence", "conf"), ("format_adherence", "format"))


def summary_rows(per_seed: list[dict], models: tuple[str, ...] = MODELS) -> list[list]:
    """One row per split and model: each metric's mean over seeds (± the spread, with several seeds)."""
    rows = []
    for split in EVAL_SPLITS:
        for name in models:
            entries = [s["evaluation"][name][split] for s in per_seed]
            values = [[{**e["metrics"], "format_adherence": e["format_adherence"]}[k] for e in entries]
                      for k, _ in METRICS]
            cells = [f"{statistics.fmean(v):.3f}" + (f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "")
                     for v in values]
            rows.append([split, name, *cells])
    return rows


def run_demo(output_dir: str | Path, seeds: int = 1, quick: bool = False, first_seed: int = 0,
             overwrite: bool = False) -> dict:
    """The demo into ``output_dir``; an earlier demo's training runs there are replaced only with
    ``overwrite`` (checked before any work, as ``caopd train`` does)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per phase is ours; no per-save/load bars
    settings = DemoSettings.quick() if quick else DemoSettings()
    out = check_output_dir(output_dir, "--out")
    earlier = [run for seed in range(first_seed, first_seed + seeds) for method in ("OPD", "CaOPD")
               if earlier_run(run := out / f"seed-{seed}" / method)]
    if earlier and not overwrite:
        raise InputError(f"--out {out} holds an earlier demo's runs ({', '.join(str(p) for p in earlier)}): "
                         "--overwrite replaces them (make demo DEMO_ARGS=--overwrite), or choose another --out")
    start = time.perf_counter()
    per_seed = []
    for seed in range(first_seed, first_seed + seeds):
        t0 = time.perf_counter()
        result = run_seed(seed, settings, out / f"seed-{seed}", overwrite)
        result["seconds"] = time.perf_counter() - t0
        result["targets_heldout"] = check_targets(result["evaluation"])
        per_seed.append(result)
    headers = ["split", "model", *(label for _, label in METRICS)]
    table = format_table(headers, summary_rows(per_seed), markdown=True)
    report = {"settings": asdict(settings), "quick": quick, "seeds": [s["seed"] for s in per_seed],
              "device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                        f"torch {torch.__version__}", "seconds": time.perf_counter() - start, "targets": TARGETS,
              "per_seed": per_seed}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    target_rows = [[s["seed"], *("yes" if ok else "NO" for ok in s["targets_heldout"].values()), f"{s['seconds']:.0f}"]
                   for s in per_seed]
    target_table = format_table(["seed", *per_seed[0]["targets_heldout"], "seconds"], target_rows, markdown=True)
    (out / "report.md").write_text(f"# caopd demo: OPD vs CaOPD from the same start\n\n{report['device']}; "
                                   f"{len(per_seed)} seed(s), {'quick' if quick else 'full'} settings.\n\n{table}\n\n"
                                   f"Targets on the held-out split:\n\n{target_table}\n")
    from caopd.evaluation.plots import save_demo_figure

    save_demo_figure(per_seed, out / "demo.png")
    print(table + "\n\n" + target_table)
    print(f"wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'demo.png'}")
    return report
