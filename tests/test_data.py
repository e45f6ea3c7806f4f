import json

import pytest

from caopd.errors import InputError
from caopd.inputs.data import load_examples
from tests.conftest import write_jsonl

SCIENCE_ROW = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "answer": "C"}
TOOL_ROW = {"prompt": "tools...\n\nBegin!\nQuestion: q", "golden_answer": [{"Action": "f", "Action_Input": "{}"}]}


def test_real_rows_load(science_path, tooluse_path):
    science = load_examples(science_path, "science")
    tooluse = load_examples(tooluse_path, "tooluse")
    assert len(science) == 507 and len(tooluse) == 97
    assert [e.id for e in science[:3]] == [0, 1, 2]
    assert science[0].gold in "ABCD" and science[0].prompt[0]["role"] == "system"
    assert "Begin!" in tooluse[0].prompt and tooluse[0].gold[0]["Action"]
    assert science[5].source.endswith("science_eval.jsonl:6")


def test_saved_hf_dataset_dirs(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the dev extra installs datasets")
    rows = [dict(SCIENCE_ROW, answer=L, output_text=f"<answer>{L}</answer>") for L in "ABCD"]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "eval_data"))
    examples = load_examples(tmp_path / "eval_data", "science")
    assert [e.gold for e in examples] == list("ABCD")
    assert examples[2].demonstration == "<answer>C</answer>" and examples[2].id == 2
    tool = [dict(TOOL_ROW, golden_response=["Action: f", "Action Input: {}"])]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(tool)}).save_to_disk(str(tmp_path / "dd"))
    (example,) = load_examples(tmp_path / "dd", "tooluse")
    assert example.demonstration == "Action: f\nAction Input: {}"


def test_messages_field_of_training_rows(tmp_path):
    row = {"messages": SCIENCE_ROW["prompt"], "answer": "B", "output_text": "demo"}
    (example,) = load_examples(write_jsonl(tmp_path / "t.jsonl", [row]), "science")
    assert example.prompt == row["messages"] and example.demonstration == "demo"


@pytest.mark.parametrize("dataset, rows, message", [
    ("science", ['{"prompt": [}'], r"d\.jsonl:1: malformed JSON"),
    ("science", [SCIENCE_ROW, "[1, 2]"], r"d\.jsonl:2: expected a JSON object"),
    ("science", [SCIENCE_ROW, {"prompt": SCIENCE_ROW["prompt"]}], r"d\.jsonl:2: missing field 'answer'"),
    ("science", [{"answer": "A"}], r"d\.jsonl:1: missing field 'messages'"),
    ("science", [dict(SCIENCE_ROW, answer=3)], r"d\.jsonl:1: field 'answer' must be a non-empty string"),
    ("science", [dict(SCIENCE_ROW, prompt="text")], r"field 'prompt' must be a non-empty list"),
    ("science", [dict(SCIENCE_ROW, id="7")], r"field 'id' must be an integer"),
    ("science", [dict(SCIENCE_ROW, id=1), dict(SCIENCE_ROW, id=1)], r"d\.jsonl:2: id 1 already used at .*:1"),
    ("tooluse", [dict(TOOL_ROW, golden_answer=[])], r"field 'golden_answer' must be a non-empty list"),
    ("tooluse", [dict(TOOL_ROW, golden_answer=[{"Action": "f"}])], r"field 'golden_answer\[0\]' needs"),
    ("tooluse", [dict(TOOL_ROW, golden_answer=[{"Action": "f", "Action_Input": "{x"}])],
     r"golden_answer\[0\]\.Action_Input' is not valid JSON"),
    ("tooluse", [dict(TOOL_ROW, golden_response=3)], r"field 'golden_response' must be"),
    ("tooluse", [], r"no examples"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, dataset, rows, message):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(InputError, match=message):
        load_examples(path, dataset)


def test_missing_path_and_non_dataset_dir(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl", "science")
    with pytest.raises(InputError, match="not a saved Hugging Face dataset"):
        load_examples(tmp_path, "science")
    with pytest.raises(InputError, match="unknown dataset 'math'"):
        load_examples(tmp_path, "math")


def test_blank_lines_are_not_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(SCIENCE_ROW) + "\n\n" + json.dumps(SCIENCE_ROW) + "\n")
    assert [e.id for e in load_examples(path, "science")] == [0, 1]
