"""``caopd train | eval | demo | memory | export | rollout-server``: parse arguments, call one function each,
turn bad input into one line."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from caopd.errors import InputError, Interrupted, StoppedRun


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a completions file, or generate with a model then score, or compare "
                       "runs", description="One of: --input FILE (score completions made elsewhere), --model "
                       "PATH_OR_ID (generate, then score), --compare METRICS.json ... (one table of several runs).")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", help="completions JSONL: {\"id\": int, \"completion\": str}")
    what.add_argument("--model", help="a model folder, hub id, random:<size> or tiny-qwen3: generate, then score")
    what.add_argument("--compare", nargs="+", metavar="METRICS_JSON", help="metrics files of earlier evals")
    p.add_argument("--dataset", choices=["science", "tooluse"])
    p.add_argument("--data", help="dataset JSONL file or saved dataset dir (default: the first one under "
                   "$CAOPD_DATA_DIR/<dataset>/)")
    p.add_argument("--split", help="split of a saved DatasetDict directory")
    p.add_argument("--output", help="metrics JSON to write")
    p.add_argument("--plot", help="reliability diagram PNG to write")
    p.add_argument("--missing-confidence", choices=["exclude", "zero"], default="exclude",
                   help="completions with no confidence: excluded (default) or counted as 0")
    g = p.add_argument_group("generation (with --model)")
    g.add_argument("--tokenizer", default="auto", help="as caopd train's --tokenizer")
    g.add_argument("--samples", type=int, default=1, help="completions a question (K)")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as the paper's evaluation")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-tokens", type=int, default=2048)
    g.add_argument("--limit", type=int, help="the first N questions only")
    g.add_argument("--engine", choices=["auto", "vllm", "transformers"], default="auto",
                   help="auto: vLLM when installed, a GPU is present and --model is a folder, else transformers")
    g.add_argument("--batch-size", type=int, default=16, help="questions an engine call")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-completions", help="completions JSONL (default: beside --output, or "
                   "eval-<dataset>-completions.jsonl); a rerun with the same settings resumes it (they are "
                   "recorded in <file>.settings.json), other settings are refused")
    g.add_argument("--overwrite", action="store_true", help="replace an existing completions file made with "
                   "other settings")


def run_eval(args: argparse.Namespace) -> dict:
    from caopd.paths import check_output_file

    for flag, path in (("--output", args.output), ("--plot", args.plot), ("--save-completions",
                                                                            getattr(args, "save_completions", None))):
        if path:  # before the scoring, which a bad output path would otherwise throw away
            check_output_file(path, flag)
    if args.compare:
        return run_compare(args)
    if not args.dataset:
        raise InputError("--dataset science|tooluse is needed with --input and --model")
    return run_generate_and_score(args) if args.model else run_score(args)


def _examples(args: argparse.Namespace):
    from caopd.evaluation.benchmark_eval import default_data
    from caopd.inputs.data import load_examples
    from caopd.paths import data_path

    data = data_path(args.data) if args.data else default_data(args.dataset)
    return data, load_examples(data, args.dataset, split=args.split)


def _report(args: argparse.Namespace, report, label: str, extra: dict) -> dict:
    from caopd.evaluation.evaluate import report_rows
    from caopd.evaluation.tables import format_table

    if report.metrics.n == 0:  # ECE 0, Brier 0, AUROC 0.5 would read as perfect
        raise InputError(f"no scored completions ({report.n_completions} completions, "
                         f"{report.n_missing_confidence} stating no confidence"
                         + (": --missing-confidence zero counts them as 0)" if report.n_completions else ")"))

    print(format_table(["metric", "value"], report_rows(report)))
    result = report.to_dict() | extra
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    if args.plot:
        from caopd.evaluation.plots import save_reliability_diagrams

        save_reliability_diagrams({f"{args.dataset}: {label}": report.metrics}, args.plot)
        print(f"wrote {args.plot}")
    return result


def run_score(args: argparse.Namespace) -> dict:
    from caopd.evaluation.evaluate import load_completions, score_completions, summarize

    data, examples = _examples(args)
    scored = score_completions(examples, load_completions(args.input), args.dataset)
    report = summarize(scored, args.dataset, args.missing_confidence)
    return _report(args, report, Path(args.input).name, {"data": str(data), "input": str(args.input)})


def check_generation_values(args: argparse.Namespace) -> None:
    """caopd eval --model's generation values, one line each, with train's ranges."""
    for flag in ("samples", "max_tokens", "batch_size"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise InputError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:  # also false for nan
        raise InputError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not 0 <= args.seed < 2**31:
        raise InputError(f"--seed must be in [0, 2**31), got {args.seed}")
    if args.samples > 1 and args.temperature == 0:
        raise InputError(f"--samples {args.samples} with --temperature 0 (greedy) gives {args.samples} identical "
                         "completions a question: give --temperature > 0 (e.g. 1.0), or --samples 1")


def run_generate_and_score(args: argparse.Namespace) -> dict:
    from caopd.evaluation.benchmark_eval import (
        GenerationSettings,
        build_eval_engine,
        check_settings,
        generate_and_score,
        sample_mean_view,
        weights_fingerprint,
    )
    from caopd.evaluation.evaluate import read_completions
    from caopd.evaluation.tables import format_table

    check_generation_values(args)
    data, examples = _examples(args)
    examples = examples[:args.limit] if args.limit else examples
    completions = Path(args.save_completions or (Path(args.output).with_suffix("").as_posix() + "-completions.jsonl"
                                                 if args.output else f"eval-{args.dataset}-completions.jsonl"))
    settings = GenerationSettings(args.samples, args.temperature, args.top_p, args.max_tokens, args.seed,
                                  args.batch_size)
    check_settings(completions, {"model": args.model, "weights": weights_fingerprint(args.model),
                                 "tokenizer": args.tokenizer, "dataset": args.dataset, "data": str(data),
                                 "samples": args.samples, "temperature": args.temperature, "top_p": args.top_p,
                                 "max_tokens": args.max_tokens, "seed": args.seed}, args.overwrite)
    rows = read_completions(completions, args.samples) if completions.exists() else []  # checked before a model loads
    engine, tokenizer = build_eval_engine(args.model, args.tokenizer, args.engine, args.max_tokens, args.seed)
    try:
        report, scored = generate_and_score(engine, tokenizer, examples, args.dataset, settings, completions,
                                            args.missing_confidence, {"enable_thinking": False}, rows=rows)
    finally:
        if hasattr(engine, "close"):
            engine.close()
    extra = {"data": str(data), "model": args.model, "completions": str(completions),
             "generation": vars(settings) | {"engine": type(engine).__name__}}
    if args.samples > 1:
        extra["samples_view"] = view = sample_mean_view(scored)
        print(format_table(["K-sample view", "value"], [[k, v] for k, v in view.items()]))
    print(f"completions in {completions}")
    return _report(args, report, args.model, extra)


MAX_METRICS_BYTES = 1 << 20


def run_compare(args: argparse.Namespace) -> dict:
    """One table of several evals (the paper's columns) and their reliability diagrams side by side."""
    from caopd.evaluation.metrics import CalibrationMetrics
    from caopd.evaluation.tables import format_table

    runs = {}
    for path in args.compare:
        file = Path(path)
        if file.is_dir():
            raise InputError(f"{path}: is a folder; --compare takes the metrics JSON files of earlier evals")
        try:
            if file.stat().st_size > MAX_METRICS_BYTES:
                raise InputError(f"{path}: {file.stat().st_size} bytes, not a caopd eval metrics file (those are a "
                                 f"few KB; the limit is {MAX_METRICS_BYTES} bytes)")
            saved = json.loads(file.read_text(encoding="utf-8"))
            metrics = CalibrationMetrics.from_dict(saved["metrics"])
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except RecursionError:
            raise InputError(f"{path}: not a caopd eval metrics file (JSON nested too deeply)") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{path}: not a caopd eval metrics file ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})") from None
        runs[path] = metrics  # labelled by the metrics file: one model may be evaluated several ways
    rows = [[name, *(m.shown(x) for x in (m.accuracy, m.ece, m.brier, m.spr, m.ocg, m.auroc)), m.n]
            for name, m in runs.items()]
    print(format_table(["run", "accuracy", "ECE", "Brier", "SPR", "OCG", "AUROC", "scored"], rows))
    result = {"runs": {name: m.to_dict() for name, m in runs.items()}}
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        from caopd.evaluation.plots import save_overlaid_reliability

        save_overlaid_reliability(runs, args.plot)
        print(f"wrote {args.plot}")
    return result


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job: OPD vs CaOPD on a generated task, from the same "
                       "warmed-up tiny model, evaluated for accuracy and calibration (CPU, minutes)")
    p.add_argument("--out", default="runs/demo", help="folder for report.json, report.md and demo.png")
    p.add_argument("--seeds", type=int, default=1, help="run this many seeds (0, 1, ...) and report the spread")
    p.add_argument("--quick", action="store_true", help="a smaller run (under 2 minutes) that checks the pipeline")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo's runs in --out")


def run_demo(args: argparse.Namespace) -> dict:
    from caopd.demo.pipeline import run_demo as demo

    if args.seeds < 1:
        raise InputError(f"--seeds must be >= 1, got {args.seeds}")
    return demo(args.out, seeds=args.seeds, quick=args.quick, overwrite=args.overwrite)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="CaOPD (or plain OPD) training", allow_abbrev=False,
                       description="Each config field below overrides the config file's value: --key value. "
                       "Without --config the defaults shown are the values used (with --resume and no --config, "
                       "the resumed run's own config). A fresh run refuses an output dir that holds an "
                       "earlier run: --resume true continues it, --overwrite true replaces it. Fields marked "
                       "[may change on resume] may differ from the run's saved config on --resume; any other "
                       "difference refuses it.")
    p.add_argument("--config", default=None, help="a YAML file, or a packaged config name (tiny, "
                   "science-qwen3-8b-h200, tooluse-qwen3-8b-h200, science-qwen3-32b-8xh200); without it, the "
                   "defaults below")
    p.add_argument("--no-empirical-calibration", action="store_true",
                   help="plain OPD/SDFT: no P_acc replacement, the teacher keeps Confidence: 1.00")
    add_config_fields(p)


def add_config_fields(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a --key value flag, by group, with its help and default (train, memory)."""
    import dataclasses
    import typing

    from caopd.config import GROUPS, MAY_CHANGE_ON_RESUME, TrainConfig, field_type

    hints = typing.get_type_hints(TrainConfig)
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        kind = field_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (default: {default})"
        if f.name in MAY_CHANGE_ON_RESUME and f.name not in ("output_dir", "resume", "overwrite"):
            help_text += " [may change on resume]"
        choices = f.metadata["choices"]
        metavar = "{" + ",".join(choices) + "}" if choices else {bool: "BOOL", dict: "MAPPING"}.get(
            kind, kind.__name__.upper())
        groups[f.metadata["group"]].add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS, metavar=metavar,
            help=help_text.replace("%", "%%"), **(dict(nargs="?", const="true") if kind is bool else {}))


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The config fields given as flags, as load_config's '--key value' pairs."""
    import dataclasses

    from caopd.config import TrainConfig

    return [x for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)
            for x in ("--" + f.name, getattr(args, f.name))]


def run_train(args: argparse.Namespace) -> dict:
    import dataclasses

    from caopd.config import (
        TrainConfig,
        load_config,
        non_default_sources,
        read_config_file,
        sources_line,
        unknown_option,
    )
    from caopd.training.trainer import train

    if args.overrides:
        raise unknown_option(next((a for a in args.overrides if a.startswith("-")), args.overrides[0]))
    overrides = config_overrides(args)
    if args.no_empirical_calibration:
        overrides += ["--empirical-calibration", "false"]
    from caopd.training.distributed import leave_process_group
    from caopd.training.run_folder import resumable_config

    flags = load_config(None, overrides)  # the flags alone (and defaults): where the run folder is
    base = resumable_config(flags.output_dir) if flags.resume and not args.config else {}
    config = load_config(args.config, overrides, base=base)
    file_keys = set(read_config_file(args.config)[1]) if args.config else set()
    flag_keys = {f.name for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.no_empirical_calibration:
        flag_keys.add("empirical_calibration")
    result = train(config, first_line=lambda resolved: sources_line(  # after the launcher's settings
        args.config, non_default_sources(resolved, file_keys, flag_keys, set(base))))
    leave_process_group()
    return result


def _memory_parser(sub) -> None:
    p = sub.add_parser("memory", help="estimate a run's peak memory per process before launching it",
                       allow_abbrev=False,
                       description="Plans the run caopd train would launch with the same --config and flags: an "
                       "analytic estimate per component (caopd/modeling/memory.py), by phase, whether it fits, the "
                       "largest micro-batch that fits and the levers that would make it fit. The prompt and "
                       "completion lengths planned for are --max-prompt-length and --max-completion-length.")
    p.add_argument("--config", default=None, help="as caopd train's --config: the run to plan (without it, train's "
                   "defaults)")
    machine = p.add_argument_group("the machines")
    machine.add_argument("--gpus", type=int, default=1, help="processes of the launch, one a GPU (with --device cpu: "
                         "CPU processes on this machine) (default: 1)")
    machine.add_argument("--gpu-memory-gib", type=float, default=None, help="each GPU's memory (default: 80; with "
                         "--device cpu, this machine's RAM)")
    machine.add_argument("--host-memory-gib", type=float, default=None, help="each node's host memory, for the "
                         "host rows (default: this machine's RAM)")
    machine.add_argument("--processes-per-node", type=int, default=8, help="GPU processes a node holds (host memory "
                         "per node) (default: 8)")
    machine.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: fp32, --gpus CPU processes "
                         "(torchrun on CPU), each process's resident memory (default: cuda)")
    add_config_fields(p)


def run_memory(args: argparse.Namespace) -> dict:
    import psutil

    from caopd.config import load_config
    from caopd.modeling.memory import estimate, plan_of, report

    config = load_config(args.config, config_overrides(args))  # train's checks and ranges
    for flag in ("gpus", "processes_per_node"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    ram = psutil.virtual_memory().total / 2**30
    gpu_memory = args.gpu_memory_gib if args.gpu_memory_gib is not None else (ram if args.device == "cpu" else 80.0)
    host_memory = args.host_memory_gib if args.host_memory_gib is not None else ram
    for flag, value in (("--gpu-memory-gib", gpu_memory), ("--host-memory-gib", host_memory)):
        if not (math.isfinite(value) and value > 0):
            raise InputError(f"{flag} must be a finite number > 0, got {value}")
    if config.fsdp_cpu_offload and not config.fsdp:
        raise InputError("--fsdp-cpu-offload is FSDP2's CPU offload: it needs --fsdp true")
    plan = plan_of(config, gpus=args.gpus, device=args.device, gpu_memory_gib=gpu_memory,
                   host_memory_gib=host_memory, processes_per_node=args.processes_per_node)
    print(report(plan))
    result = estimate(plan)
    return {"peak_bytes": result.peak, "rows": [(r.name, r.bytes) for r in result.rows]}


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="a run's checkpoint (sharded or not) as a from_pretrained folder",
                       description="Joins a checkpoint's shards a tensor at a time (one process, one whole tensor in "
                       "memory) and writes safetensors, config.json and the run's tokenizer, as final/ is written.")
    p.add_argument("run", help="the run folder (caopd train's --output-dir)")
    p.add_argument("--checkpoint", type=int, help="the step (default: the newest complete checkpoint)")
    p.add_argument("--output", required=True, help="the folder to write")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: as trained (fp32 "
                   "master weights)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def run_export(args: argparse.Namespace) -> dict:
    from caopd.paths import check_output_dir
    from caopd.training.export import export_checkpoint

    check_output_dir(str(Path(args.output).parent), "--output")
    path = export_checkpoint(args.run, args.output, args.checkpoint, args.dtype, args.overwrite)
    print(f"wrote {args.output} from {path}")
    return {"checkpoint": str(path), "output": args.output}


def _rollout_server_parser(sub) -> None:
    p = sub.add_parser("rollout-server", help="a vLLM server that generates for caopd train --rollout-engine server "
                       "(on GPUs the trainer does not use, or another node)",
                       description="Runs vLLM's OpenAI API server with its development and RL routes on (weights are "
                       "pushed to it after every step: over NCCL on GPUs, else from a folder it reloads). Those routes "
                       "run what they are asked: keep --host on an address only the trainer reaches (default "
                       "127.0.0.1). Then: caopd train --rollout-engine server --rollout-server http://HOST:PORT. It "
                       "serves a teacher for caopd train --teacher-server http://HOST:PORT too (--max-logprobs at "
                       "least the trainer's --teacher-top-k); a stock vllm serve --max-logprobs K does as well.")
    p.add_argument("--model", required=True, help="a model folder or hub id (the trainer's first push replaces its "
                   "weights; its vocabulary must be the trained model's)")
    p.add_argument("--tokenizer", help="a tokenizer folder or hub id (default: the model's)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the server shards the model over")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-model-len", type=int, default=4096, help="prompt + completion tokens a request may take")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--cpu-kv-cache-gib", type=float, default=1.0, help="on CPUs: the KV cache's memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-logprobs", type=int, default=20, help="the most log-probs a position a request may ask "
                   "for: serving a teacher, at least the trainer's --teacher-top-k")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")


def run_rollout_server(args: argparse.Namespace) -> dict:
    import os
    import shlex

    from caopd.engines.server import server_command

    argv, env = server_command(args.model, host=args.host, port=args.port,
                               tensor_parallel_size=args.tensor_parallel_size, max_model_len=args.max_model_len,
                               dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization,
                               cpu_kv_cache_gib=args.cpu_kv_cache_gib, seed=args.seed, tokenizer=args.tokenizer,
                               max_logprobs=args.max_logprobs)
    if args.dry_run:
        print("VLLM_SERVER_DEV_MODE=1 " + shlex.join(argv))
        return {"argv": argv}
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)  # the server is this process from here on: signals reach vLLM itself


COMMANDS = {"train": (_train_parser, run_train), "eval": (_eval_parser, run_eval), "demo": (_demo_parser, run_demo),
            "memory": (_memory_parser, run_memory), "export": (_export_parser, run_export),
            "rollout-server": (_rollout_server_parser, run_rollout_server)}


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), like every other caopd error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


DESCRIPTION = ("Calibration-aware on-policy distillation (CaOPD) of LLMs. A student learns from a teacher that "
               "sees privileged context, as in on-policy distillation, but its stated confidence is trained toward "
               "the accuracy of its own K sampled answers, so it stays calibrated. Commands: demo (the main job on "
               "this machine: OPD vs CaOPD in minutes), train (CaOPD or plain OPD, one GPU to many), eval (accuracy "
               "and calibration of a model or of completions; compare runs), memory (will a run fit, before "
               "launching it), export (a checkpoint to a model folder), rollout-server (generation on other GPUs).")


def build_parser() -> argparse.ArgumentParser:
    from caopd import __version__

    parser = OneLineParser(prog="caopd", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"caopd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser, _ in COMMANDS.values():
        add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args, extra = build_parser().parse_known_args(argv)
        if extra and args.command != "train":
            build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help, or an argparse error already printed on one line
        return e.code if isinstance(e.code, int) else 2
    args.overrides = extra
    try:
        COMMANDS[args.command][1](args)
    except InputError as e:
        print(f"caopd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"caopd {args.command}: interrupted: {e}", file=sys.stderr)
        return 130
    except StoppedRun as e:
        print(f"caopd {args.command}: stopped: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
