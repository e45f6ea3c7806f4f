"""Shared-prefix attention by segments: the pairs a shared row needs and no others, with no [T, T] mask.

A shared row is [prefix | completion 1 | ... | completion K] (caopd.training.shared_prefix). Its
attention is block-sparse: the prefix attends causally to itself, and each completion to the
prefix and to itself causally, never to another completion. That is computed here as dense
attention over segments (Prefix Grouper's split): one causal attention over the prefix, and one
over each completion's queries against [the prefix's keys | its own keys], causal aligned to the
bottom right. The work is P^2/2 + K L (P + L/2) (query, key) pairs a row, against K (P + L)^2 / 2
for K padded rows and (P + K L)^2 / 2 for the dense-mask row; the memory, the segments' scores.

Kernels (``KERNELS``):
- ``sdpa``: PyTorch's scaled_dot_product_attention per row (everywhere, with autograd);
- ``flash``: flash-attn's varlen kernels over every row at once, ragged completions unpadded
  (GPUs with flash-attn installed);
- ``flex``: one flex_attention call with a BlockMask built from the rows' segment ids (GPUs;
  PyTorch has no flex backward on CPU, so there it serves forwards without gradients only).

It is a transformers attention implementation, ``caopd_segments:<base>``, registered once per base
implementation (sdpa, flash_attention_2, eager): every call without a ``shared_layout`` argument
(generation, the teacher's prefix cache) runs the base implementation unchanged, so a model keeps
it for everything else. A shared forward passes ``shared_layout`` (the decoder hands extra keyword
arguments to every layer's attention, in gradient checkpointing's recomputation too) and a 4-D
empty ``attention_mask``, which transformers passes through without building a mask.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import cached_property

import torch

KERNELS = ("sdpa", "flash", "flex")
NAME = "caopd_segments"


@dataclass(frozen=True)
class RowSegments:
    """One row: its prefix length and its completions' lengths, laid out back to back after the prefix."""

    prefix: int
    lengths: tuple[int, ...]

    @property
    def used(self) -> int:
        return self.prefix + sum(self.lengths)


@dataclass
class SharedLayout:
    """The rows of a shared micro-batch (G rows of ``width`` positions, right-padded) and the kernel."""

    rows: list[RowSegments]
    width: int
    kernel: str = "sdpa"
    _cache: dict = field(default_factory=dict, repr=False)

    @cached_property
    def segment_ids(self) -> torch.Tensor:
        """[G, width]: 0 for the prefix, k for completion k (1-based), -1 for padding."""
        ids = torch.full((len(self.rows), self.width), -1, dtype=torch.long)
        for g, row in enumerate(self.rows):
            lengths = torch.tensor(row.lengths, dtype=torch.long)
            ids[g, :row.prefix] = 0
            ids[g, row.prefix:row.used] = torch.repeat_interleave(torch.arange(1, len(row.lengths) + 1), lengths)
        return ids

    def on(self, device: torch.device, key: str, build):
        """A tensor derived from the layout, built once per device (every layer reuses it)."""
        if (key, device) not in self._cache:
            self._cache[(key, device)] = build()
        return self._cache[(key, device)]

    def marker(self, device: torch.device) -> torch.Tensor:
        """The 4-D empty attention mask a shared forward passes (transformers then builds none)."""
        return torch.empty(len(self.rows), 1, 0, 0, device=device)


def _completion_index(row: RowSegments, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """([K, Lmax] positions of each completion's tokens in the row (padding repeats the last),
    [K, Lmax] which of them are real)."""
    lengths = torch.tensor(row.lengths, device=device)
    starts = row.prefix + torch.cumsum(lengths, 0) - lengths
    steps = torch.arange(int(lengths.max()), device=device)
    real = steps[None, :] < lengths[:, None]
    return starts[:, None] + torch.minimum(steps[None, :], (lengths - 1)[:, None]), real


def _completion_mask(row: RowSegments, real: torch.Tensor) -> torch.Tensor:
    """[K, 1, Lmax, P + Lmax]: query i of completion k sees the prefix and its own keys j <= i (a padded
    key comes after every real query, so causality hides it; padded queries see the prefix only, so
    no row is all masked, and their outputs are dropped)."""
    p, steps = row.prefix, real.shape[1]
    own = torch.arange(steps, device=real.device)
    causal = own[None, :] <= own[:, None]  # [Lmax, Lmax]
    own_keys = causal[None] & real[:, :, None]  # [K, Lmax, Lmax]
    prefix = torch.ones(real.shape[0], steps, p, dtype=torch.bool, device=real.device)
    return torch.cat([prefix, own_keys], dim=2).unsqueeze(1)


def _sdpa_rows(query, key, value, layout: SharedLayout, scaling) -> torch.Tensor:
    """[G, H, T, D] by segments, PyTorch's SDPA per row."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    gqa = query.shape[1] != key.shape[1]
    out = []
    for g, row in enumerate(layout.rows):
        q, k, v = query[g], key[g], value[g]  # [H, T, D], [Hkv, T, D]
        p = row.prefix
        pieces = [sdpa(q[None, :, :p], k[None, :, :p], v[None, :, :p], is_causal=True, scale=scaling,
                       enable_gqa=gqa)[0]]
        index, real = layout.on(q.device, ("index", g), lambda row=row, d=q.device: _completion_index(row, d))
        mask = layout.on(q.device, ("mask", g), lambda row=row, real=real: _completion_mask(row, real))
        n = index.shape[0]
        qc = q[:, index].transpose(0, 1)  # [K, H, Lmax, D]
        kc = torch.cat([k[None, :, :p].expand(n, -1, -1, -1), k[:, index].transpose(0, 1)], dim=2)
        vc = torch.cat([v[None, :, :p].expand(n, -1, -1, -1), v[:, index].transpose(0, 1)], dim=2)
        completions = sdpa(qc, kc, vc, attn_mask=mask, scale=scaling, enable_gqa=gqa)  # [K, H, Lmax, D]
        pieces += [completions[i, :, :length] for i, length in enumerate(row.lengths)]
        used = torch.cat(pieces, dim=1)  # [H, P + sum(L), D]
        out.append(torch.nn.functional.pad(used, (0, 0, 0, query.shape[2] - used.shape[1])))
    return torch.stack(out)


def _flash_rows(query, key, value, layout: SharedLayout, scaling) -> torch.Tensor:
    """[G, H, T, D] by segments with flash-attn's varlen kernels: the prefixes in one call, the
    completions (each against [its prefix | itself], causal aligned bottom right) in another."""
    from flash_attn import flash_attn_varlen_func

    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [G, T, H, D]
    device = q.device

    def build():
        prefix_rows, comp_rows, comp_keys, cu_p, cu_q, cu_k = [], [], [], [0], [0], [0]
        for g, row in enumerate(layout.rows):
            start = g * layout.width
            prefix_rows.append(torch.arange(start, start + row.prefix))
            cu_p.append(cu_p[-1] + row.prefix)
            position = row.prefix
            for length in row.lengths:
                own = torch.arange(start + position, start + position + length)
                comp_rows.append(own)
                comp_keys += [torch.arange(start, start + row.prefix), own]
                cu_q.append(cu_q[-1] + length)
                cu_k.append(cu_k[-1] + row.prefix + length)
                position += length
        as_index = [torch.cat(x).to(device) for x in (prefix_rows, comp_rows, comp_keys)]
        cu = [torch.tensor(c, dtype=torch.int32, device=device) for c in (cu_p, cu_q, cu_k)]
        return as_index, cu, max(r.prefix for r in layout.rows), max(max(r.lengths) for r in layout.rows), \
            max(r.prefix + max(r.lengths) for r in layout.rows)

    (prefix_rows, comp_rows, comp_keys), (cu_p, cu_q, cu_k), max_p, max_l, max_k = layout.on(device, "flash", build)
    flat = [t.reshape(-1, t.shape[2], t.shape[3]) for t in (q, k, v)]  # [G*T, H, D]
    prefix = flash_attn_varlen_func(flat[0][prefix_rows], flat[1][prefix_rows], flat[2][prefix_rows], cu_p, cu_p,
                                    max_p, max_p, softmax_scale=scaling, causal=True)
    completions = flash_attn_varlen_func(flat[0][comp_rows], flat[1][comp_keys], flat[2][comp_keys], cu_q, cu_k,
                                         max_l, max_k, softmax_scale=scaling, causal=True)
    out = flat[0].new_zeros(flat[0].shape).index_put((prefix_rows,), prefix).index_put((comp_rows,), completions)
    return out.view(q.shape).transpose(1, 2)


def _flex_rows(query, key, value, layout: SharedLayout, scaling) -> torch.Tensor:
    """[G, H, T, D] by flex_attention with a BlockMask from the segment ids (no gradients on CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    device = query.device
    if device.type == "cpu" and torch.is_grad_enabled() and query.requires_grad:
        raise RuntimeError("the flex kernel has no backward on CPU (PyTorch): use the sdpa kernel for training there")
    segments = layout.on(device, "segments", lambda: layout.segment_ids.to(device))
    block_mask = layout.on(device, "block_mask", lambda: create_block_mask(
        block_mask_mod(segments), len(layout.rows), None, layout.width, layout.width, device=str(device)))
    compiled = layout.on(device, "flex", lambda: torch.compile(flex_attention))
    out = compiled(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out * (segments >= 0)[:, None, :, None]  # padding attends to nothing: zeros, as the other kernels give


def block_mask_mod(segments: torch.Tensor):
    """flex_attention's mask_mod of shared rows with [G, T] segment ids (0 the prefix, k completion k,
    -1 padding): causal; a key is the prefix's or the query's own completion's; padding never a key."""
    def mask_mod(b, h, q, kv):
        seen = segments[b, kv]
        return (kv <= q) & (seen >= 0) & ((seen == 0) | (seen == segments[b, q]))
    return mask_mod


ROWS = {"sdpa": _sdpa_rows, "flash": _flash_rows, "flex": _flex_rows}


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      shared_layout: SharedLayout | None = None, **kwargs):
    """The registered attention: by segments for a shared row, else the model's base implementation."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if shared_layout is None:
        base = module.config._attn_implementation.split(":", 1)[1]
        if base == "eager":  # each modeling file has its own eager attention
            forward = sys.modules[type(module).__module__].eager_attention_forward
        else:
            forward = ALL_ATTENTION_FUNCTIONS[base]
        return forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out = ROWS[shared_layout.kernel](query, key, value, shared_layout, scaling)
    return out.transpose(1, 2).contiguous(), None


def use_segment_attention(model: torch.nn.Module) -> str:
    """Give ``model`` the segment attention over its current implementation; returns the name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base = model.config._attn_implementation
    if base.startswith(NAME):
        return base
    name = f"{NAME}:{base}"
    ALL_ATTENTION_FUNCTIONS.register(name, segment_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.set_attn_implementation(name)
    return name


def default_kernel(device: torch.device) -> str:
    """flash-attn's varlen kernels where installed on a GPU, else flex_attention on a GPU (compiled,
    block-sparse; GQA with a mask would send SDPA to its math backend there), else PyTorch's SDPA."""
    import importlib.util

    if device.type != "cuda":
        return "sdpa"
    return "flash" if importlib.util.find_spec("flash_attn") is not None else "flex"
