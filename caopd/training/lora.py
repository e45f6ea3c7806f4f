"""LoRA through peft: adapters are trained over a frozen base; the teacher is the EMA of the adapters
over the same base, so one base model serves both (no second copy).

peft's ``inject_adapter_in_model`` puts LoRA layers into the model in place (it stays the same
transformers class, so the loss's decoder and lm_head paths are unchanged). The teacher
(``AdapterTeacher``) is a view of that same model: for each of its forwards the student's adapter
weights are swapped for the teacher's, then swapped back before the student's backward. LoRA's B
starts at zero, so the initial adapters are the base: with ``--teacher-ema 0`` the teacher stays
the base model, adapters off.

Checkpoints hold the two adapter sets only; the final save writes the adapters in peft's format
(``adapter_model.safetensors`` + ``adapter_config.json``: ``PeftModel.from_pretrained`` loads them)
and, with ``--merge-lora true``, the merged weights as an ordinary model beside them (``merged/``).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from caopd.errors import InputError

QWEN3_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _peft():
    try:
        import peft
    except ImportError:
        raise InputError("--lora-r needs peft: pip install -e .[lora] (peft>=0.21)") from None
    return peft


def add_lora(model: torch.nn.Module, r: int, alpha: float, target_modules: list[str]) -> torch.nn.Module:
    """Inject rank-``r`` adapters into ``target_modules``; everything else frozen. Returns the model."""
    peft = _peft()
    _check_targets(model, r, target_modules)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                             bias="none")
    try:
        peft.inject_adapter_in_model(config, model)
    except ValueError as e:
        raise InputError(f"--lora-target-modules {','.join(target_modules)}: {e}") from None
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def _check_targets(model: torch.nn.Module, r: int, target_modules: list[str]) -> None:
    """One line for targets that cannot take adapters here (the embeddings and lm_head: the fused loss
    reads the lm_head's weight directly, and Qwen3's embeddings are tied to it) and for a rank above
    what the adapted layers hold (a rank-r update of an m x n layer needs r <= min(m, n))."""
    matched = [(name, module) for name, module in model.named_modules()
               if any(name == t or name.endswith("." + t) for t in target_modules)]
    heads = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    embeddings = sorted({name.rsplit(".", 1)[-1] for name, module in matched if id(module) in heads})
    if embeddings:
        raise InputError(f"--lora-target-modules {','.join(embeddings)}: the embeddings and the lm_head take no "
                         f"adapters here (the fused loss reads the lm_head's weight directly); adapt the decoder's "
                         f"linear layers (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)")
    linear = [(name, m) for name, m in matched if isinstance(m, torch.nn.Linear)]
    if linear:
        name, smallest = min(linear, key=lambda item: min(item[1].in_features, item[1].out_features))
        bound = min(smallest.in_features, smallest.out_features)
        if r > bound:
            raise InputError(f"--lora-r {r} is above the rank the adapted layers hold: {name} is "
                             f"{smallest.out_features} x {smallest.in_features}, so --lora-r <= {bound}")


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


class AdapterTeacher(torch.nn.Module):
    """The teacher of a LoRA run: the student's model with the teacher's adapters swapped in for
    each forward. Its only tensors are the adapters (fp32, no gradient)."""

    base_model_prefix = "decoder"

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule: the teacher does not own the base
        self._student = adapter_parameters(model)  # the student's adapter Parameters (.to() keeps the objects)
        self.adapters = {name: p.detach().clone() for name, p in self._student.items()}

    @contextlib.contextmanager
    def swapped(self):
        params = self._student
        student = {name: p.data for name, p in params.items()}
        try:
            for name, p in params.items():
                if self.adapters[name].device != p.device:  # the model moved (to the GPU) after this was built
                    self.adapters[name] = self.adapters[name].to(p.device)
                p.data = self.adapters[name]
            yield
        finally:
            for name, p in params.items():
                p.data = student[name]

    def decoder(self, **inputs):
        with self.swapped():
            return getattr(self._model, self._model.base_model_prefix)(**inputs)

    def get_output_embeddings(self):
        return self._model.get_output_embeddings()  # not adapted: the frozen base's

    @property
    def config(self):
        return self._model.config

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return dict(self.adapters)

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True):
        if strict and set(state) != set(self.adapters):
            raise ValueError("the teacher's adapters differ from the model's")
        for name, value in state.items():
            self.adapters[name].copy_(value)

    @torch.no_grad()
    def ema_update_(self, alpha: float) -> None:
        """teacher adapters <- (1 - alpha) teacher + alpha student (alpha 0: frozen)."""
        if alpha:
            for name, p in self._student.items():
                self.adapters[name] = self.adapters[name].to(p.device).lerp_(p.detach().float(), alpha)


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base weights with the adapters merged in (W + scale B A), under the base model's names."""
    from peft.tuners.lora import LoraLayer

    state = {name.replace(".base_layer.", "."): value.detach() for name, value in model.state_dict().items()
             if "lora_" not in name}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            key = f"{name}.weight"
            state[key] = state[key] + module.get_delta_weight("default").detach().to(state[key].dtype)
    return state


def save_adapters(model: torch.nn.Module, directory: Path, base_model: str, merge: bool) -> None:
    """peft's adapter files in ``directory``; with ``merge`` also ``directory/merged`` (from_pretrained)."""
    peft = _peft()
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # named as PeftModel.save_pretrained names them (the PeftModel wraps the transformers model)
    adapters = {f"base_model.model.{k}": v.detach().cpu().contiguous()
                for k, v in peft.get_peft_model_state_dict(model).items()}
    save_file(adapters, str(directory / "adapter_model.safetensors"))
    config = model.peft_config["default"].to_dict()
    config.update(base_model_name_or_path=base_model, target_modules=sorted(config["target_modules"]))
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")
    if merge:
        merged = {k: v.cpu().contiguous() for k, v in merged_state_dict(model).items()}
        if model.config.tie_word_embeddings:
            merged.pop("lm_head.weight", None)
        model.save_pretrained(directory / "merged", state_dict=merged)
