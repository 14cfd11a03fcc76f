"""Shard a Hugging Face decoder over the ranks of a tensor-parallel group, in place.

The plan is transformers' own ``config.base_model_tp_plan`` (the ``"colwise"`` / ``"rowwise"`` names its
``tp_plan="auto"`` uses), checked against the Megatron layout ltengine needs: q/k/v and gate/up are
column-parallel (rank r keeps heads ``[r H/N, (r+1) H/N)`` and the same slice of the intermediate
size), o_proj and down_proj are row-parallel (rank r keeps the matching input columns) and sum over
ranks with one all-reduce each; norms (Qwen3's per-head q/k norms too) and the input embedding are
replicated; ``lm_head`` is vocabulary-parallel and gathered (transformers' ``"colwise_gather_output"``)
so every rank samples from the same full logits. The DecoderAdapter and the paged runner's fused
decode step call ``o_proj`` / ``down_proj`` / ``lm_head`` as modules, so the swapped modules carry the
collectives and neither needs a TP branch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .comm import TPGroup

# the layout ltengine implements; a model's own plan must agree with it where it names these modules
PLAN = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
        "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
        "mlp.down_proj": "rowwise"}


def _kind(style: str) -> str:
    """transformers' style name -> "colwise" / "rowwise" / "replicated"."""
    s = style.removeprefix("local_").removeprefix("packed_")
    if s.startswith("colwise"):
        return "colwise"
    if s.startswith("rowwise"):
        return "rowwise"
    return "replicated"


def tp_plan(model: nn.Module) -> dict[str, str]:
    """The per-layer plan (module path under ``layers.*`` -> kind), from transformers' plan when the
    config has one; ValueError if it lays out a module differently from ``PLAN``."""
    plan = dict(PLAN)
    theirs = getattr(model.config, "base_model_tp_plan", None) or {}
    for key, style in theirs.items():
        if not key.startswith("layers.*."):
            continue
        name = key.removeprefix("layers.*.")
        if name in PLAN and _kind(style) != PLAN[name]:
            raise ValueError(f"transformers' tp plan for {model.config.model_type} shards {name} as {style!r}; "
                             f"ltengine's tensor parallelism needs it {PLAN[name]!r}")
    return plan


class RowParallelLinear(nn.Module):
    """``y = sum over ranks of x_r @ W_r^T`` (+ bias, held by rank 0 only): one all-reduce."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: TPGroup, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group, self.in_features, self.out_features = group, weight.shape[1], out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce_(F.linear(x, self.weight, self.bias))


class VocabParallelHead(nn.Module):
    """Rank r's rows of the output projection; ``forward`` gathers every rank's logits, so each rank
    gets the full ``[..., vocab]`` row (a vocabulary that does not split evenly is zero-padded, then cut)."""

    def __init__(self, weight: torch.Tensor, group: TPGroup, vocab: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.group, self.out_features, self.in_features = group, vocab, weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = self.group.all_gather_last(F.linear(x, self.weight))
        return full if full.shape[-1] == self.out_features else full[..., :self.out_features]


def _rows(t: torch.Tensor, rank: int, world: int, device: torch.device) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n].to(device, copy=True).contiguous()


def _column(linear: nn.Linear, group: TPGroup) -> None:
    """Keep this rank's output rows of ``linear`` (in place; the module stays an ``nn.Linear``)."""
    r, w, dev = group.rank, group.world, group.device
    linear.weight = nn.Parameter(_rows(linear.weight.data, r, w, dev), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(_rows(linear.bias.data, r, w, dev), requires_grad=False)
    linear.out_features = linear.weight.shape[0]


def _row(linear: nn.Linear, group: TPGroup) -> RowParallelLinear:
    r, w, dev = group.rank, group.world, group.device
    n = linear.in_features // w
    weight = linear.weight.data[:, r * n:(r + 1) * n].to(device=dev, copy=True).contiguous()
    bias = linear.bias.data.to(dev, copy=True) if linear.bias is not None and r == 0 else None
    return RowParallelLinear(weight, bias, group, linear.out_features)


def check_divisible(config, world: int) -> None:
    """ValueError unless heads, KV heads and the intermediate size split evenly over ``world`` ranks."""
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(config, name)
        if value % world:
            raise ValueError(f"tensor_parallel={world} needs {name} divisible by it, but the model has "
                             f"{name}={value}; use a tensor_parallel that divides {value}")


@torch.no_grad()
def shard_model(model: nn.Module, group: TPGroup) -> nn.Module:
    """Shard ``model`` (LLaMA / Mistral / Qwen2 / Qwen3 causal LM) for ``group.rank`` in place and move
    it to ``group.device``; returns it. The full weights are never modified (slices are copied), so a
    model shared with other processes stays whole for them."""
    check_divisible(model.config, group.world)
    plan = tp_plan(model)
    for layer in model.model.layers:
        for path, kind in plan.items():
            parent_name, _, name = path.rpartition(".")
            parent = layer.get_submodule(parent_name)
            linear = getattr(parent, name)
            if kind == "colwise":
                _column(linear, group)
            elif kind == "rowwise":
                setattr(parent, name, _row(linear, group))
    head = model.lm_head
    vocab = head.out_features
    per = -(-vocab // group.world)
    weight = head.weight.data
    if per * group.world != vocab:
        weight = torch.cat([weight, weight.new_zeros(per * group.world - vocab, weight.shape[1])])
    model.lm_head = VocabParallelHead(_rows(weight, group.rank, group.world, group.device), group, vocab)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the head is a slice now; keep HF from re-tying it
    return model.to(group.device)
