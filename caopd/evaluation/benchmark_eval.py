"""``caopd eval --model``: generate completions for an evaluation set, then score them.

The student prompt is built exactly as training builds it (``prompts.student_messages``, the same
chat-template kwargs); generation goes through the project's rollout engines (vLLM when installed,
transformers otherwise), greedy by default as the paper's evaluation; the scoring is
``evaluate.score_completions``. Completions are appended to a JSONL file (``caopd eval``'s input
format) as each batch finishes, a row per write call, so an interrupted run resumes: a rerun with
the same arguments skips the questions already there. The settings that made the completions (model,
its weights' fingerprint, data, samples, temperature, top-p, max tokens, seed) are recorded beside
the file (``<file>.settings.json``); a rerun with other settings is refused with one line naming the
difference, and ``--overwrite`` replaces the file. The demo evaluates its models through
``generate_and_score`` too.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from caopd.engines.base import SamplingParams
from caopd.errors import InputError
from caopd.evaluation.evaluate import (
    Completion,
    EvalReport,
    ScoredCompletion,
    read_completions,
    score_completions,
    summarize,
)
from caopd.inputs.data import Example
from caopd.inputs.prompts import student_messages
from caopd.training.loss import chat_ids

DATA_DIR_VARIABLE = "CAOPD_DATA_DIR"
DATA_HELP = ("the evaluation sets are the CaOPD paper's (github.com/SalesforceAIResearch/CaOPD, data/; licence CC "
             "BY-NC 4.0): pass --data FILE_OR_DIR, or put them under ${CAOPD_DATA_DIR}/<dataset>/")


def default_data(dataset: str) -> Path:
    """Without --data: the first JSONL file or saved dataset directory under $CAOPD_DATA_DIR/<dataset>/."""
    root = os.environ.get(DATA_DIR_VARIABLE)
    if not root:
        raise InputError(f"--data is needed: {DATA_HELP}")
    folder = Path(root).expanduser() / dataset
    if (folder / "dataset_info.json").exists() or (folder / "dataset_dict.json").exists():
        return folder
    found = sorted(p for p in folder.glob("*.jsonl") if p.is_file()) if folder.is_dir() else []
    if not found:
        raise InputError(f"{folder}: no JSONL file or saved dataset there; {DATA_HELP}")
    return found[0]


@dataclass(frozen=True)
class GenerationSettings:
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 2048
    seed: int = 0
    batch_size: int = 16  # prompts an engine call (each a progress-bar tick and a file append)


def settings_file(path: Path) -> Path:
    return path.with_name(path.name + ".settings.json")


def weights_fingerprint(model: str) -> str | None:
    """A cheap fingerprint of a model folder's weights: each weight file's name, size and first and last
    MiB (BLAKE2b); None for a hub id or a built-in model (its name and the seed say it all)."""
    folder = Path(model)
    if not folder.is_dir():
        return None
    digest = hashlib.blake2b(digest_size=16)
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()


def check_settings(path: Path, record: dict, overwrite: bool) -> None:
    """Resume ``path`` only if it was generated with ``record``'s settings (one line naming each
    difference otherwise); ``overwrite``: replace it. Writes the record for a new file."""
    sidecar = settings_file(path)
    if overwrite:
        for old in (path, sidecar):
            old.unlink(missing_ok=True)
    if path.exists():
        try:
            saved = json.loads(sidecar.read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: holds completions with no record of how they were generated ({sidecar.name} "
                             f"is missing): --overwrite replaces them") from None
        except ValueError:
            raise InputError(f"{sidecar}: not readable JSON: --overwrite replaces the completions") from None
        differ = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in record.items() if saved.get(k) != v]
        if differ:
            raise InputError(f"{path} was generated with other settings ({'; '.join(differ)}): rerun with the "
                             f"same ones to resume it, or --overwrite to replace it")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, sidecar)


def _finished_questions(rows: list[Completion], samples: int) -> set[int]:
    counts = collections.Counter(row.id for row in rows)
    return {i for i, n in counts.items() if n >= samples}


def done_ids(path: Path, samples: int) -> set[int]:
    """Questions with all their samples already in the completions file (a resumed run skips them);
    a question with fewer (a run stopped mid-write) is generated again, its old rows dropped."""
    return _finished_questions(read_completions(path, samples), samples) if path.exists() else set()


def generate_completions(engine, tokenizer, examples: list[Example], settings: GenerationSettings, path: Path,
                         chat_template_kwargs: dict | None = None, progress: str | None = "generate",
                         rows: list[Completion] | None = None) -> None:
    """Append ``settings.samples`` completions of every example not yet in ``path`` to ``path``;
    ``rows``: the file's rows when the caller has read them already."""
    from tqdm import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if rows is None:
        rows = read_completions(path, settings.samples) if path.exists() else []
    finished = _finished_questions(rows, settings.samples)
    kept = [row for row in rows if row.id in finished]
    if len(kept) < len(rows) or _last_line_cut(path):
        # drop a half-written question's rows and a cut last line (atomically) before appending again
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(_row(r.id, r.text) for r in kept))
        os.replace(tmp, path)
    todo = [e for e in examples if e.id not in finished]
    positions = {e.id: i for i, e in enumerate(examples)}  # seeds follow the question, not the batch
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=progress, disable=progress is None)
    for batch in _consecutive_batches(todo, positions, settings.batch_size):
        prompts = [chat_ids(tokenizer, student_messages(e), chat_template_kwargs) for e in batch]
        # each question's samples are seeded by its index in the set, whatever batch it falls in
        sampling = SamplingParams(settings.temperature, settings.top_p, settings.max_tokens, settings.seed,
                                  first_prompt=positions[batch[0].id])
        outputs = engine.generate(prompts, settings.samples, sampling)
        with path.open("ab", buffering=0) as f:  # unbuffered: one write call a row, so a kill cuts at most one
            for example, texts in zip(batch, outputs):
                for text in texts:
                    f.write(_row(example.id, text).encode("utf-8"))
        bar.update(len(batch))
    bar.close()


def _last_line_cut(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _row(question: int, text: str) -> str:
    return json.dumps({"id": question, "completion": str(text)}) + "\n"


def _consecutive_batches(todo: list[Example], positions: dict[int, int], size: int):
    """``todo`` in batches of at most ``size`` examples at consecutive positions of the set."""
    batch: list[Example] = []
    for example in todo:
        if batch and (len(batch) == size or positions[example.id] != positions[batch[-1].id] + 1):
            yield batch
            batch = []
        batch.append(example)
    if batch:
        yield batch


def load_generated(path: Path, examples: list[Example], samples: int) -> list[Completion]:
    wanted = {e.id for e in examples}
    return [c for c in read_completions(path, samples) if c.id in wanted]


def sample_mean_view(scored: list[ScoredCompletion]) -> dict:
    """With K > 1 samples a question (the paper's P_acc view): the spread of per-question accuracy
    P_acc, and how the K-sample mean of the *stated* confidence matches it — the ECE and Brier of
    each sample scored with its question's mean stated confidence, and the mean |mean stated - P_acc|
    over questions (a missing confidence counts as 0 here)."""
    from caopd.evaluation.metrics import calibration_metrics

    by_question: dict[int, list[ScoredCompletion]] = {}
    for s in scored:
        by_question.setdefault(s.id, []).append(s)
    p_acc = {q: statistics.fmean(x.correct for x in rows) for q, rows in by_question.items()}
    stated = {q: statistics.fmean(x.confidence or 0.0 for x in rows) for q, rows in by_question.items()}
    mean_view = calibration_metrics([x.correct for rows in by_question.values() for x in rows],
                                    [stated[q] for q, rows in by_question.items() for _ in rows])
    return {"questions": len(p_acc), "accuracy_mean": statistics.fmean(p_acc.values()),
            "accuracy_stdev": statistics.pstdev(p_acc.values()), "all_right": sum(a == 1.0 for a in p_acc.values()),
            "all_wrong": sum(a == 0.0 for a in p_acc.values()), "mean_stated_ece": mean_view.ece,
            "mean_stated_brier": mean_view.brier,
            "mean_abs_stated_minus_p_acc": statistics.fmean(abs(stated[q] - p_acc[q]) for q in p_acc)}


def generate_and_score(engine, tokenizer, examples: list[Example], dataset: str, settings: GenerationSettings,
                       path: Path, missing_confidence: str = "exclude", chat_template_kwargs: dict | None = None,
                       progress: str | None = "generate", rows: list[Completion] | None = None,
                       ) -> tuple[EvalReport, list[ScoredCompletion]]:
    """Generate (resuming ``path``; ``rows``: its rows, read already), then score every example's completions."""
    generate_completions(engine, tokenizer, examples, settings, path, chat_template_kwargs, progress, rows)
    scored = score_completions(examples, load_generated(path, examples, settings.samples), dataset)
    return summarize(scored, dataset, missing_confidence), scored


def build_eval_engine(model: str, tokenizer_name: str, engine: str, max_tokens: int, seed: int):
    """(engine, tokenizer) for ``caopd eval --model``: vLLM (auto: installed, a GPU present and a model
    folder; or asked for) or transformers."""
    from caopd.engines.vllm_engine import resolve_engine
    from caopd.modeling.models import load_model, load_tokenizer

    folder = Path(model)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        merged = folder / "merged"
        raise InputError(f"--model {model}: LoRA adapters only (adapter_config.json), no model to generate with: "
                         + (f"evaluate {merged}, the merged weights" if (merged / "config.json").is_file() else
                            "train with --merge-lora true (it writes final/merged), or merge them with peft"))
    tokenizer = load_tokenizer(model, tokenizer_name)
    if engine == "auto":
        engine = resolve_engine("auto") if Path(model).is_dir() else "transformers"
    if engine == "vllm":
        from caopd.engines.vllm_engine import VLLMEngine

        if not Path(model).is_dir():
            raise InputError(f"--engine vllm loads a model folder; {model} is not one (use --engine transformers)")
        positions = json.loads((Path(model) / "config.json").read_text()).get("max_position_embeddings", 1 << 30)
        length = min(max_tokens + 4096, positions)  # prompts up to 4,096 tokens, within the model's positions
        return VLLMEngine(model, tokenizer=None if tokenizer_name == "auto" else tokenizer_name,
                          max_model_len=length, seed=seed), tokenizer
    from caopd.engines.hf import TransformersEngine

    return TransformersEngine(load_model(model, tokenizer, seed=seed).eval(), tokenizer), tokenizer
