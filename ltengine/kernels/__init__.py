"""Decode-attention and KV-truncation kernels (reference / Triton / CUDA); backend selection follows."""

from ltengine.kernels.reference import decode_full_ref, decode_sink_window_ref, ring_slot, truncate_kv_ref_

__all__ = ["decode_full_ref", "decode_sink_window_ref", "ring_slot", "truncate_kv_ref_"]
