import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from caopd.cli import main
from caopd.inputs.data import load_examples
from caopd.scoring.verifiers import TASKS
from tests.conftest import write_jsonl


def _gold_completions(path, dataset, confidence="Confidence: 0.80"):
    task = TASKS[dataset]
    return [{"id": e.id, "completion": task.render_answer(e.gold) + "\n" + confidence}
            for e in load_examples(path, dataset)]


@pytest.mark.parametrize("dataset, rows", [("science", "science_rows_path"), ("tooluse", "tooluse_rows_path"),
                                           ("science", "science_path"), ("tooluse", "tooluse_path")])
def test_eval_gold_completions(tmp_path, dataset, rows, request, capsys):
    """On the shipped/synthetic rows (core) and, where ../shared is present, the real ones."""
    data = request.getfixturevalue(rows)
    rows = _gold_completions(data, dataset)
    completions = write_jsonl(tmp_path / "c.jsonl", rows)
    out, plot = tmp_path / "m.json", tmp_path / "r.png"
    assert main(["eval", "--dataset", dataset, "--data", str(data), "--input", str(completions),
                 "--output", str(out), "--plot", str(plot)]) == 0
    report = json.loads(out.read_text())
    assert report["accuracy_all"] == 1.0 and report["n_completions"] == len(rows)
    assert report["metrics"]["ece"] == pytest.approx(0.2) and report["metrics"]["ocg"] == pytest.approx(-0.2)
    assert report["metrics"]["bins"][8]["count"] == len(rows)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ECE (10 bins)" in capsys.readouterr().out


def test_eval_repeated_ids_and_missing_confidence(tmp_path, science_rows_path, capsys):
    rows = [{"id": 0, "completion": "<answer>A</answer>\nConfidence: 0.9"},
            {"id": 0, "completion": "<answer>B</answer>\nConfidence: 0.9"},
            {"id": 1, "completion": "<answer>A</answer>"},
            {"id": 2, "completion": "<answer>A</answer>\nConfidence: 140%"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "m.json"
    assert main(["eval", "--dataset", "science", "--data", str(science_rows_path), "--input", str(path),
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n_completions"] == 4 and report["n_missing_confidence"] == 1 and report["n_clipped"] == 1
    assert report["metrics"]["n"] == 3 and report["format_adherence"] == 0.75
    assert "1 of 4 completions state no confidence" in capsys.readouterr().err
    assert main(["eval", "--dataset", "science", "--data", str(science_rows_path), "--input", str(path),
                 "--output", str(out), "--missing-confidence", "zero"]) == 0
    report = json.loads(out.read_text())
    assert report["metrics"]["n"] == 4 and report["metrics"]["mean_confidence"] == pytest.approx(2.8 / 4)


@pytest.mark.parametrize("rows, message", [
    (None, "c.jsonl: no such file"),
    (['{"id": 0, "completion": "x"', ], r"c.jsonl:1: malformed JSON"),
    ([{"id": 0, "completion": "x"}, {"id": 99999, "completion": "x"}], "c.jsonl:2: id 99999 is not in the dataset"),
    ([{"id": "0", "completion": "x"}], "c.jsonl:1: field 'id' must be int, got str"),
    ([{"id": 0, "completion": ["x"]}], "c.jsonl:1: field 'completion' must be str, got list"),
    ([{"id": 0}], "c.jsonl:1: missing field 'completion'"),
])
def test_eval_bad_input_is_one_line(tmp_path, science_rows_path, capsys, rows, message):
    path = tmp_path / "c.jsonl"
    if rows is not None:
        write_jsonl(path, rows)
    assert main(["eval", "--dataset", "science", "--data", str(science_rows_path), "--input", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("caopd eval: error:")


def test_eval_missing_data_file_exits_without_traceback(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": 0, "completion": "x"}])
    proc = subprocess.run([sys.executable, "-m", "caopd.cli", "eval", "--dataset", "tooluse", "--data",
                           str(tmp_path / "none.jsonl"), "--input", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"caopd eval: error: {tmp_path / 'none.jsonl'}: no such file or directory"


def test_eval_of_the_shipped_example(tmp_path):
    example = resources.files("caopd") / "examples"
    assert main(["eval", "--dataset", "science", "--data", str(example / "arith_mc.jsonl"),
                 "--input", str(example / "arith_mc_completions.jsonl"), "--output", str(tmp_path / "metrics.json"),
                 "--plot", str(tmp_path / "reliability.png")]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["n_completions"] == 480 and report["accuracy_all"] == pytest.approx(289 / 480)
    assert report["n_missing_confidence"] == 14 and report["n_clipped"] == 11
    m = report["metrics"]  # pinned: the shipped files are fixed; the simulated model is overconfident
    assert m["n"] == 466 and m["accuracy"] == pytest.approx(281 / 466)
    assert (m["ece"], m["brier"], m["spr"], m["auroc"], m["ocg"], m["mean_confidence"]) == pytest.approx(
        (0.2958154506437765, 0.33067360515021466, 0.4735789169952871, 0.4978455323651053, 0.2958154506437769,
         0.8988197424892704), rel=1e-9)
    assert (tmp_path / "reliability.png").stat().st_size > 10_000


EXAMPLE_DATA = str(resources.files("caopd") / "examples" / "arith_mc.jsonl")


@pytest.mark.parametrize("case, message", [
    ("input not utf-8", "c.jsonl:3: not UTF-8 text (byte 0xff at column 13)"),
    ("data not utf-8", "d.jsonl:1: not UTF-8 text"),
    ("input is a folder", "is a folder; --input takes a JSON Lines file"),
    ("output is a folder", "--output {tmp}: is a folder; give a file path"),
    ("plot is a folder", "--plot {tmp}: is a folder"),
    ("output under a file", "--output {tmp}/c.jsonl/m.json: cannot write there"),
])
def test_eval_bad_paths_are_one_line_before_any_scoring(tmp_path, capsys, case, message):
    """Issue 11, item 12: each of these was a traceback (the output ones after all the scoring)."""
    completions = write_jsonl(tmp_path / "c.jsonl", [{"id": 0, "completion": "<answer>B</answer>"}] * 2)
    args = {"--dataset": "science", "--data": EXAMPLE_DATA, "--input": str(completions)}
    if case == "input not utf-8":
        completions.write_bytes(completions.read_bytes() + b'{"id": 0, "c\xffompletion": "x"}\n')
    elif case == "data not utf-8":
        args["--data"] = str(tmp_path / "d.jsonl")
        (tmp_path / "d.jsonl").write_bytes(b'{"prompt": "\xe9t\xe9"}\n')
    elif case == "input is a folder":
        args["--input"] = str(tmp_path)
    elif case == "output is a folder":
        args["--output"] = str(tmp_path)
    elif case == "plot is a folder":
        args["--plot"] = str(tmp_path)
    else:
        args["--output"] = str(completions / "m.json")
    assert main(["eval", *(x for kv in args.items() for x in kv)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert message.format(tmp=tmp_path) in err and "\n" not in err, err
    assert "accuracy" not in captured.out  # nothing was scored and printed


def test_eval_split_of_a_saved_dataset_dict(tmp_path, capsys):
    datasets = pytest.importorskip("datasets", reason="the dev extra installs datasets")
    rows = [json.loads(line) for line in open(EXAMPLE_DATA)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:50]),
                          "eval": datasets.Dataset.from_list(rows[50:60])}).save_to_disk(str(tmp_path / "dd"))
    completions = write_jsonl(tmp_path / "c.jsonl", [{"id": r["id"], "completion": f"<answer>{r['answer']}</answer>"
                                                      f"\nConfidence: 0.9"} for r in rows[50:60]])
    args = ["eval", "--dataset", "science", "--data", str(tmp_path / "dd"), "--input", str(completions)]
    assert main([*args, "--split", "eval", "--output", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["accuracy_all"] == 1.0
    assert main([*args, "--split", "train"]) == 2  # ids 50-59 are not in the train split
    assert "id 50 is not in the dataset (50 examples)" in capsys.readouterr().err
    assert main(args) == 2
    assert "a DatasetDict with splits ['train', 'eval']; choose one with split=" in capsys.readouterr().err


def _metrics_file(path: Path, **changes) -> Path:
    from caopd.evaluation.metrics import calibration_metrics

    metrics = calibration_metrics([True, False, True], [0.9, 0.2, 0.6]).to_dict()
    path.write_text(json.dumps({"metrics": {**metrics, **changes}}))
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: _metrics_file(d / "m.json", ece="0.1"), "field 'ece' must be a finite number, got '0.1'"),
    (lambda d: _metrics_file(d / "m.json", auroc=float("nan")), "field 'auroc' must be a finite number, got nan"),
    (lambda d: _metrics_file(d / "m.json", brier=float("inf")), "field 'brier' must be a finite number, got inf"),
    (lambda d: (d / "deep.json").write_text("[" * 200_000) and d / "deep.json", "JSON nested too deeply"),
    (lambda d: d, "is a folder; --compare takes the metrics JSON files"),
])
def test_compare_refuses_what_is_not_a_metrics_file(tmp_path, capsys, make, message):
    """Issue 26 item 10: a string metric with --plot, a 200,000-deep JSON or a folder gave tracebacks; NaN
    or infinite metrics passed without comment."""
    good = _metrics_file(tmp_path / "good.json")
    bad = make(tmp_path)
    assert main(["eval", "--compare", str(good), str(bad), "--plot", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert main(["eval", "--compare", str(good), "--plot", str(tmp_path / "c.png")]) == 0


def test_metrics_over_nothing_read_n_a(tmp_path, capsys, monkeypatch):
    """Issue 27 item 5: with 0 scored completions the tables printed ECE/Brier/SPR 0.0000 (and so did the
    plot legend); the compare plot gains the per-bin counts the single-run plot has."""
    import caopd.evaluation.plots as plots
    from caopd.evaluation.metrics import calibration_metrics

    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"metrics": calibration_metrics([], []).to_dict()}))
    good = _metrics_file(tmp_path / "good.json")
    figures = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or real_save(fig, path))
    assert main(["eval", "--compare", str(good), str(empty), "--plot", str(tmp_path / "c.png")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "empty.json" in line)
    assert row.split()[1:] == ["n/a"] * 6 + ["0"]
    reliability, counts = figures[0].axes
    assert "(ECE n/a, OCG n/a)" in [t.get_text() for t in reliability.get_legend().get_texts()][-1]
    assert counts.get_ylabel() == "completions per bin" and sum(p.get_height() for p in counts.patches) == 3


def test_eval_reads_packaged_data_as_train_does(tmp_path, capsys):
    """Issue 27 item 5: --data caopd:examples/... worked for train, not for eval."""
    rows = [{"id": 0, "completion": "<answer>A</answer>\nConfidence: 0.9"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    assert main(["eval", "--dataset", "science", "--data", "caopd:examples/arith_mc.jsonl", "--input",
                 str(path)]) == 0
    assert "ECE (10 bins)" in capsys.readouterr().out


def test_version_and_what_the_tool_does(capsys):
    """Issue 27 item 6."""
    from caopd import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"caopd {__version__}"
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Calibration-aware on-policy distillation" in text and "memory (will a run fit" in text


def test_vllm_logs_go_to_stderr_at_warning():
    """Issue 27 item 5: vLLM's ~60 INFO lines went to stdout and buried the eval table."""
    pytest.importorskip("vllm")
    code = ("from caopd.engines.vllm_engine import quiet_vllm_logs; quiet_vllm_logs(); "
            "from vllm.logger import init_logger; log = init_logger('vllm.caopd_test'); "
            "log.info('an info line'); log.warning('a warning line')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "an info line" not in done.stdout + done.stderr and "a warning line" not in done.stdout
    assert "a warning line" in done.stderr
