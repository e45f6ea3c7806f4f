"""The training config: overrides, checks (ranges, finiteness, types), the generated --help, what
may change on --resume, the packaged configs. Fast: nothing here trains.

Regression tests of issue 11 (items 9 and 13) and issue 12 (the packaged configs validate).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from caopd.cli import main
from caopd.config import MAY_CHANGE_ON_RESUME, TrainConfig, load_config
from caopd.errors import InputError
from caopd.training.run_folder import config_changes

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("caopd train: error:"), err
    return err[0]


def test_config_overrides_and_errors(tmp_path):
    config = load_config("tiny", ["--num-generations", "2", "--empirical-calibration", "false",
                                  "--chat-template-kwargs", "{enable_thinking: true}"])
    assert config.num_generations == 2 and not config.empirical_calibration
    assert config.chat_template_kwargs == {"enable_thinking": True} and config.data_path().exists()
    with pytest.raises(InputError, match="unknown option '--nope'"):
        load_config("tiny", ["--nope", "1"])
    with pytest.raises(InputError, match="expected int"):
        load_config("tiny", ["--num-generations", "many"])
    with pytest.raises(InputError, match="'divergence'"):
        load_config("tiny", ["--divergence", "kl"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 1\n")
    with pytest.raises(InputError, match="unknown config field 'learning_rat'"):
        load_config(str(bad), [])


def test_config_changes_classifies_every_field():
    saved = dataclasses.asdict(TrainConfig())
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("resume", "overwrite"):
            continue
        value = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v / 2 + 0.01,
                 str: lambda v: "other", dict: lambda v: {"x": 1}, type(None): lambda v: "train"}[type(f.default if
                                                                                                    f.default is not
                                                                                                    dataclasses.MISSING
                                                                                                    else {})](
            saved[f.name])
        changed = dict(saved, **{f.name: value})
        refused, applied = config_changes(changed, TrainConfig())
        assert (applied if f.name in MAY_CHANGE_ON_RESUME else refused), f.name
        assert not (refused and applied)


@pytest.mark.parametrize("field, value, message", [
    ("max_grad_norm", "-1", "'max_grad_norm' must be >= 0"),
    ("learning_rate", "inf", "'learning_rate' must be a finite number"),
    ("learning_rate", "nan", "'learning_rate' must be a finite number"),
    ("temperature", "nan", "'temperature' must be a finite number"),
    ("sampling_temperature", "-0.5", "'sampling_temperature' must be >= 0"),
    ("top_p", "0", "'top_p' must be in (0, 1]"),
    ("teacher_ema", "nan", "'teacher_ema' must be a finite number"),
    ("weight_decay", "-1", "'weight_decay' must be >= 0"),
    ("save_total_limit", "-1", "'save_total_limit' must be >= 0"),
])
def test_config_ranges_and_finiteness(field, value, message):
    """Item 9: these reached torch (a negative clip norm made training ascend the loss)."""
    with pytest.raises(InputError, match=re.escape(message)):
        load_config("tiny", ["--" + field.replace("_", "-"), value])


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-3\nmax_steps: 3\n")  # PyYAML reads 1e-3 as a string
    assert load_config(str(path), []).learning_rate == 1e-3
    path.write_text("learning_rate: fast\n")
    with pytest.raises(InputError, match="--learning-rate: expected float, got 'fast'"):
        load_config(str(path), [])
    path.write_text("num_generatons: 3\n")
    with pytest.raises(InputError, match="unknown config field 'num_generatons' \\(did you mean 'num_generations'"):
        load_config(str(path), [])


def test_help_lists_every_field_with_its_default(capsys):
    """Item 13: --help listed none of the config fields."""
    assert main(["train", "--help"]) == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at hyphens too
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert f.metadata["help"] and flag in text, f.name
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert "".join(f"{f.metadata['help']} (default: {default})".split()) in text, f.name
    for group in ("modelanddata:", "CaOPD:", "sampling:", "optimization:", "runfolderandcheckpoints:"):
        assert group in text


@pytest.mark.parametrize("flag, suggestion", [("--num-generation", "--num-generations"),
                                              ("--teacher_ema", "--teacher-ema"),
                                              ("--skip-loss-token", "--skip-loss-tokens")])
def test_an_unknown_option_suggests_the_closest_field(capsys, flag, suggestion):
    assert main(["train", flag, "3"]) == 2
    assert f"unknown option '{flag}' (did you mean {suggestion}?)" in one_line_error(capsys)


def test_boolean_options_take_a_value_or_none():
    assert main(["train", "--overwrite", "maybe"]) == 2
    assert load_config("tiny", ["--overwrite", "true"]).overwrite


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "caopd" / "configs").glob("*.yaml")))
def test_packaged_configs_load_and_validate(name):
    config = load_config(name, [])
    assert config.output_dir.startswith("runs/")
    if name.endswith("qwen3-8b-h200"):  # the paper's settings
        assert (config.model, config.num_generations, config.learning_rate, config.prompts_per_step,
                config.teacher_ema, config.skip_loss_tokens, config.max_completion_length) == \
            ("Qwen/Qwen3-8B", 8, 2e-5, 32, 0.01, 3, 1024)
        assert config.dataset == name.split("-")[0] and config.gradient_checkpointing and config.bf16


@pytest.mark.parametrize("values", [
    dict(teacher_ema=0.0), dict(teacher_ema=1.0), dict(warmup_ratio=0.0), dict(warmup_ratio=1.0),
    dict(vllm_gpu_memory_utilization=0.0), dict(vllm_gpu_memory_utilization=1.0), dict(top_p=1.0), dict(top_p=1e-9),
    dict(divergence="jsd", beta=1e-3), dict(divergence="jsd", beta=0.999), dict(beta=5.0),  # beta only for jsd
    dict(learning_rate=1e-12), dict(temperature=1e-6), dict(train_rollouts=8), dict(train_rollouts=0),
    dict(sampling_temperature=0.0), dict(max_grad_norm=0.0), dict(weight_decay=0.0), dict(save_total_limit=0),
    dict(num_generations=1, prompts_per_step=1, micro_batch_prompts=1, max_prompt_length=1, max_completion_length=1,
         epochs=1, save_every=1), dict(skip_loss_tokens=0, max_steps=0, max_staleness=0, save_every=0),
    dict(split=None),
])
def test_boundaries_that_are_accepted(values):
    config = TrainConfig(**values)
    assert all(getattr(config, k) == v for k, v in values.items())


@pytest.mark.parametrize("values, message", [
    (dict(teacher_ema=1.01), "config field 'teacher_ema' must be in [0.0, 1.0], got 1.01"),
    (dict(warmup_ratio=1.5), "config field 'warmup_ratio' must be in [0.0, 1.0], got 1.5"),
    (dict(vllm_gpu_memory_utilization=1.01), "config field 'vllm_gpu_memory_utilization' must be in [0.0, 1.0], got "
                                             "1.01"),
    (dict(top_p=1.01), "config field 'top_p' must be in (0, 1], got 1.01"),
    (dict(divergence="jsd", beta=1.0), "config field 'beta' must be in (0, 1) for divergence jsd, got 1.0"),
    (dict(divergence="jsd", beta=0.0), "config field 'beta' must be in (0, 1) for divergence jsd, got 0.0"),
    (dict(learning_rate=0.0), "config field 'learning_rate' must be > 0, got 0.0"),
    (dict(temperature=0.0), "config field 'temperature' must be > 0, got 0.0"),
    (dict(train_rollouts=9), "config field 'train_rollouts' must be in [0, num_generations], got 9"),
    (dict(num_generations=0), "config field 'num_generations' must be >= 1, got 0"),
    (dict(save_every=-1), "config field 'save_every' must be >= 0, got -1"),
    (dict(max_staleness=-1), "config field 'max_staleness' must be >= 0, got -1"),
    (dict(num_generations="4"), "config field 'num_generations' must be int, got '4'"),
    (dict(num_generations=True), "config field 'num_generations' must be int, got True"),
    (dict(bf16="yes"), "config field 'bf16' must be bool, got 'yes'"),
    (dict(model=None), "config field 'model' must be str, got None"),
    (dict(resume=True, overwrite=True), "--resume and --overwrite exclude each other: continue the run, or replace "
                                        "it"),
    (dict(loss_impl="cuda"), "config field 'loss_impl': 'cuda' is not one of ('auto', 'triton', 'torch')"),
    (dict(lora_alpha=-1.0), "config field 'lora_alpha' must be >= 0, got -1.0"),  # issue 26 item 4
    (dict(lora_r=-2), "config field 'lora_r' must be >= 0, got -2"),
    (dict(num_generations=10**12), "config field 'num_generations' must be <= 1024, got 1000000000000"),
])
def test_bad_values_name_the_field_and_the_value(values, message):
    with pytest.raises(InputError) as info:
        TrainConfig(**values)
    assert str(info.value) == message


def test_an_int_for_a_float_field_becomes_a_float():
    config = TrainConfig(learning_rate=1, temperature=2)
    assert type(config.learning_rate) is float and type(config.temperature) is float and config.temperature == 2.0


@pytest.mark.parametrize("text, value", [*((t, True) for t in ("true", "1", "yes", "on", "TRUE", "On")),
                                         *((t, False) for t in ("false", "0", "no", "off", "False", "NO"))])
def test_boolean_words(text, value):
    assert load_config("tiny", ["--bf16", text]).bf16 is value


@pytest.mark.parametrize("flag, text, message", [
    ("--bf16", "maybe", "--bf16: expected true or false, got 'maybe'"),
    ("--chat-template-kwargs", "[1, 2]", "--chat-template-kwargs: expected a mapping like '{enable_thinking: false}'"),
    ("--chat-template-kwargs", "{a: [", "--chat-template-kwargs: expected a mapping like '{enable_thinking: false}'"),
    ("--learning-rate", "fast", "--learning-rate: expected float, got 'fast'"),
    ("--nope", "1", "unknown option '--nope' (caopd train --help lists them)"),
    ("--teacher-em", "1", "unknown option '--teacher-em' (did you mean --teacher-ema?)"),
])
def test_override_errors_are_exact(flag, text, message):
    with pytest.raises(InputError) as info:
        load_config("tiny", [flag, text])
    assert str(info.value) == message


@pytest.mark.parametrize("text, value", [("none", None), ("NULL", None), ("None", None), ("train", "train")])
def test_optional_strings(text, value):
    assert load_config("tiny", ["--split", text]).split == value


def test_config_files_and_their_errors(tmp_path):
    with pytest.raises(InputError) as info:
        load_config("nope", [])
    assert str(info.value) == "nope: no such config file (packaged configs: science-qwen3-32b-8xh200, " \
                              "science-qwen3-8b-h200, tiny, tooluse-qwen3-8b-h200)"
    plain = tmp_path / "myconfig"  # no suffix, but a file: read as it is, not as a packaged name
    plain.write_text("num_generations: 3\n")
    assert load_config(str(plain), []).num_generations == 3
    assert load_config(None, ["--seed", "4"]).seed == 4 and load_config(None, []) == TrainConfig()
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1,\n")
    with pytest.raises(InputError, match=rf"^{re.escape(str(broken))}: malformed YAML \(while parsing"):
        load_config(str(broken), [])
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(InputError, match=rf"^{re.escape(str(listed))}: expected a mapping of config fields$"):
        load_config(str(listed), [])
    with pytest.raises(InputError, match=r"^overrides come in '--key value' pairs"):
        load_config("tiny", ["--seed"])


def test_hostile_yaml_is_one_line(tmp_path):
    """Issue 26 item 11: 100,000 nested [ was a RecursionError traceback; 100 MB took 92 s and 0.9 GB."""
    from caopd.config import MAX_CONFIG_BYTES

    deep = tmp_path / "deep.yaml"
    deep.write_text("seed: " + "[" * 100_000 + "\n")
    with pytest.raises(InputError, match=rf"^{re.escape(str(deep))}: malformed YAML"):
        load_config(str(deep), [])
    large = tmp_path / "large.yaml"
    large.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(InputError, match=rf"^{re.escape(str(large))}: \d+ bytes; a config file is at most"):
        load_config(str(large), [])


def test_data_path():
    assert TrainConfig(data="some/file.jsonl").data_path() == Path("some/file.jsonl")
    shipped = TrainConfig(data="caopd:examples/arith_mc.jsonl").data_path()
    assert shipped.is_file() and shipped.parts[-3:] == ("caopd", "examples", "arith_mc.jsonl")


def test_yaml_field_errors_are_exact(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("zzzz: 1\n")  # nothing near it: no suggestion
    with pytest.raises(InputError) as info:
        load_config(str(path), [])
    assert str(info.value) == f"{path}: unknown config field 'zzzz'"
    path.write_text("chat_template_kwargs: thinking\n")  # a string where a mapping belongs is not coerced
    with pytest.raises(InputError) as info:
        load_config(str(path), [])
    assert str(info.value) == "config field 'chat_template_kwargs' must be dict, got 'thinking'"
