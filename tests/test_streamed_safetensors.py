"""Safetensors written a tensor at a time (issue 23): files safetensors' own readers load, model folders
``from_pretrained`` loads, and ``caopd export`` of a one-process checkpoint.

Deliberate bugs these catch: a header not padded to 8 bytes (the data then unaligned), offsets
off by one tensor (values shifted), a dtype written as another (bf16 bytes read as fp16), the index
naming the wrong file for a tensor, a tied weight written twice, an export that ignores --dtype.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from caopd.cli import main
from caopd.modeling.models import load_model, load_tokenizer
from caopd.training.streamed_safetensors import TensorSpec, write_model_folder, write_safetensors
from caopd.training.weight_stream import full_tensors, tensor_specs


def test_a_file_written_a_tensor_at_a_time_reads_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
               "ids": torch.arange(5), "flag": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
               "half": torch.randn(2, 3, generator=g).half()}
    path = tmp_path / "x.safetensors"
    write_safetensors(path, [TensorSpec.of(k, v) for k, v in tensors.items()], tensors.values(), {"note": "hi"})
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + header_length) % 8 == 0
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "hi"}
    cast = tmp_path / "cast.safetensors"  # a spec's dtype wins: fp32 written as bf16
    write_safetensors(cast, [TensorSpec("a", (3, 5), torch.bfloat16)], [tensors["a"]])
    assert torch.equal(load_file(cast)["a"], tensors["a"].to(torch.bfloat16))


def test_a_tensor_that_does_not_match_its_spec_is_refused(tmp_path):
    with pytest.raises(ValueError, match="w: got shape \\(2, 2\\), the header says \\(2, 3\\)"):
        write_safetensors(tmp_path / "x.safetensors", [TensorSpec("w", (2, 3), torch.float32)], [torch.zeros(2, 2)])
    with pytest.raises(ValueError):  # fewer tensors than specs
        write_safetensors(tmp_path / "y.safetensors", [TensorSpec("w", (2,), torch.float32)] * 2, [torch.zeros(2)])


def test_a_model_folder_in_shards_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer("tiny-qwen3", "fast")
    model = load_model("tiny-qwen3", tokenizer, seed=1)
    folder = tmp_path / "model"
    specs = tensor_specs(model)
    assert [s.name for s in specs].count("model.embed_tokens.weight") == 1 and "lm_head.weight" not in \
        [s.name for s in specs]  # tied: written once, as save_pretrained does
    model.config.save_pretrained(tmp_path / "config")
    write_model_folder(folder, specs, (t for _, t in full_tensors(model, torch.device("cpu"))), max_shard_bytes=150_000,
                       finish=lambda tmp: model.config.save_pretrained(tmp))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    for name, file in index["weight_map"].items():
        with safe_open(str(folder / file), framework="pt") as f:
            assert name in f.keys()
    assert not (tmp_path / "model.tmp").exists()
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    nothing = tmp_path / "other"
    write_model_folder(nothing, specs, (t for _, t in full_tensors(model, torch.device("cpu"))), write=False)
    assert not nothing.exists()  # the other processes of a sharded save drive the gathers and write nothing


def test_export_of_a_one_process_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--max-steps", "2", "--save-every", "1", "--num-generations", "2",
                 "--max-completion-length", "8", "--output-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--checkpoint", "2", "--output", str(tmp_path / "out"), "--dtype", "bf16"]) == 0
    exported, final = load_file(tmp_path / "out" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert exported.keys() == final.keys()
    assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], final[k].to(torch.bfloat16))
               for k in final)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert main(["export", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o2")]) == 2
    assert "no such run folder" in capsys.readouterr().err
