"""Checks of the FSDP2 placement that need the processes themselves; run by tests/test_distributed.py
under torchrun (2 CPU processes, gloo). Each process writes what it saw to ``<out>/rank<R>.json``.

1. The weight stream: whole tensors one at a time (at most one alive while the consumer drops each),
   equal to the one-process model built from the same seed (the broadcast load is exact).
2. The teacher: copied from the student's shards, in bf16 (--teacher-dtype bf16).
3. The sharded bf16 teacher follows the fp32 EMA rule (stochastic rounding, shard by shard): the
   same rule the one-process test checks.
"""
from __future__ import annotations

import json
import sys
import weakref
from pathlib import Path

import torch


def gap_closed(weight: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> float:
    return float(1 - (weight - target).abs().sum() / (start - target).abs().sum())


def main(out: Path) -> None:
    from caopd.config import TrainConfig
    from caopd.modeling.models import load_model, load_tokenizer
    from caopd.training.distributed import join_process_group, leave_process_group
    from caopd.training.placement import place_models
    from caopd.training.weight_stream import local

    ranks = join_process_group()
    tokenizer = load_tokenizer("tiny-qwen3", "fast")
    config = TrainConfig(model="tiny-qwen3", tokenizer="fast", fsdp=True, teacher_dtype="bf16", seed=3,
                         output_dir=str(out / "unused"))
    models = place_models(config, tokenizer, ranks, fsdp=True, cpu_offload=False)
    reference = load_model("tiny-qwen3", tokenizer, seed=3).state_dict()
    seen = {"rank": ranks.rank, "names": [], "most_alive": 0, "worst_difference": 0.0}
    alive: list[weakref.ref] = []
    for name, tensor in models.weights():
        alive.append(weakref.ref(tensor))
        seen["most_alive"] = max(seen["most_alive"], sum(r() is not None for r in alive))
        seen["names"].append(name)
        seen["worst_difference"] = max(seen["worst_difference"], float((tensor - reference[name]).abs().max()))
        del tensor
    teacher = {n: p.full_tensor() for n, p in models.teacher.named_parameters()}
    seen["teacher_dtypes"] = sorted({str(p.dtype) for p in models.teacher.parameters()})
    seen["teacher_is_the_student"] = all(torch.equal(teacher[n], reference[n].to(torch.bfloat16)) for n in teacher)
    seen["teacher_local_elements"] = sum(local(p).numel() for p in models.teacher.parameters())
    seen["student_elements"] = sum(p.numel() for p in models.student.parameters())

    name = "model.layers.0.mlp.up_proj.weight"
    g = torch.Generator().manual_seed(ranks.rank)
    with torch.no_grad():
        for p in models.teacher.parameters():  # the teacher starts a little away from the student
            local(p).add_(torch.randn(local(p).shape, generator=g).to(local(p).dtype) * 0.002)
    start = dict(models.teacher.named_parameters())[name].detach().full_tensor().float()
    for _ in range(100):
        models.update_teacher(0.01)
    target = dict(models.student.named_parameters())[name].detach().full_tensor().to(torch.bfloat16).float()
    final = dict(models.teacher.named_parameters())[name].detach().full_tensor().float()
    seen["gap_closed"] = gap_closed(final, start, target)
    seen["moved_share"] = float((final != start).float().mean())
    (out / f"rank{ranks.rank}.json").write_text(json.dumps(seen))
    leave_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
