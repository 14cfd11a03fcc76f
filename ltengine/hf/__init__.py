"""The transformers drop-in: LightTransfer-Test inside Hugging Face's own ``model.generate``.

    cache = LightTransferCache(model, lazy=LazyConfig(fraction=0.5))
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=64)  # (or cache=cache)
    cache.lazy_layers, cache.lazy_ratios, cache.nbytes

How it hooks in, through transformers' own extension points only:
- ``LightTransferCache`` is a ``transformers.Cache`` (one ``LightTransferLayer`` per decoder layer);
  the model's attention module calls ``cache.update(k, v, layer)`` and then the attention function.
- That function is registered as ``"ltengine_lighttransfer"`` in ``AttentionInterface`` (with SDPA's
  mask builder in ``AttentionMaskInterface``), and the cache sets it as the model's attention
  implementation. ``update`` leaves a note naming the tensors it returned; the attention function
  sees the query, finds the note by identity and lets the cache attend. Any other call (another
  cache, no cache) is plain SDPA.
- Prefill (the first forward on an empty cache) reproduces the engine's ``layer_major``: each layer attends
  fully and causally, is scored from its last ``probe`` queries over all prompt keys
  (``Backend.scorer(lazy.score)``), and the policy (``lazy.make_policy``) names layers to demote; a
  demoted layer is truncated in place to sink + ring (``Backend.truncate_kv_``), keys keep their RoPE
  rotation. Decode attends full layers with ``Backend.decode_full`` and lazy ones with
  ``Backend.decode_sink_window``, the engine's own kernels.

Limits: one sequence per cache (batch 1, no padding); no beam search, assisted decoding or ``crop``
(lazy layers have dropped the tokens a rollback would need). A later ``generate`` on the same cache
continues the sequence (multi-turn) without rescoring: its chunk attends like decode.
"""
from .cache import ATTN_IMPLEMENTATION, LightTransferCache
from .layer import LightTransferLayer

__all__ = ["ATTN_IMPLEMENTATION", "LightTransferCache", "LightTransferLayer"]
