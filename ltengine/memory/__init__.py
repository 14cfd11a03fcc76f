"""Where KV lives: contiguous per-sequence caches (``cache``) and the paged block pool (``pool``)."""
from .cache import FullKV, KVMeter, SequenceKV, SinkWindowKV, demote, truncated
from .pool import KVPool, PoolExhausted

__all__ = ["FullKV", "KVMeter", "KVPool", "PoolExhausted", "SequenceKV", "SinkWindowKV", "demote", "truncated"]
