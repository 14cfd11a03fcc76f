"""Adapters over Hugging Face decoder-only models (loading lives in ``loading.py``).

The engine runs its own layer loop; an adapter exposes, per layer, the pieces it needs: the input
projections with RoPE (``qkv``), the output projection and the MLP block, reusing the model's own
weights and rotary embedding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels.fp8 import row_bytes
from .loading import DEFAULT_MODEL_GGUF, DEFAULT_MODEL_PACKAGE, default_model_file, load_model  # noqa: F401 (re-exported)

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[..., T, H, D]``; cos/sin ``[..., T, D]`` (broadcast over heads). Same math as HF's."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


@dataclass
class ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    sliding_window: int | None  # the config's own sliding window, if any layer uses one


class DecoderAdapter:
    """LLaMA-style decoder: LLaMA, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k RMSNorm per head).

    ``shards``: the tensor-parallel rank count the model was sharded over (``parallel.shard_model``);
    ``shape`` then holds this rank's query and KV heads, and byte sizes are this rank's.
    ``kv_dtype``: the dtype the runners store K/V in (None: the model's; ``float8_e4m3fn``: fp8 with a
    float32 scale per token and KV head, ``kernels/fp8.py``)."""

    def __init__(self, model: torch.nn.Module, shards: int = 1, kv_dtype: torch.dtype | None = None):
        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED:
            raise ValueError(f"unsupported model type {model_type!r}; ltengine supports {', '.join(SUPPORTED)}")
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
            raise ValueError(f"{type(model).__name__} is not a causal LM with .model.layers and .lm_head; "
                             f"pass an AutoModelForCausalLM of type {', '.join(SUPPORTED)}")
        self.model, self.inner, self.layers = model, inner, list(inner.layers)
        self._kv_dtype = kv_dtype
        attn = self.layers[0].self_attn
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.shape = ModelShape(
            num_layers=len(self.layers),
            num_heads=config.num_attention_heads // shards,
            num_kv_heads=config.num_key_value_heads // shards,
            head_dim=head_dim,
            max_context=int(getattr(config, "max_position_embeddings", 0) or 0) or 1 << 62,
            sliding_window=_active_sliding_window(config),
        )
        self.scale = getattr(attn, "scaling", head_dim ** -0.5)
        self.has_qk_norm = hasattr(attn, "q_norm")

    @property
    def device(self) -> torch.device:
        return self.inner.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.embed_tokens.weight.dtype

    @property
    def vocab_size(self) -> int:
        return self.model.lm_head.out_features

    @property
    def kv_dtype(self) -> torch.dtype:
        """The dtype K/V are stored in."""
        return self._kv_dtype if self._kv_dtype is not None else self.dtype

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """Bytes of one token's K and V in one layer, all KV heads, in the KV dtype (fp8: scales included)."""
        s = self.shape
        return 2 * s.num_kv_heads * row_bytes(s.head_dim, self.kv_dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_tokens(ids)

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[B, T, D]`` for ``positions`` ``[B, T]``, from the model's rotary embedding."""
        return self.inner.rotary_emb(x, positions)

    def qkv(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Layer ``i``'s normed input projections for hidden ``h`` ``[B, T, hidden]``.

        Returns q ``[B, T, H_q, D]``, k and v ``[B, T, H_kv, D]``, RoPE applied to q and k.
        """
        layer, d = self.layers[i], self.shape.head_dim
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, -1, d)
        k = attn.k_proj(x).view(b, t, -1, d)
        v = attn.v_proj(x).view(b, t, -1, d)
        if self.has_qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish_layer(self, i: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual after attention (``attn_out`` ``[B, T, H_q * D]``), then the MLP block."""
        layer = self.layers[i]
        h = h + layer.self_attn.o_proj(attn_out)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.inner.norm(h)).float()

    def fused_weights(self) -> list[dict]:
        """Per layer, one QKV and one gate/up weight for the fused decode path.

        Built once (by the paged runner's fused CUDA decode step). The model's own q/k/v and gate/up
        parameters are re-pointed at row slices of the fused tensors, so the weights exist once in
        memory and the HF modules still work (same values, same parameter objects); ``unfuse()`` (or
        ``Engine.close()``) gives each parameter its own storage again.
        """
        if getattr(self, "_fused", None) is not None:
            return self._fused
        if any(type(getattr(layer.mlp, "act_fn", None)).__name__ not in ("SiLUActivation", "SiLU")
               for layer in self.layers):
            return None  # the fused MLP assumes SiLU gating
        fused = []
        with torch.no_grad():
            for layer in self.layers:
                attn, mlp = layer.self_attn, layer.mlp
                entry = {"qkv_w": _merge(attn.q_proj, attn.k_proj, attn.v_proj),
                         "qkv_b": _merge_bias(attn.q_proj, attn.k_proj, attn.v_proj),
                         "gate_up_w": _merge(mlp.gate_proj, mlp.up_proj),
                         "o": attn.o_proj, "down": mlp.down_proj,
                         "ln1": layer.input_layernorm, "ln2": layer.post_attention_layernorm,
                         "qn": attn.q_norm.weight if self.has_qk_norm else None,
                         "kn": attn.k_norm.weight if self.has_qk_norm else None}
                fused.append(entry)
        self._fused = fused
        return fused

    def unfuse(self) -> None:
        """Undo ``fused_weights``: every q/k/v and gate/up parameter gets its own storage back."""
        if getattr(self, "_fused", None) is None:
            return
        with torch.no_grad():
            for layer in self.layers:
                _unmerge(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
                _unmerge(layer.mlp.gate_proj, layer.mlp.up_proj)
        self._fused = None


def _unmerge(*linears) -> None:
    for m in linears:
        m.weight.data = m.weight.data.clone()
        if m.bias is not None:
            m.bias.data = m.bias.data.clone()


def _merge(*linears) -> torch.Tensor:
    """Concatenate the weights of ``linears`` along the output rows; the modules keep views."""
    merged = torch.cat([m.weight.data for m in linears], dim=0)
    at = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = merged[at: at + n]
        at += n
    return merged


def _merge_bias(*linears) -> torch.Tensor | None:
    if all(m.bias is None for m in linears):
        return None
    merged = torch.cat([m.bias.data if m.bias is not None else m.weight.new_zeros(m.weight.shape[0])
                        for m in linears])
    at = 0
    for m in linears:
        n = m.weight.shape[0]
        if m.bias is not None:
            m.bias.data = merged[at: at + n]
        at += n
    return merged


def _active_sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)
